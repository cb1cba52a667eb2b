"""One process: checkpoint saves that fail (full disk) or crash leave the previous one usable.

Usage: checkpoint_worker.py WORKDIR HF_DIR; prints one JSON line of results.
"""

import errno
import json
import resource
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # repo root

import torch


def build(hf_dir: Path):
    from oprd_mega.convert.hf_io import HFCheckpointReader
    from oprd_mega.convert.mcore_io import load_hf_weights
    from oprd_mega.distill.options import OptimizerOptions
    from oprd_mega.distill.step import build_optimizer, wrap_student
    from oprd_mega.models import build_gpt_model, load_hf_config

    args = load_hf_config(hf_dir)
    model = build_gpt_model(args)
    load_hf_weights(model, args, HFCheckpointReader(hf_dir))
    ddp = wrap_student(model)
    return ddp, build_optimizer(ddp, OptimizerOptions(lr=1e-2)), args


def take_a_step(model, optimizer) -> None:
    model.zero_grad_buffer()
    optimizer.zero_grad()
    for param in model.parameters():
        param.main_grad.copy_(torch.randn_like(param) * 0.1)
    optimizer.step()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def main() -> None:
    from megatron.core import dist_checkpointing

    from oprd_mega.parallel import ParallelLayout, init_distributed
    from oprd_mega.train import checkpoint as ckpt

    work, hf_dir = Path(sys.argv[1]), Path(sys.argv[2])
    init_distributed(ParallelLayout())
    torch.manual_seed(0)
    model, optimizer, args = build(hf_dir)
    root = work / "ckpt"

    def state(step: int):
        return ckpt.TrainerState(step, {"epoch": 0}, f"v{step}", {"tp": 1, "pp": 1}, {})

    take_a_step(model, optimizer)
    ckpt.save_checkpoint(root, state(1), model, optimizer, args, hf_dir, keep_last=3)
    saved = snapshot(model)
    saved_opt = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    take_a_step(model, optimizer)

    # A full disk in the middle of the save (after the model part is written).
    real_save = dist_checkpointing.save

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    dist_checkpointing.save = full_disk
    message = None
    try:
        ckpt.save_checkpoint(root, state(2), model, optimizer, args, hf_dir, keep_last=3)
    except ckpt.CheckpointError as exc:
        message = str(exc)
    finally:
        dist_checkpointing.save = real_save

    # A crash after a step directory was created but before it was complete, with `latest`
    # already naming it (the worst order of events).
    (root / "step-00000003" / "model").mkdir(parents=True)
    (root / "latest").write_text("step-00000003\n")
    latest = ckpt.find_latest(root)

    fresh, fresh_opt, _ = build(hf_dir)
    loaded = ckpt.load_checkpoint(latest, fresh, fresh_opt)

    # A real write failure inside torch DCP (a file-size limit: EFBIG), which DCP raises as
    # its BaseException-derived CheckpointException.
    limited = work / "limited"
    ckpt.save_checkpoint(limited, state(1), model, optimizer, args, hf_dir, keep_last=3)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    limit_message = None
    try:
        ckpt.save_checkpoint(limited, state(2), model, optimizer, args, hf_dir, keep_last=3)
    except ckpt.CheckpointError as exc:
        limit_message = str(exc)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    # Resume falls back from a damaged newest checkpoint (a truncated .distcp file) to the
    # newest intact one and names the damaged one.
    ckpt.save_checkpoint(root, state(4), model, optimizer, args, hf_dir, keep_last=3)
    shard = sorted((root / "step-00000004" / "model").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    reports: list[str] = []
    again, again_opt, _ = build(hf_dir)
    fallback, _ = ckpt.load_newest_intact(
        ckpt.resume_candidates(root), again, again_opt, lambda p, s: None, reports.append
    )
    got = snapshot(fresh)
    got_opt = fresh_opt.state_dict()["state"][0]
    print(
        "RESULT "
        + json.dumps(
            {
                "message": message,
                "entries": sorted(p.name for p in root.iterdir()),
                "latest": latest.name,
                "loaded_step": loaded.step,
                "params_equal": all(torch.equal(got[n], saved[n]) for n in saved),
                "changed_since": any(
                    not torch.equal(p.detach(), saved[n]) for n, p in model.named_parameters()
                ),
                "optimizer_equal": all(torch.equal(got_opt[k], v) for k, v in saved_opt.items()),
                "limit_message": limit_message,
                "limited_entries": sorted(p.name for p in limited.iterdir()),
                "fallback": fallback.name,
                "truncated": str(shard),
                "reports": reports,
                "fallback_equal": all(
                    torch.equal(p.detach(), saved[n]) for n, p in again.named_parameters()
                ),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
