"""Depth pruning (``oprd-mega prune``): a student made of some of a teacher's layers.

Minitron-style depth pruning (Muralidharan et al., "Compact Language Models via Pruning and
Knowledge Distillation", 2024, arXiv:2407.14679; Sreenivas et al., "LLM Pruning and
Distillation in Practice: The Minitron Approach", 2024, arXiv:2408.11796): keep a subset of the
transformer blocks, then recover by distillation from the full model. Which blocks to keep is
given (``--keep``) or the ``n`` most important by Block Influence (Men et al., "ShortGPT: Layers
in Large Language Models are More Redundant Than You Expect", 2024, arXiv:2403.03853):

    BI_i = 1 - E_{prompts, tokens} [ cos(x_i, x_{i+1}) ]

where ``x_i`` is block ``i``'s input hidden state and ``x_{i+1}`` its output, measured on
calibration prompts rendered with the model's chat template; a block that barely changes its
input (small BI) is dropped first. Only whole blocks are removed: width pruning (heads,
channels, FFN neurons) is out of scope.

The result is an HF directory (safetensors, config with ``num_hidden_layers`` and the kept-layer
record under :data:`~oprd_mega.models.hf_config.LAYER_MAP_KEY`, tokenizer, chat template,
generation config), written into a temporary sibling and renamed at the end. Training pairs each
student layer with the teacher layer it came from (``oprd_mega.distill.layers.layer_pairs``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from oprd_mega.convert.hf_io import AUX_FILES, HFCheckpointReader, write_hf_directory
from oprd_mega.data.prompts import PromptDataError, load_prompts
from oprd_mega.lifetime import make_owned_temp_dir
from oprd_mega.models.hf_config import LAYER_MAP_KEY, HFModelArgs, load_hf_config
from oprd_mega.models.tokenizers import has_tokenizer

CHAT_TEMPLATE_FILE = "chat_template.jinja"
_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class PruneError(ValueError):
    """Input that cannot be pruned (the message is one line)."""


def parse_keep(text: str, num_layers: int) -> list[int]:
    """``--keep 0,2,4``: zero-based block indices, each in ``0..num_layers-1`` and named once;
    returned ascending."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise PruneError(f"--keep {text!r}: give a comma-separated list of layer indices")
    try:
        layers = [int(part) for part in parts]
    except ValueError:
        raise PruneError(f"--keep {text!r}: {text!r} is not a list of integers") from None
    outside = [n for n in layers if not 0 <= n < num_layers]
    if outside:
        raise PruneError(
            f"--keep {text!r}: {outside} outside 0..{num_layers - 1} (zero-based; the model has "
            f"{num_layers} layers)"
        )
    twice = sorted({n for n in layers if layers.count(n) > 1})
    if twice:
        raise PruneError(f"--keep {text!r}: {twice} named more than once")
    return sorted(layers)


def chat_template_of(model_dir: Path) -> str | None:
    """The chat template shipped with a model directory (``chat_template.jinja`` or the
    ``chat_template`` of ``tokenizer_config.json``), None without one."""
    if (model_dir / CHAT_TEMPLATE_FILE).is_file():
        return (model_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str) and template:
            return template
    return None


def check_source(model_dir: Path, chat_template: Path | None) -> HFModelArgs:
    """Everything about the source that can be refused before any work: its config, its
    tokenizer, a chat template (its own or ``--chat-template``)."""
    if not model_dir.is_dir():
        raise PruneError(f"--model {model_dir}: no such directory")
    args = load_hf_config(model_dir)
    if not has_tokenizer(model_dir):
        raise PruneError(
            f"--model {model_dir}: no tokenizer files (tokenizer.json, tokenizer_config.json, "
            "vocab.json or tokenizer.model); the pruned model needs the teacher's tokenizer"
        )
    if chat_template is not None:
        if not chat_template.is_file():
            raise PruneError(f"--chat-template {chat_template}: no such file")
    elif chat_template_of(model_dir) is None:
        raise PruneError(
            f"--model {model_dir}: the tokenizer has no chat template; pass one with "
            "--chat-template FILE (a Jinja template)"
        )
    return args


