"""torchrun worker (4 processes): convert tiny HF models, check round trip, parity per layout.

Usage: parity_worker.py WORKDIR PLAN_JSON. Writes WORKDIR/results.json on rank 0.
PLAN_JSON: [{"family": ..., "tied": bool, "layouts": [[tp, pp, sp], ...], "extra": bool}, ...]
a layout may add a hand-set pipeline split: [tp, pp, sp, {"first": a, "last": b}];
optional per item: "name", "dtype", "config" (make_tiny_model overrides, e.g. shapes and rope),
"padding" (check the stored padded vocabulary: zero rows, recorded size, another padding loads),
"split_checks" (gather and save at the last layout's hand-set split, see split_checks).
"""

import faulthandler
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

faulthandler.dump_traceback_later(int(os.environ.get("OPRD_TEST_HANG_S", "600")), exit=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # repo root: tools.tiny_hf_models

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def use_layout(layout):
    from oprd_mega.parallel import init_distributed, reset_model_parallel

    reset_model_parallel()
    return init_distributed(layout)


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def params_of(model) -> dict[str, torch.Tensor]:
    from oprd_mega.convert.mcore_io import global_parameters

    return {n: p.detach().clone() for n, p in global_parameters(model).items()}


def all_ranks_true(flag: bool) -> bool:
    t = torch.tensor([0 if flag else 1])
    dist.all_reduce(t)
    return int(t.item()) == 0


def tick(label: str) -> None:
    """Rank 0 prints the seconds since the previous tick (the test log shows where time goes)."""
    import time

    now = time.monotonic()
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"TIMING {label} {now - tick.last:.1f}s", flush=True)
    tick.last = now


tick.last = __import__("time").monotonic()


def padding_checks(base: Path, args) -> dict:
    """What the converted checkpoint holds beyond the real vocabulary, read without the mapping:
    the stored rows, the padding rows' values, the recorded size; and that a model built with
    another padding (64: 576 rows, at TP2) loads it with the real rows and zero padding."""
    from megatron.core import dist_checkpointing

    from oprd_mega.convert.mcore_io import (
        FORMAT_FILE,
        VOCAB_ROW_TENSORS,
        load_mcore_checkpoint,
        read_checkpoint_layers,
    )
    from oprd_mega.models import build_gpt_model
    from oprd_mega.parallel import ParallelLayout

    use_layout(ParallelLayout())
    metadata = dist_checkpointing.load_tensors_metadata(str(base / "mcore"))
    _, tensors = next(read_checkpoint_layers(args, base / "mcore"))
    vocab = args.vocab_size
    rows = {
        name: [int(tensor.shape[0]), bool(torch.count_nonzero(tensor[vocab:]) == 0)]
        for name, tensor in tensors.items()
        if name in VOCAB_ROW_TENSORS
    }
    recorded = json.loads((base / "mcore" / FORMAT_FILE).read_text())["padded_vocab_size"]
    use_layout(ParallelLayout(tp=2))
    other = build_gpt_model(replace(args, make_vocab_size_divisible_by=64))
    load_mcore_checkpoint(other, base / "mcore")
    tp_rank = dist.get_rank() % 2
    fits = True
    for name, param in params_of(other).items():
        if name in VOCAB_ROW_TENSORS:
            first = tp_rank * param.shape[0]
            real = max(min(vocab - first, param.shape[0]), 0)
            fits = fits and param.shape[0] == 288
            fits = fits and torch.equal(param[:real], tensors[name][first : first + real])
            fits = fits and bool(torch.count_nonzero(param[real:]) == 0)
    stored = list(metadata["embedding.word_embeddings.weight"].global_shape)
    return {"rows": rows, "recorded": recorded, "stored": stored, "repadded": all_ranks_true(fits)}


def layout_name(layout, split) -> str:
    """``TP1PP4``, or ``TP1PP4 {first: 1, last: 2}`` with a hand-set split."""
    return str(layout) + ("" if split is None else f" {split}")


