"""The bridge file: safetensors tensors plus JSON metadata, and its check against the models.

Tensors: ``student.{l}.P_S`` [r, d_S] (or ``student.{l}.mlp_in``/``mlp_in_bias``/``mlp_out`` for
an MLP map), ``teacher.{l}.P_T`` [r, d_T], ``teacher.{l}.mu_T`` [d_T], float32, layers 1-based.
The linear layout is the one :func:`oprd_mega.bridge.loaded.load_bridge` reads. The
safetensors header holds ``format = oprd-bridge``, ``version = 1`` and ``bridge`` = the JSON of
:class:`BridgeMetadata`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .student_map import StudentMap

FORMAT = "oprd-bridge"
VERSION = "1"
ALIGNMENTS = ("same_tokenizer", "last_character")


class BridgeMismatchError(ValueError):
    """The bridge does not fit the models (or the file is inconsistent); lists every problem."""


def config_hash(config: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of a model config's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(dict(config), sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """What the bridge records of a model: name, widths, depth, vocabulary, config hash."""

    name: str
    hidden_size: int
    num_layers: int
    vocab_size: int | None = None
    config_hash: str | None = None

    @classmethod
    def from_args(cls, args: Any, name: str) -> ModelIdentity:
        """From :class:`oprd_mega.models.HFModelArgs` (or anything with ``to_dict``)."""
        return cls(
            name, args.hidden_size, args.num_layers, args.vocab_size, config_hash(args.to_dict())
        )


@dataclass(frozen=True)
class BridgeMetadata:
    """Everything about a bridge except its tensors."""

    rank: int
    layer_pairs: tuple[tuple[int, int], ...]
    student: ModelIdentity
    teacher: ModelIdentity
    student_map: str = "linear"
    normalize: bool = True
    alignment: str = "same_tokenizer"
    rows: int = 0
    seed: int = 0
    report: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "layer_pairs", tuple((int(s), int(t)) for s, t in self.layer_pairs)
        )
        object.__setattr__(self, "report", tuple(self.report))
        problems = []
        if not 1 <= self.rank <= self.teacher.hidden_size:
            problems.append(f"rank: {self.rank} is outside 1..{self.teacher.hidden_size} (d_T)")
        if not self.layer_pairs:
            problems.append("layer_pairs: empty")
        students = [s for s, _ in self.layer_pairs]
        if len(set(students)) != len(students):
            problems.append(f"layer_pairs: a student layer appears twice in {students}")
        for s, t in self.layer_pairs:
            if not 1 <= s <= self.student.num_layers:
                problems.append(
                    f"layer_pairs: student layer {s} outside 1..{self.student.num_layers}"
                )
            if not 1 <= t <= self.teacher.num_layers:
                problems.append(
                    f"layer_pairs: teacher layer {t} outside 1..{self.teacher.num_layers}"
                )
        if self.student_map not in ("linear", "mlp"):
            problems.append(f"student_map: {self.student_map!r} is not 'linear' or 'mlp'")
        if self.alignment not in ALIGNMENTS:
            problems.append(f"alignment: {self.alignment!r} is not one of {ALIGNMENTS}")
        if problems:
            raise BridgeMismatchError("bridge metadata: " + "; ".join(problems))

    def to_json(self) -> str:
        """Canonical JSON."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> BridgeMetadata:
        """Parse :meth:`to_json`; errors name ``where`` and the field."""
        try:
            data = json.loads(text)
            data["student"] = ModelIdentity(**data["student"])
            data["teacher"] = ModelIdentity(**data["teacher"])
            return cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BridgeMismatchError(f"{where}: bridge metadata is malformed ({exc!r})") from exc


@dataclass
class BridgeFile:
    """A loaded bridge: metadata, P_S per student layer, (P_T, mu_T) per teacher layer."""

    metadata: BridgeMetadata
    student: dict[int, StudentMap]
    teacher: dict[int, tuple[torch.Tensor, torch.Tensor]]


def _check_tensors(bridge: BridgeFile, where: str) -> None:
    meta, problems = bridge.metadata, []
    r, d_s, d_t = meta.rank, meta.student.hidden_size, meta.teacher.hidden_size
    for s, t in meta.layer_pairs:
        student = bridge.student.get(s)
        if student is None:
            problems.append(f"student.{s}: missing")
        else:
            if student.kind != meta.student_map:
                problems.append(
                    f"student.{s}: a {student.kind} map, metadata says {meta.student_map}"
                )
            if student.d_student != d_s or student.rank != r:
                problems.append(
                    f"student.{s}: maps [{student.d_student}] -> [{student.rank}], "
                    f"expected d_S={d_s} -> r={r}"
                )
        if t not in bridge.teacher:
            problems.append(f"teacher.{t}: missing")
            continue
        p_t, mu_t = bridge.teacher[t]
        if tuple(p_t.shape) != (r, d_t):
            problems.append(f"teacher.{t}.P_T: shape {list(p_t.shape)}, expected [{r}, {d_t}]")
        if tuple(mu_t.shape) != (d_t,):
            problems.append(f"teacher.{t}.mu_T: shape {list(mu_t.shape)}, expected [{d_t}]")
    extra = sorted(set(bridge.student) - {s for s, _ in meta.layer_pairs})
    if extra:
        problems.append(f"student layers {extra} are not in layer_pairs")
    if problems:
        raise BridgeMismatchError(f"{where}: " + "; ".join(problems))


