"""torchrun worker (3 processes): one conversion at TP1 padding, loaded at TP3.

Usage: tp3_worker.py WORKDIR. Writes WORKDIR/results.json on rank 0. Tiny models with 6 heads,
3 KV heads and 1,000 tokens: converted with the default padding (1,024 rows, which 3 does not
divide), built at TP3 with 1,152 rows (a multiple of 128 x 3), then compared with
transformers, gathered, saved at TP3 and loaded back at TP1.
"""

import faulthandler
import io
import json
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path

faulthandler.dump_traceback_later(int(os.environ.get("OPRD_TEST_HANG_S", "600")), exit=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # repo root: tools.tiny_hf_models

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.convert.workers.parity_worker import (  # noqa: E402
    all_ranks_true,
    load_all,
    params_of,
    use_layout,
)

SHAPES = {"num_key_value_heads": 3, "intermediate_size": 192}
ITEMS = [("llama", False), ("qwen2", True)]
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def run_item(work: Path, family: str, tied: bool) -> dict:
    from oprd_mega.convert.convert import hf_to_mcore, mcore_to_hf
    from oprd_mega.convert.gather import gather_hf_weights
    from oprd_mega.convert.hf_io import HFCheckpointReader
    from oprd_mega.convert.mcore_io import (
        FORMAT_FILE,
        global_parameters,
        load_hf_weights,
        load_mcore_checkpoint,
        read_mcore_args,
        save_mcore_checkpoint,
    )
    from oprd_mega.convert.verify import hf_outputs, random_tokens, verify
    from oprd_mega.models import build_gpt_model
    from oprd_mega.parallel import ParallelLayout
    from tools.tiny_hf_models import make_tiny_model

    base = work / f"{family}-{'tied' if tied else 'untied'}"
    use_layout(ParallelLayout())
    rank = dist.get_rank()
    if rank == 0:
        make_tiny_model(family, base / "hf", tied=tied, seed=3, **SHAPES)
    dist.barrier()
    out: dict = {}
    hf_to_mcore(base / "hf", base / "mcore", progress=False)
    args = read_mcore_args(base / "mcore")
    out["stored"] = [args.make_vocab_size_divisible_by, args.padded_vocab_size]

    # verify at TP3 against transformers' own forward (the independent reference)
    use_layout(ParallelLayout(tp=3))
    tokens = random_tokens(args, 2, 16, seed=1)
    reference = hf_outputs(base / "hf", tokens, torch.float32) if rank == 0 else None
    diffs = verify(base / "hf", base / "mcore", batch=2, seq_len=16, seed=1, hf_reference=reference)
    if rank == 0:
        out["diffs"] = {d.name: [d.max_abs, d.max_rel] for d in diffs}

    # what each rank holds: 384 rows, the real ones equal to the HF file's, the rest zero
    model = build_gpt_model(args)
    load_mcore_checkpoint(model, base / "mcore")
    hf = load_all(base / "hf")
    embed = hf["model.embed_tokens.weight"]
    head = embed if tied else hf["lm_head.weight"]
    rows_ok = True
    local_rows = []
    for name, param in global_parameters(model).items():
        if name not in VOCAB_TENSORS:
            continue
        full = embed if name.startswith("embedding") else head
        first = rank * param.shape[0]
        real = max(min(args.vocab_size - first, param.shape[0]), 0)
        local_rows.append(int(param.shape[0]))
        rows_ok = rows_ok and torch.equal(param[:real], full[first : first + real])
        rows_ok = rows_ok and bool(torch.count_nonzero(param[real:]) == 0)
    out["local_rows"] = sorted(set(local_rows))
    out["rows_real_and_zero_padding"] = all_ranks_true(rows_ok)

    # the HF weights loaded straight into the TP3 model equal the checkpoint's
    direct = build_gpt_model(args)
    load_hf_weights(direct, args, HFCheckpointReader(base / "hf"))
    a, b = params_of(model), params_of(direct)
    out["hf_load_equals_checkpoint_load"] = all_ranks_true(
        sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    )

    # gathered at TP3 (weight sync, export): the HF files bit for bit, padding stripped
    gathered = dict(gather_hf_weights(model, args))
    if rank == 0:
        out["gathered_bit_exact"] = sorted(gathered) == sorted(hf) and all(
            torch.equal(gathered[k], hf[k]) for k in hf
        )

    # saved at TP3: records the padding it holds; loads at TP1 (rows dropped) with the weights
    # of the original conversion, and exports to the original files
    save_mcore_checkpoint(model, args, base / "mcore_tp3", hf_source=base / "hf")
    recorded = json.loads((base / "mcore_tp3" / FORMAT_FILE).read_text())
    out["recorded_tp3"] = [recorded["make_vocab_size_divisible_by"], recorded["padded_vocab_size"]]
    use_layout(ParallelLayout())
    weights = []
    for checkpoint in ("mcore", "mcore_tp3"):
        other = build_gpt_model(args)
        load_mcore_checkpoint(other, base / checkpoint)
        weights.append(params_of(other))
    out["tp1_rows"] = int(weights[0]["embedding.word_embeddings.weight"].shape[0])
    out["tp3_checkpoint_loads_at_tp1_exactly"] = all_ranks_true(
        sorted(weights[0]) == sorted(weights[1])
        and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    )
    mcore_to_hf(base / "mcore_tp3", base / "hf_back", progress=False)
    if rank == 0:
        back = load_all(base / "hf_back")
        out["export_bit_exact"] = sorted(back) == sorted(hf) and all(
            torch.equal(back[k], hf[k]) for k in hf
        )
    return out


def main() -> None:
    work = Path(sys.argv[1])
    results = {}
    for family, tied in ITEMS:
        results[f"{family}-{'tied' if tied else 'untied'}"] = run_item(work, family, tied)
    # the command line a user runs: verify --tp 3 on the conversion (it ends the process group)
    from oprd_mega.convert.cli import main as convert_main
    from oprd_mega.parallel import reset_model_parallel

    reset_model_parallel()
    base = work / "llama-untied"
    printed = io.StringIO()
    with redirect_stdout(printed):
        status = convert_main(
            ["verify", "--hf", str(base / "hf"), "--mcore", str(base / "mcore"), "--tp", "3"]
        )
    results["cli"] = {"status": status, "printed": printed.getvalue()}
    if int(os.environ["RANK"]) == 0:
        (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
