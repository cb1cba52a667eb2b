"""A tiny HF model loaded into Transformer Engine layers through the HF<->Megatron name map.

Run as a plain process on CUDA with TE: ``python te_worker.py WORKDIR``. For each family it
writes a random transformers model, builds the Megatron model with ``transformer_impl``
``transformer_engine``, loads the HF weights through the mapping and prints, as one JSON line,
the largest relative difference of every layer's output and the logits against transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # repo root: tools.tiny_hf_models

import torch

from oprd_mega.convert.hf_io import HFCheckpointReader
from oprd_mega.convert.mcore_io import load_hf_weights
from oprd_mega.convert.verify import compare, hf_outputs, megatron_outputs
from oprd_mega.models import build_gpt_model, load_hf_config
from oprd_mega.models.builder import fusions
from oprd_mega.models.specs import resolve_use_te
from oprd_mega.parallel import init_distributed
from tools.tiny_hf_models import make_tiny_model


def main(workdir: Path) -> None:
    init_distributed()
    use_te = resolve_use_te("transformer_engine")
    results = {"fusions": fusions(use_te=use_te, trainable=True)}
    for family, tied in (("llama", True), ("qwen2", False), ("qwen3", False)):
        path = make_tiny_model(family, workdir / family, tied=tied)
        args = load_hf_config(path)
        model = build_gpt_model(args, params_dtype=torch.float32, use_te=use_te).eval()
        names = [name for name, _ in model.named_parameters()]
        load_hf_weights(model, args, HFCheckpointReader(path))
        tokens = torch.randint(
            0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
        )
        ours = megatron_outputs(model, tokens.cuda(), sequence_parallel=False)
        ref = hf_outputs(path, tokens, torch.float32)
        diffs = compare({k: v.cpu() for k, v in ours.items()}, ref)
        results[family] = {
            "te_layer_norm_names": sum("layer_norm_weight" in n for n in names),
            "max_rel": max(d.max_rel for d in diffs),
        }
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
