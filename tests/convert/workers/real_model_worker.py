"""torchrun worker: verify one converted real model at several layouts against transformers.

Usage: real_model_worker.py HF_DIR MCORE_DIR OUT_JSON LAYOUTS_JSON (``[[tp, pp], ...]``).
transformers' forward runs once on rank 0 (the reference for every layout); rank 0 writes
``{"TP3PP1": {"layer 1": [max_abs, max_rel], ...}, ...}``.
"""

import faulthandler
import json
import os
import sys
from pathlib import Path

faulthandler.dump_traceback_later(int(os.environ.get("OPRD_TEST_HANG_S", "600")), exit=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.convert.workers.parity_worker import use_layout  # noqa: E402

SEQ_LEN = 24


def main() -> None:
    from oprd_mega.convert.mcore_io import read_mcore_args
    from oprd_mega.convert.verify import hf_outputs, random_tokens, verify
    from oprd_mega.parallel import ParallelLayout, destroy_distributed

    hf_dir, mcore_dir, out_file = (Path(a) for a in sys.argv[1:4])
    layouts = json.loads(sys.argv[4])
    use_layout(ParallelLayout())
    args = read_mcore_args(mcore_dir)
    tokens = random_tokens(args, 2, SEQ_LEN, seed=3)
    reference = hf_outputs(hf_dir, tokens, torch.float32) if dist.get_rank() == 0 else None
    results = {}
    for tp, pp in layouts:
        layout = ParallelLayout(tp=tp, pp=pp)
        use_layout(layout)
        diffs = verify(hf_dir, mcore_dir, batch=2, seq_len=SEQ_LEN, seed=3, hf_reference=reference)
        if dist.get_rank() == 0:
            results[str(layout)] = {d.name: [d.max_abs, d.max_rel] for d in diffs}
    if dist.get_rank() == 0:
        out_file.write_text(json.dumps(results, indent=1))
    destroy_distributed()


if __name__ == "__main__":
    main()