@torch.no_grad()
def block_influence(model: torch.nn.Module, prompts: Sequence[Sequence[int]]) -> list[float]:
    """ShortGPT's Block Influence of every decoder block of a transformers causal LM:
    ``1 - mean cos(input, output)`` over every token of every prompt (float64), one prompt at a
    time (no padding). ``[num_layers]``."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0

    def hook(index: int):
        def record(_module, inputs, output) -> None:
            before = inputs[0] if inputs else None
            after = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(
                before.double().flatten(0, -2), after.double().flatten(0, -2), dim=-1
            )
            sums[index] += cos.sum()

        return record

    handles = [
        layer.register_forward_hook(hook(i), with_kwargs=False) for i, layer in enumerate(layers)
    ]
    try:
        for ids in prompts:
            model(torch.tensor([list(ids)]), use_cache=False)
            count += len(ids)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise PruneError("block importance needs at least one calibration token")
    return (1.0 - sums / count).tolist()


def most_important(scores: Sequence[float], n: int) -> list[int]:
    """The ``n`` blocks with the largest scores (ties: the earlier block), ascending."""
    if not 1 <= n <= len(scores):
        raise PruneError(f"--num-layers {n}: keep between 1 and {len(scores)} layers")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:n])


def calibration_prompts(
    model_dir: Path, path: Path, chat_template: Path | None, limit: int
) -> list[tuple[int, ...]]:
    """Token ids of the first ``limit`` prompts of a JSONL/Parquet file (column ``prompt``: a
    string or chat messages), rendered with the chat template as training renders them."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if chat_template is not None:
        tokenizer.chat_template = chat_template.read_text(encoding="utf-8")
    try:
        prompts = load_prompts(path, tokenizer, chat_template=True)
    except PromptDataError as exc:
        raise PruneError(f"--calibration: {exc}") from exc
    return [p.prompt_ids for p in prompts[:limit]]


def pruned_tensors(
    reader: HFCheckpointReader, keep: Sequence[int]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The source's tensors with only the kept blocks, renumbered ``0..len(keep)-1``."""
    new_index = {old: new for new, old in enumerate(keep)}
    for name in reader.names():
        match = _LAYER_TENSOR.match(name)
        if match is None:
            yield name, reader.get(name)
        elif int(match.group(1)) in new_index:
            yield (
                f"model.layers.{new_index[int(match.group(1))]}.{match.group(2)}",
                reader.get(name),
            )


def pruned_config(config: dict, keep: Sequence[int], record: dict) -> dict:
    """``config.json`` of the pruned model: its depth, per-layer lists cut to the kept layers,
    and the kept-layer record (1-based source layers, as training counts layers)."""
    num_layers = config["num_hidden_layers"]
    out = dict(config)
    out["num_hidden_layers"] = len(keep)
    for key, value in config.items():
        if isinstance(value, list) and len(value) == num_layers and key.endswith("layer_types"):
            out[key] = [value[i] for i in keep]
    out[LAYER_MAP_KEY] = {
        "source_layers": [i + 1 for i in keep],
        "source_num_layers": num_layers,
        **record,
    }
    return out


def prune(
    model_dir: Path,
    out: Path,
    keep: Sequence[int],
    *,
    record: dict | None = None,
    chat_template: Path | None = None,
) -> Path:
    """Write the HF directory of ``model_dir`` with only the blocks ``keep`` (zero-based,
    ascending) to the new directory ``out``, atomically."""
    if out.exists():
        raise FileExistsError(f"--out {out} already exists; choose a new directory")
    args = check_source(model_dir, chat_template)
    keep = list(keep)
    if not keep or keep != sorted(set(keep)) or not 0 <= keep[0] <= keep[-1] < args.num_layers:
        raise PruneError(
            f"kept layers {keep}: not ascending distinct indices below {args.num_layers}"
        )
    reader = HFCheckpointReader(model_dir)
    reader.validate(args)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    aux = make_owned_temp_dir(out.parent, f"{out.name}.aux")
    try:
        for name in AUX_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, aux / name)
        if chat_template is not None:
            shutil.copy2(chat_template, aux / CHAT_TEMPLATE_FILE)
        full_record = {"source": str(model_dir.resolve()), **(record or {})}
        text = json.dumps(pruned_config(config, keep, full_record), indent=2) + "\n"
        (aux / "config.json").write_text(text, encoding="utf-8")
        write_hf_directory(pruned_tensors(reader, keep), out, aux)
    finally:
        shutil.rmtree(aux, ignore_errors=True)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oprd-mega prune",
        description="Depth pruning, Minitron-style: write a student made of some of a model's "
        "transformer blocks (kept by --keep, or the --num-layers most important by ShortGPT's "
        "Block Influence on --calibration prompts) as a Hugging Face directory with the "
        "tokenizer and chat template, recording which source layer each block came from; "
        "training pairs each student layer with it by default. Width pruning (heads, "
        "channels, FFN neurons) is out of scope.",
    )
    parser.add_argument("--model", required=True, help="source Hugging Face model directory")
    parser.add_argument("--out", required=True, help="new Hugging Face directory for the student")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--keep", help="zero-based indices of the blocks to keep, comma-separated (e.g. 0,2,4)"
    )
    which.add_argument(
        "--num-layers",
        type=int,
        help="keep this many blocks, the most important by Block Influence (needs --calibration)",
    )
    parser.add_argument(
        "--calibration",
        help="JSONL or Parquet prompts (column 'prompt': text or chat messages) for the "
        "importance score, rendered with the chat template",
    )
    parser.add_argument(
        "--max-calibration-prompts",
        type=int,
        default=64,
        help="use at most this many calibration prompts (64)",
    )
    parser.add_argument(
        "--chat-template",
        help="a Jinja chat template file, for a source whose tokenizer has none",
    )
    return parser


