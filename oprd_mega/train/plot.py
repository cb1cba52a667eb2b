"""``oprd-mega plot``: pictures of training runs, bridge reports and kernel benchmarks.

Three kinds of input, told apart by what they are:

- a run (its folder, its ``logs`` folder or its ``metrics.jsonl``): held-out accuracy and
  training loss against step, several runs side by side, plus the per-layer alignment loss and
  cosine of OPRD runs; a group of runs (``--group LABEL=RUN,RUN,...``: the seeds of one
  setting) is drawn as its mean with a band from its lowest to its highest run;
- a bridge report (``report.json`` of ``tools/build_bridge.py``): held-out cosine of P_S against
  P_T before and after the fit, and the explained variance, against the rank;
- a kernel benchmark JSON (``tools/bench_kernels.py --json``): time and peak memory against
  tokens, one line per implementation (and mode, shape, dtype where they vary).

matplotlib is an optional dependency (``pip install 'oprd-mega[plot]'``), imported only here
and only when a figure is drawn. The figures are built with matplotlib's object API (no
pyplot, no display needed); the ``*_figure`` functions return them for inspection.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oprd_mega.errors import cannot_write
from oprd_mega.lifetime import plain_permissions
from oprd_mega.train.metrics import JSONL_NAME, MetricsFileError, read_metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_EVAL_KEY = re.compile(r"eval/(?:(?P<set>[^/]+)/)?(?P<metric>avg_at_k|best_at_k)")
# The top-level per-layer keys, or (a run with several teachers logs only these) a teacher's.
_LAYER_KEY = re.compile(
    r"(?P<prefix>teacher/(?P<teacher>[^/]+)/)?"
    r"rep/(?P<metric>loss|cosine_similarity)/layer_(?P<layer>\d+)"
)


DESCRIPTION = (
    "Draw training runs (held-out accuracy and loss against step, side by side; per-layer "
    "alignment loss and cosine), bridge reports (cosine against rank) or kernel benchmarks "
    "(time and memory against tokens per implementation) to one image."
)


class PlotInputError(ValueError):
    """An input of ``plot`` is missing, empty or not one of the kinds it draws; the message
    names the file."""


@dataclass(frozen=True)
class Run:
    """One run's metrics: its label and records (``kind`` 'train' or 'eval')."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    members: tuple[Run, ...] = ()  # the runs this one is the mean of (see :func:`mean_run`)

    def series(self, key: str, kind: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``key`` in the ``kind`` records that have it (None -> NaN)."""
        steps, values = [], []
        for record in self.records:
            if record.get("kind") == kind and key in record:
                value = record[key]
                steps.append(int(record["step"]))
                values.append(math.nan if value is None else float(value))
        return steps, values

    def band(self, key: str, kind: str) -> tuple[list[int], list[float], list[float]]:
        """Steps of this mean run's ``key`` and, at each, its members' lowest and highest
        value (NaN values left out)."""
        steps, _ = self.series(key, kind)
        at = [dict(zip(*member.series(key, kind), strict=True)) for member in self.members]
        low, high = [], []
        for step in steps:
            values = [v for member in at if not math.isnan(v := member[step])]
            low.append(min(values, default=math.nan))
            high.append(max(values, default=math.nan))
        return steps, low, high

    def keys(self, kind: str) -> list[str]:
        """Every metric name of the ``kind`` records, in first-seen order."""
        seen: dict[str, None] = {}
        for record in self.records:
            if record.get("kind") == kind:
                seen.update(dict.fromkeys(record))
        return list(seen)


def mean_run(name: str, members: Sequence[Run]) -> Run:
    """The mean of ``members``, key by key, at every step (of each kind) that all of them
    logged: a key counts where every member's record has it, NaN (a skipped step) left out of
    the mean. A step that some member lacks (a shorter run) is left out."""
    indexed = [{(r.get("kind"), r.get("step")): r for r in member.records} for member in members]
    records = []
    for record in members[0].records:
        where = (record.get("kind"), record.get("step"))
        rows = [index.get(where) for index in indexed]
        if any(row is None for row in rows):
            continue
        mean: dict[str, Any] = {"kind": where[0], "step": where[1]}
        for key in record:
            if key in mean or key == "time":
                continue
            values = [row.get(key, "absent") for row in rows]
            if not all(v is None or isinstance(v, int | float) for v in values):
                continue  # absent somewhere, or not a number
            finite = [float(v) for v in values if v is not None and not math.isnan(v)]
            mean[key] = sum(finite) / len(finite) if finite else None
        records.append(mean)
    return Run(name, members[0].path, records, tuple(members))


def metrics_path(path: str | os.PathLike[str]) -> Path:
    """The metrics file of a run given as its folder, its ``logs`` folder or the file."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = [path / JSONL_NAME, path / "logs" / JSONL_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = " and ".join(str(c) for c in candidates)
    raise PlotInputError(f"{path}: no metrics file (looked for {looked})")


def load_run(path: str | os.PathLike[str]) -> Run:
    """A run's metrics; an error names the file when it is missing, unreadable or empty."""
    file = metrics_path(path)
    try:
        records = read_metrics(file)
    except (MetricsFileError, UnicodeDecodeError) as exc:
        raise PlotInputError(f"{file}: not a metrics file ({exc})") from exc
    if not any(r.get("kind") in ("train", "eval") for r in records):
        raise PlotInputError(f"{file}: no training or evaluation records")
    folder = file.parent.parent if file.parent.name == "logs" else file.parent
    return Run(folder.name or str(folder), file, records)


def _unique_names(runs: list[Run]) -> list[Run]:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return runs
    # Single runs are then named by their folders; a group keeps its label.
    return [r if r.members else replace(r, name=str(r.path.parent)) for r in runs]


def _figure(rows: int, cols: int) -> tuple[Figure, list[Axes]]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("oprd-mega plot needs matplotlib: pip install 'oprd-mega[plot]'") from exc
    figure = Figure(figsize=(6.4 * cols, 4.2 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")


def runs_figure(runs: Sequence[Run]) -> Figure:
    """Four panels: held-out Avg@k (solid) and Best@k (dashed, k > 1) per evaluation set in
    percent, training loss, per-layer alignment loss and per-layer cosine, all against step;
    one colour per run. A mean run (:func:`mean_run`) gets a band from its lowest to its
    highest member on the accuracy and loss panels."""
    runs = _unique_names(list(runs))
    figure, (accuracy, loss, layer_loss, layer_cosine) = _figure(2, 2)
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        sets: list[str] = []  # one marker per evaluation set
        for key in run.keys("eval"):
            match = _EVAL_KEY.fullmatch(key)
            if match is None:
                continue
            name = match["set"] or ""
            if name not in sets:
                sets.append(name)
            prefix = f"eval/{name}/" if name else "eval/"
            ks = run.series(prefix + "k", "eval")[1]
            k = int(max(ks)) if ks else 1
            best = match["metric"] == "best_at_k"
            if best and k <= 1:
                continue
            steps, values = run.series(key, "eval")
            metric = f"Best@{k}" if best else f"Avg@{k}"
            if run.members:
                _, low, high = run.band(key, "eval")
                band = [100 * v for v in low], [100 * v for v in high]
                accuracy.fill_between(steps, *band, color=color, alpha=0.15, linewidth=0)
            accuracy.plot(
                steps,
                [100 * v for v in values],
                color=color,
                marker="osD^v<>"[sets.index(name) % 7],
                markersize=4,
                linestyle="--" if best else "-",
                label=" ".join(p for p in (run.name, name, metric) if p),
            )
        steps, values = run.series("loss", "train")
        if steps:
            if run.members:
                loss.fill_between(*run.band("loss", "train"), color=color, alpha=0.15, linewidth=0)
            loss.plot(steps, values, color=color, label=run.name)
        matches = [m for m in map(_LAYER_KEY.fullmatch, run.keys("train")) if m]
        if any(m["teacher"] is None for m in matches):  # one teacher: the top-level keys
            matches = [m for m in matches if m["teacher"] is None]
        layers = sorted({(m["prefix"] or "", m["teacher"] or "", int(m["layer"])) for m in matches})
        teachers = sorted({teacher for _, teacher, _ in layers})
        for prefix, teacher, layer in layers:
            position = sum(1 for _, t, other in layers if t == teacher and other < layer)
            for metric, ax in (("loss", layer_loss), ("cosine_similarity", layer_cosine)):
                steps, values = run.series(f"{prefix}rep/{metric}/layer_{layer}", "train")
                if not steps:
                    continue
                name = " ".join(p for p in (teacher, f"layer {layer}") if p)
                style: dict[str, Any] = {}
                if teacher:  # several teachers: a marker per teacher
                    marker = "osD^v<>"[teachers.index(teacher) % 7]
                    style = {"marker": marker, "markersize": 3, "markevery": 25}
                if len(runs) > 1:  # colour: the run; line style: the layer
                    style |= {"color": color, "linestyle": ("-", "--", ":", "-.")[position % 4]}
                    ax.plot(steps, values, label=f"{run.name} {name}", **style)
                else:
                    ax.plot(steps, values, label=name, **style)
    _finish(accuracy, "held-out accuracy", "step", "accuracy (%)")
    _finish(loss, "training loss", "step", "loss")
    _finish(
        layer_loss,
        "alignment loss per layer",
        "step",
        "MSE (plain or normalized: distillation.normalize)",
    )
    _finish(layer_cosine, "cosine per layer", "step", "cosine similarity")
    return figure


def bridge_figure(reports: Sequence[tuple[str, dict[str, Any]]]) -> Figure:
    """Held-out cosine after the fit (solid) and before (dotted) against the rank, and the
    explained variance, per layer pair of each ``(label, report)``."""
    figure, (cosine, explained) = _figure(1, 2)
    index = 0
    for label, report in reports:
        pairs = sorted({(f["student_layer"], f["teacher_layer"]) for f in report["fits"]})
        for pair in pairs:
            fits = sorted(
                (f for f in report["fits"] if (f["student_layer"], f["teacher_layer"]) == pair),
                key=lambda f: f["rank"],
            )
            ranks = [f["rank"] for f in fits]
            name = " ".join(p for p in (label, f"student {pair[0]} -> teacher {pair[1]}") if p)
            color = f"C{index % 10}"
            index += 1
            cosine.plot(ranks, [f["cosine_after"] for f in fits], color=color, marker="o",
                        label=f"{name} (fitted)")  # fmt: skip
            cosine.plot(ranks, [f["cosine_before"] for f in fits], color=color, linestyle=":",
                        label=f"{name} (before)")  # fmt: skip
            explained.plot(ranks, [f["explained_variance"] for f in fits], color=color,
                           marker="o", label=name)  # fmt: skip
    for ax in (cosine, explained):
        ax.set_xscale("log", base=2)
    _finish(cosine, "bridge: held-out cosine against rank", "rank r", "cosine")
    _finish(explained, "teacher subspace: explained variance", "rank r", "fraction")
    return figure


_CASE_FIELDS = ("mode", "d_s", "d_t", "dtype", "device", "normalize", "masked_fraction")


def bench_figure(results: Sequence[tuple[str, dict[str, Any]]]) -> Figure:
    """Median time and peak memory above the inputs against tokens (log-log), one line per
    implementation; mode, shape, dtype, device and the file label join the line's name only
    where they vary. Failed cases (``error``) are left out."""
    ok = [(label, r) for label, r in results if not r.get("error")]
    varying = [f for f in _CASE_FIELDS if len({str(r["case"][f]) for _, r in ok}) > 1]
    several_files = len({label for label, _ in ok}) > 1
    lines: dict[str, list[dict[str, Any]]] = {}
    for label, result in ok:
        case = result["case"]
        parts = [label] if several_files else []
        parts += [case["impl"]] + [f"{f}={case[f]}" for f in varying]
        lines.setdefault(" ".join(parts), []).append(result)
    figure, (time_ax, memory_ax) = _figure(1, 2)
    for index, (name, rows) in enumerate(lines.items()):
        rows = sorted(rows, key=lambda r: r["case"]["tokens"])
        tokens = [r["case"]["tokens"] for r in rows]
        color = f"C{index % 10}"
        time_ax.plot(tokens, [r["median_ms"] for r in rows], marker="o", color=color, label=name)
        memory_ax.plot(tokens, [r["peak_above_inputs_mib"] for r in rows], marker="o",
                       color=color, label=name)  # fmt: skip
    for ax in (time_ax, memory_ax):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    _finish(time_ax, "kernel time", "tokens", "median time (ms)")
    _finish(memory_ax, "kernel peak memory above inputs", "tokens", "MiB")
    return figure


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlotInputError(f"{path}: not JSON ({exc})") from exc


def _kind(path: Path) -> str:
    """'run', 'bridge' or 'bench'."""
    if path.is_dir() or path.suffix == ".jsonl":
        return "run"
    if not path.exists():
        raise PlotInputError(f"{path}: no such file or directory")
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("fits"), list):
        return "bridge"
    if isinstance(data, list) and data and all(isinstance(r, dict) and "case" in r for r in data):
        return "bench"
    raise PlotInputError(
        f"{path}: neither a run (a folder with {JSONL_NAME}), a bridge report (report.json with "
        "'fits') nor a kernel benchmark JSON (a list of results with 'case')"
    )


def _label(path: Path, paths: Sequence[Path]) -> str:
    """A short label of an input file among several: its folder name, or '' when alone."""
    if len(paths) == 1:
        return ""
    return path.parent.name if path.name == "report.json" else path.stem


def parse_group(spec: str) -> tuple[str, list[str]]:
    """``LABEL=RUN,RUN,...`` -> (label, runs); an error names the malformed ``--group``."""
    label, sep, listed = spec.partition("=")
    runs = [run for run in listed.split(",") if run]
    if not sep or not label.strip() or not runs:
        raise PlotInputError(f"--group {spec!r}: expected LABEL=RUN[,RUN...]")
    return label.strip(), runs


def build_figure(inputs: Sequence[str | os.PathLike[str]], groups: Sequence[str] = ()) -> Figure:
    """The figure of ``inputs``, all of one kind (runs, bridge reports or benchmarks), and of
    ``groups`` (``LABEL=RUN,RUN,...``: runs drawn as their mean, after the single runs)."""
    parsed = [parse_group(spec) for spec in groups]
    if not inputs and not parsed:
        raise PlotInputError("nothing to draw: give inputs or --group")
    paths = [Path(p) for p in inputs]
    if parsed:
        if any(_kind(path) != "run" for path in paths):
            raise PlotInputError("--group draws runs; the other inputs must be runs too")
        for label, members in parsed:
            if (bad := next((m for m in members if _kind(Path(m)) != "run"), None)) is not None:
                raise PlotInputError(f"--group {label}: {bad} is not a run")
        means = [
            mean_run(f"{label} (mean of {len(members)})", [load_run(m) for m in members])
            for label, members in parsed
        ]
        return runs_figure([*(load_run(p) for p in paths), *means])
    kinds = {path: _kind(path) for path in paths}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{p} ({k})" for p, k in kinds.items())
        raise PlotInputError(f"plot draws one kind of input at a time, got {listed}")
    kind = kinds[paths[0]]
    if kind == "run":
        return runs_figure([load_run(p) for p in paths])
    if kind == "bridge":
        return bridge_figure([(_label(p, paths), _read_json(p)) for p in paths])
    return bench_figure([(_label(p, paths), r) for p in paths for r in _read_json(p)])


def save_figure(figure: Figure, output: str | os.PathLike[str], force: bool) -> Path:
    """Write ``figure`` (format from the suffix) atomically; an existing file needs ``force``."""
    output = Path(output)
    if output.exists() and not force:
        raise FileExistsError(f"{output} exists; pass --force to overwrite it")
    fmt = output.suffix.lstrip(".").lower() or "png"
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    os.close(handle)
    try:
        plain_permissions(Path(tmp))
        figure.savefig(tmp, format=fmt, dpi=120)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The plot subcommand's arguments."""
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="run folders (or their logs/ or metrics.jsonl), bridge report.json files, or "
        "kernel benchmark JSON files; all of one kind",
    )
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="LABEL=RUN,RUN,...",
        help="runs drawn as one line, their mean, with a band from the lowest to the highest "
        "(e.g. the seeds of one setting); repeat for several groups",
    )
    parser.add_argument(
        "-o", "--output", required=True, help="image to write; the suffix sets the format (.png)"
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite the output image when it exists"
    )


def run(args: argparse.Namespace) -> int:
    """Draw and save; a bad input is one message naming the file (exit code 2)."""
    try:
        figure = build_figure(args.inputs, args.group)
        path = save_figure(figure, args.output, args.force)
    except (PlotInputError, FileExistsError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output's folder cannot be made or written
        print(f"error: {cannot_write('-o', args.output, exc)}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