def split_checks(base: Path, args, layout: list) -> dict:
    """At a hand-set split ``layout`` ([tp, pp, sp, {first, last}]): the HF tensors gathered
    from the stages (what weight sync and export send) equal the HF files bit for bit, and a
    checkpoint saved there loads at TP2 (DP2) with the converted checkpoint's weights."""
    from oprd_mega.convert.gather import gather_hf_weights
    from oprd_mega.convert.mcore_io import load_mcore_checkpoint, save_mcore_checkpoint
    from oprd_mega.models import build_gpt_model
    from oprd_mega.models.shapes import PipelineSplit
    from oprd_mega.parallel import ParallelLayout

    tp, pp, sp, hand_set = layout
    use_layout(ParallelLayout(tp=tp, pp=pp, sp=sp))
    split_args = replace(args, pipeline_split=PipelineSplit(**hand_set))
    model = build_gpt_model(split_args)
    load_mcore_checkpoint(model, base / "mcore")
    gathered = dict(gather_hf_weights(model, split_args))
    out = {}
    if dist.get_rank() == 0:
        original = load_all(base / "hf")
        out["gathered_bit_exact"] = sorted(gathered) == sorted(original) and all(
            torch.equal(gathered[k], original[k]) for k in original
        )
    save_mcore_checkpoint(model, split_args, base / "mcore_split", hf_source=base / "hf")
    use_layout(ParallelLayout(tp=2))
    weights = []
    for checkpoint in ("mcore", "mcore_split"):
        other = build_gpt_model(args)
        load_mcore_checkpoint(other, base / checkpoint)
        weights.append(params_of(other))
    same = sorted(weights[0]) == sorted(weights[1]) and all(
        torch.equal(weights[0][k], weights[1][k]) for k in weights[0]
    )
    out["saved_at_split_loads_at_tp2"] = all_ranks_true(same)
    return out


