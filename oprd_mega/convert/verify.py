"""Layer-by-layer parity of a converted Megatron checkpoint with transformers' own forward.

Run under torchrun with ``tp * pp * dp`` processes. Every rank runs Megatron at the requested
layout; the hidden state after every layer, the final norm and the logits are gathered to
rank 0, which runs the Hugging Face model (``output_hidden_states=True``) on the same random
tokens and reports the max absolute and relative difference of each.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
)

from oprd_mega.convert.mcore_io import load_mcore_checkpoint, read_mcore_args
from oprd_mega.models.builder import build_gpt_model
from oprd_mega.models.hf_config import HFModelArgs
from oprd_mega.models.running import forward_only, layer_hooks
from oprd_mega.models.shapes import PipelineSplit, real_vocab_size

# Documented tolerance on the relative difference max|mcore - hf| / max|hf| per tensor.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class Difference:
    """Difference of one compared tensor (``name``: ``layer 3``, ``final_norm``, ``logits``)."""

    name: str
    max_abs: float
    max_rel: float


def random_tokens(args: HFModelArgs, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """The same random token batch ``[batch, seq]`` on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (batch, seq_len), generator=generator)


def megatron_outputs(
    model: torch.nn.Module, tokens: torch.Tensor, sequence_parallel: bool
) -> dict[str, torch.Tensor]:
    """Forward ``tokens`` through this rank's stage; return full ``[batch, seq, ...]`` tensors.

    Keys: ``layer {n}`` (global 1-based layer number), ``final_norm`` and ``logits`` (real
    vocabulary only) for the stages that own them. Sequence and vocabulary shards are gathered
    across TP ranks.
    """
    captured: dict[str, torch.Tensor] = {}

    def full(x: torch.Tensor) -> torch.Tensor:
        if sequence_parallel:
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        return x.detach().transpose(0, 1).float().clone()

    def keep_layer(layer: torch.nn.Module, _inputs: tuple, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        captured[f"layer {layer.layer_number}"] = full(hidden)

    def keep_norm(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        captured["final_norm"] = full(output)

    final_norm = getattr(model.decoder, "final_layernorm", None)
    norm_hook = None if final_norm is None else final_norm.register_forward_hook(keep_norm)
    config = model.config
    try:
        with layer_hooks(model, keep_layer):
            results = forward_only(
                model,
                [tokens],
                seq_length=tokens.shape[1],
                micro_batch_size=tokens.shape[0],
                outputs=lambda _tokens, output: {"logits": output.detach()},
            )
    finally:
        if norm_hook is not None:
            norm_hook.remove()
    if model.post_process and results and config is not None:
        logits = gather_from_tensor_model_parallel_region(results[0]["logits"]).float()
        captured["logits"] = logits[..., : real_vocab_size(model)]  # padding rows are not HF's
    return captured


def gather_to_rank0(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Union of the per-stage outputs on global rank 0 (TP rank 0 of DP rank 0 contribute)."""
    contributes = (
        parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )
    gathered: list[dict[str, torch.Tensor]] | None = (
        [{}] * dist.get_world_size() if dist.get_rank() == 0 else None
    )
    dist.gather_object(local if contributes else {}, gathered, dst=0)
    merged: dict[str, torch.Tensor] = {}
    for part in gathered or []:
        merged.update(part)
    return merged


def hf_outputs(
    hf_dir: str | Path, tokens: torch.Tensor, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """transformers' own forward: hidden states after every layer, final norm and logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=dtype, attn_implementation="eager"
    ).eval()
    layers = model.model.layers
    last_raw: list[torch.Tensor] = []
    handle = layers[-1].register_forward_hook(
        lambda _m, _i, out: last_raw.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    handle.remove()
    hidden = out.hidden_states  # embeddings, layers 1..L-1, final norm(layer L)
    ref = {f"layer {n}": hidden[n].float() for n in range(1, len(layers))}
    ref[f"layer {len(layers)}"] = last_raw[0].float()
    ref["final_norm"] = hidden[len(layers)].float()
    ref["logits"] = out.logits.float()
    return ref


def compare(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[Difference]:
    """Max absolute and relative differences for every key of ``ref`` (missing -> error)."""
    diffs = []
    for name, expected in ref.items():
        if name not in ours:
            raise KeyError(f"Megatron produced no {name!r} to compare")
        got = ours[name]
        if got.shape != expected.shape:
            raise ValueError(f"{name}: shape {tuple(got.shape)} != HF {tuple(expected.shape)}")
        max_abs = (got - expected).abs().max().item()
        diffs.append(Difference(name, max_abs, max_abs / max(expected.abs().max().item(), 1e-30)))
    return diffs


def verify(
    hf_dir: str | Path,
    mcore_dir: str | Path,
    *,
    sequence_parallel: bool = False,
    batch: int = 2,
    seq_len: int = 32,
    seed: int = 0,
    hf_reference: dict[str, torch.Tensor] | None = None,
    pipeline_split: PipelineSplit | None = None,
) -> list[Difference] | None:
    """Compare the checkpoint at the current parallel layout with transformers (collective).

    Returns the differences on global rank 0, ``None`` elsewhere. ``hf_reference`` reuses a
    previous :func:`hf_outputs` result for the same tokens; ``pipeline_split`` sets the stages'
    layers by hand (default: :func:`~oprd_mega.models.shapes.pipeline_split`'s choice).
    """
    args = replace(read_mcore_args(mcore_dir), pipeline_split=pipeline_split)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if sequence_parallel and seq_len % tp:
        raise ValueError(f"seq_len={seq_len} must be divisible by TP={tp} with sequence parallel")
    from oprd_mega.convert.convert import checkpoint_dtype

    dtype = checkpoint_dtype(Path(mcore_dir))
    model = build_gpt_model(args, params_dtype=dtype, sequence_parallel=sequence_parallel)
    model.eval()
    load_mcore_checkpoint(model, mcore_dir)
    tokens = random_tokens(args, batch, seq_len, seed)
    ours = gather_to_rank0(megatron_outputs(model, tokens, sequence_parallel))
    if dist.get_rank() != 0:
        return None
    ref = hf_reference if hf_reference is not None else hf_outputs(hf_dir, tokens, dtype)
    return compare(ours, ref)