def run(ns: argparse.Namespace) -> tuple[Path, list[int], list[float] | None]:
    """What ``oprd-mega prune`` does: the written directory, the kept blocks, the scores."""
    model_dir, out = Path(ns.model), Path(ns.out)
    template = Path(ns.chat_template) if ns.chat_template else None
    if out.exists():
        raise FileExistsError(f"--out {out} already exists; choose a new directory")
    args = check_source(model_dir, template)
    scores = None
    if ns.keep is not None:
        keep = parse_keep(ns.keep, args.num_layers)
        record = {"method": "keep"}
    else:
        if ns.calibration is None:
            raise PruneError("--num-layers needs --calibration prompts to score the blocks")
        if ns.max_calibration_prompts < 1:
            raise PruneError(
                f"--max-calibration-prompts {ns.max_calibration_prompts}: must be positive"
            )
        if not 1 <= ns.num_layers <= args.num_layers:
            raise PruneError(f"--num-layers {ns.num_layers}: keep between 1 and {args.num_layers}")
        prompts = calibration_prompts(
            model_dir, Path(ns.calibration), template, ns.max_calibration_prompts
        )
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        scores = block_influence(model, prompts)
        keep = most_important(scores, ns.num_layers)
        record = {
            "method": "block-influence",
            "reference": "ShortGPT Block Influence (arXiv:2403.03853), Minitron depth pruning",
            "calibration": str(Path(ns.calibration).resolve()),
            "calibration_prompts": len(prompts),
            "block_influence": scores,
        }
    return prune(model_dir, out, keep, record=record, chat_template=template), keep, scores


def main(argv: Sequence[str] | None = None) -> int:
    """``oprd-mega prune``: bad input is one line on stderr and exit status 2, nothing written."""
    ns = _parser().parse_args(argv)
    try:
        out, keep, _ = run(ns)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:  # PruneError, config, files
        print(f"oprd-mega prune: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: kept layers {keep} (zero-based) of the source")
    return 0


if __name__ == "__main__":
    sys.exit(main())