def run_model(work: Path, item: dict, results: dict) -> None:
    from oprd_mega.convert.convert import hf_to_mcore, mcore_to_hf
    from oprd_mega.convert.hf_io import HFCheckpointReader
    from oprd_mega.convert.mcore_io import (
        load_hf_weights,
        load_mcore_checkpoint,
        read_mcore_args,
        save_mcore_checkpoint,
    )
    from oprd_mega.convert.verify import (
        gather_to_rank0,
        hf_outputs,
        megatron_outputs,
        random_tokens,
        verify,
    )
    from oprd_mega.models import build_gpt_model, build_truncated_model
    from oprd_mega.models.shapes import PipelineSplit
    from oprd_mega.parallel import ParallelLayout
    from tests.torchrun_utils import stage_layers
    from tools.tiny_hf_models import make_tiny_model

    name = item.get("name", f"{item['family']}-{'tied' if item['tied'] else 'untied'}")
    dtype = getattr(torch, item.get("dtype", "float32"))
    if dtype != torch.float32:
        name += f"-{item['dtype']}"
    base = work / name
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    if rank == 0:
        make_tiny_model(
            item["family"],
            base / "hf",
            tied=item["tied"],
            seed=len(name),
            dtype=dtype,
            **item.get("config", {}),
        )
    if dist.is_initialized():
        dist.barrier()
    else:  # first model: no process group yet; wait for the files
        import time

        while not (base / "hf" / "config.json").is_file():
            time.sleep(0.2)
        time.sleep(0.5)
    tick(f"{name} start")
    use_layout(ParallelLayout())
    hf_to_mcore(base / "hf", base / "mcore", progress=False)
    tick(f"{name} hf_to_mcore")
    mcore_to_hf(base / "mcore", base / "hf_back", progress=False)
    tick(f"{name} mcore_to_hf")
    out = {"layouts": {}}
    if rank == 0:
        original, back = load_all(base / "hf"), load_all(base / "hf_back")
        out["roundtrip_names_equal"] = sorted(original) == sorted(back)
        out["roundtrip_bad"] = [
            k
            for k in original
            if k not in back
            or back[k].dtype != original[k].dtype
            or not torch.equal(original[k], back[k])
        ]
        out["roundtrip_count"] = len(original)
        configs = [json.loads((base / d / "config.json").read_text()) for d in ("hf", "hf_back")]
        out["config_json_equal"] = configs[0] == configs[1]  # RoPE scaling fields included
    args = read_mcore_args(base / "mcore")
    tokens = random_tokens(args, 2, 16, seed=1)
    reference = hf_outputs(base / "hf", tokens, dtype) if rank == 0 else None
    tick(f"{name} hf reference")
    for tp, pp, sp, *hand_set in item["layouts"]:
        layout = ParallelLayout(tp=tp, pp=pp, sp=sp)
        split = PipelineSplit(**hand_set[0]) if hand_set else None
        label = layout_name(layout, split)
        use_layout(layout)
        diffs = verify(
            base / "hf",
            base / "mcore",
            sequence_parallel=sp,
            batch=2,
            seq_len=16,
            seed=1,
            hf_reference=reference,
            pipeline_split=split,
        )
        if rank == 0:
            out["layouts"][label] = {d.name: [d.max_abs, d.max_rel] for d in diffs}
        if pp > 2:  # the layers each stage built, as Megatron placed them
            out.setdefault("stage_layers", {})[label] = stage_layers(
                build_gpt_model(replace(args, pipeline_split=split))
            )
        tick(f"{name} verify {label}")
    if item.get("split_checks"):
        out["split_checks"] = split_checks(base, args, item["layouts"][-1])
        tick(f"{name} split checks")
    if item.get("padding"):
        out["padding"] = padding_checks(base, args)
        tick(f"{name} padding")
    if item.get("extra"):
        # (a) The mapping's own TP/PP sharding == Megatron's resharding of the torch_dist file.
        use_layout(ParallelLayout(tp=2, pp=2))
        from_ckpt = build_gpt_model(args)
        load_mcore_checkpoint(from_ckpt, base / "mcore")
        from_hf = build_gpt_model(args)
        load_hf_weights(from_hf, args, HFCheckpointReader(base / "hf"))
        a, b = params_of(from_ckpt), params_of(from_hf)
        out["mapping_shards_equal"] = all_ranks_true(
            sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        )
        # (b) Saved at TP2xPP2, loaded at TP2 (DP2): identical weights and outputs.
        save_mcore_checkpoint(from_ckpt, args, base / "mcore_tp2pp2", hf_source=base / "hf")
        use_layout(ParallelLayout(tp=2, pp=1))
        outs, weights = [], []
        for ckpt in ("mcore", "mcore_tp2pp2"):
            model = build_gpt_model(args)
            load_mcore_checkpoint(model, base / ckpt)
            weights.append(params_of(model))
            outs.append(megatron_outputs(model, tokens, sequence_parallel=False))
        same = sorted(weights[0]) == sorted(weights[1]) and all(
            torch.equal(weights[0][k], weights[1][k]) for k in weights[0]
        )
        same = same and sorted(outs[0]) == sorted(outs[1])
        same = same and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
        out["relayout_identical"] = all_ranks_true(same)
        tick(f"{name} mapping shards + relayout")
        # (c) Truncated teacher (first 2 layers) at PP2: last kept layer == HF hidden_states[2].
        use_layout(ParallelLayout(tp=1, pp=2))
        teacher = build_truncated_model(args, 2)
        load_mcore_checkpoint(teacher, base / "mcore")
        teacher.eval()
        has_head = getattr(teacher, "output_layer", None) is not None or (
            getattr(teacher.decoder, "final_layernorm", None) is not None
        )
        out["teacher_has_head"] = not all_ranks_true(not has_head)
        got = gather_to_rank0(megatron_outputs(teacher, tokens, sequence_parallel=False))
        if rank == 0:
            assert "logits" not in got and "final_norm" not in got, sorted(got)
            diff = (got["layer 2"] - reference["layer 2"]).abs().max().item()
            out["teacher_layer2"] = [diff, diff / reference["layer 2"].abs().max().item()]
            out["teacher_keys"] = sorted(got)
    tick(f"{name} teacher")
    results[name] = out


def main() -> None:
    work, plan = Path(sys.argv[1]), json.loads(sys.argv[2])
    results: dict = {}
    for item in plan:
        run_model(work, item, results)
    # init_distributed refuses to silently switch an initialised parallel layout.
    from oprd_mega.parallel import ParallelLayout, init_distributed

    use_layout(ParallelLayout(tp=2))
    try:
        init_distributed(ParallelLayout(pp=2))
        results["layout_switch_refused"] = False
    except RuntimeError as exc:
        results["layout_switch_refused"] = "already initialised with TP2PP1" in str(exc)
    if dist.get_rank() == 0:
        (work / "results.json").write_text(json.dumps(results, indent=1))
    from oprd_mega.parallel import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main()