def save_bridge_file(bridge: BridgeFile, path: str | Path) -> Path:
    """Validate, then write atomically (temporary file, then rename); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    _check_tensors(bridge, str(path))
    tensors: dict[str, torch.Tensor] = {}
    for layer, module in bridge.student.items():
        for name, value in module.tensors().items():
            tensors[f"student.{layer}.{name}"] = value.to("cpu", torch.float32).contiguous()
    for layer, (p_t, mu_t) in bridge.teacher.items():
        tensors[f"teacher.{layer}.P_T"] = p_t.to("cpu", torch.float32).contiguous()
        tensors[f"teacher.{layer}.mu_T"] = mu_t.to("cpu", torch.float32).contiguous()
    header = {"format": FORMAT, "version": VERSION, "bridge": bridge.metadata.to_json()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(temporary), metadata=header)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_bridge_file(path: str | Path) -> BridgeFile:
    """Read a bridge written by :func:`save_bridge_file`; errors name the file and key."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bridge file not found: {path}")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
        if header.get("format") != FORMAT or "bridge" not in header:
            raise BridgeMismatchError(
                f"{path}: not an OPRD bridge with metadata (header format="
                f"{header.get('format')!r}, 'bridge' metadata {'bridge' in header})"
            )
        if header.get("version") != VERSION:
            raise BridgeMismatchError(
                f"{path}: bridge version {header.get('version')!r}, expected {VERSION}"
            )
        metadata = BridgeMetadata.from_json(header["bridge"], str(path))
        student: dict[int, dict[str, torch.Tensor]] = {}
        teacher: dict[int, dict[str, torch.Tensor]] = {}
        for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            parts = key.split(".")
            if len(parts) != 3 or parts[0] not in ("student", "teacher") or not parts[1].isdigit():
                raise BridgeMismatchError(f"{path}: unexpected tensor {key!r}")
            side = student if parts[0] == "student" else teacher
            side.setdefault(int(parts[1]), {})[parts[2]] = handle.get_tensor(key)
    teacher_maps = {}
    for layer, values in teacher.items():
        if set(values) != {"P_T", "mu_T"}:
            raise BridgeMismatchError(
                f"{path}: teacher.{layer} holds {sorted(values)}, expected P_T and mu_T"
            )
        teacher_maps[layer] = (values["P_T"], values["mu_T"])
    maps = {
        layer: StudentMap.from_tensors(values, f"{path}: student.{layer}")
        for layer, values in student.items()
    }
    bridge = BridgeFile(metadata, maps, teacher_maps)
    _check_tensors(bridge, str(path))
    return bridge


def check_bridge_models(
    bridge: BridgeFile | BridgeMetadata,
    student: ModelIdentity,
    teacher: ModelIdentity,
    *,
    pairs: list[tuple[int, int]] | None = None,
    rank: int | None = None,
    where: str = "bridge",
) -> None:
    """Raise :class:`BridgeMismatchError` naming every difference between the bridge and the
    models it is used with: widths, depths, vocabularies, config hashes, rank, layer pairs.

    Names are not compared (one model has many paths); config hashes are, when both sides
    have one.
    """
    meta = bridge.metadata if isinstance(bridge, BridgeFile) else bridge
    problems = []
    for side, recorded, model in (
        ("student", meta.student, student),
        ("teacher", meta.teacher, teacher),
    ):
        for name in ("hidden_size", "num_layers", "vocab_size", "config_hash"):
            have, want = getattr(recorded, name), getattr(model, name)
            if have is not None and want is not None and have != want:
                problems.append(f"{side}.{name}: the bridge has {have}, the {side} model {want}")
    if rank is not None and rank != meta.rank:
        problems.append(f"rank: the bridge has {meta.rank}, expected {rank}")
    if pairs is not None:
        missing = [pair for pair in pairs if tuple(pair) not in meta.layer_pairs]
        if missing:
            problems.append(
                f"layer_pairs: {missing} are not in the bridge's {list(meta.layer_pairs)}"
            )
    if problems:
        raise BridgeMismatchError(f"{where}: " + "; ".join(problems))
