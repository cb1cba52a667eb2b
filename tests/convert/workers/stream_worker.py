"""torchrun worker (2 processes): streamed ``hf_to_mcore`` against a save of the built model.

Usage: stream_worker.py WORKDIR PLAN_JSON. Writes WORKDIR/results.json on rank 0.
PLAN_JSON: [{"family": ..., "tied": bool}, ...]
"""

import faulthandler
import json
import os
import sys
from pathlib import Path

faulthandler.dump_traceback_later(int(os.environ.get("OPRD_TEST_HANG_S", "600")), exit=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # repo root: tools.tiny_hf_models

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def storage_metadata(directory: Path) -> dict[str, list]:
    """Every entry of the torch DCP metadata: tensors as [shape, dtype], objects as ["bytes"]."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(directory)).read_metadata()
    out = {}
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            out[key] = [list(entry.size), str(entry.properties.dtype)]
        else:
            out[key] = [type(entry).__name__]
    return out


def tensors_metadata(directory: Path) -> dict[str, list]:
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(directory))
    return {k: [list(v.global_shape), str(v.dtype)] for k, v in metadata.items()}


def read_all(args, directory: Path) -> dict[str, torch.Tensor]:
    from oprd_mega.convert.mcore_io import read_checkpoint_layers

    out = {}
    for _, tensors in read_checkpoint_layers(args, directory):
        out.update(tensors)
    return out


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def compare(args, old: Path, new: Path) -> dict:
    """Collective: how the streamed checkpoint ``new`` differs from the model-built ``old``."""
    old_tensors, new_tensors = read_all(args, old), read_all(args, new)
    if dist.get_rank() != 0:
        return {}
    return {
        "storage_old": storage_metadata(old),
        "storage_new": storage_metadata(new),
        "tensors_old": tensors_metadata(old),
        "tensors_new": tensors_metadata(new),
        "read_names_equal": sorted(old_tensors) == sorted(new_tensors),
        "read_bad": [
            name
            for name, tensor in old_tensors.items()
            if name not in new_tensors
            or new_tensors[name].dtype != tensor.dtype
            or not torch.equal(new_tensors[name], tensor)
        ],
        "common_equal": torch.load(old / "common.pt", weights_only=False)
        == torch.load(new / "common.pt", weights_only=False),
        "format_equal": (old / "oprd_checkpoint.json").read_text()
        == (new / "oprd_checkpoint.json").read_text(),
        "files_old": [f for f in listing(old) if not f.endswith(".distcp")],
        "files_new": [f for f in listing(new) if not f.endswith(".distcp")],
        "data_files_new": [f for f in listing(new) if f.endswith(".distcp")],
        "left_in_parent": sorted(p.name for p in new.parent.iterdir() if ".tmp-" in p.name),
    }


def strict_load_equal(args, model_from_hf, directory: Path) -> bool:
    """Load ``directory`` strictly into a fresh model: every parameter equals the HF-loaded one."""
    from oprd_mega.convert.mcore_io import global_parameters, load_mcore_checkpoint
    from oprd_mega.models import build_gpt_model

    model = build_gpt_model(args)
    load_mcore_checkpoint(model, directory)
    got, want = global_parameters(model), global_parameters(model_from_hf)
    same = sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)
    flag = torch.tensor([0 if same else 1])
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def model_name(item: dict) -> str:
    return f"{item['family']}-{'tied' if item['tied'] else 'untied'}"


def run_model(work: Path, item: dict) -> dict:
    from oprd_mega.convert.convert import hf_to_mcore
    from oprd_mega.convert.hf_io import HFCheckpointReader
    from oprd_mega.convert.mcore_io import load_hf_weights, read_mcore_args, save_mcore_checkpoint
    from oprd_mega.models import build_gpt_model
    from tools.tiny_hf_models import make_tiny_model

    name = model_name(item)
    base = work / name
    if dist.get_rank() == 0:
        make_tiny_model(item["family"], base / "hf", tied=item["tied"], seed=len(name))
    dist.barrier()
    hf_to_mcore(base / "hf", base / "new" / "mcore", progress=False)
    args = read_mcore_args(base / "new" / "mcore")
    model = build_gpt_model(args)
    load_hf_weights(model, args, HFCheckpointReader(base / "hf"))
    save_mcore_checkpoint(model, args, base / "old" / "mcore", hf_source=base / "hf")
    out = compare(args, base / "old" / "mcore", base / "new" / "mcore")
    out["strict_load_equal"] = strict_load_equal(args, model, base / "new" / "mcore")
    return out


def failing_read(base: Path) -> dict:
    """Rank 0 fails to read layer 1: every rank raises, nothing is left behind."""
    from oprd_mega.convert.hf_io import HFCheckpointReader
    from oprd_mega.convert.mcore_io import read_mcore_args
    from oprd_mega.convert.mcore_stream import save_hf_as_mcore_checkpoint

    hf = base / "hf"
    args = read_mcore_args(base / "new" / "mcore")
    reader = HFCheckpointReader(hf)
    real_get = reader.get

    def get(name: str) -> torch.Tensor:
        if ".layers.1." in name:
            raise OSError("disk on fire")
        return real_get(name)

    reader.get = get
    target = base / "failed" / "mcore"
    try:
        save_hf_as_mcore_checkpoint(args, reader, target, hf_source=hf)
        error = ""
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return {
        "errors": errors,
        "target_exists": target.exists(),
        "left_in_parent": sorted(p.name for p in target.parent.iterdir()),
    }


def main() -> None:
    from oprd_mega.parallel import ParallelLayout, destroy_distributed, init_distributed

    init_distributed(ParallelLayout())
    work, plan = Path(sys.argv[1]), json.loads(sys.argv[2])
    results = {}
    for item in plan:
        results[model_name(item)] = run_model(work, item)
    results["failing_read"] = failing_read(work / model_name(plan[0]))
    if dist.get_rank() == 0:
        (work / "results.json").write_text(json.dumps(results, indent=1))
    destroy_distributed()


if __name__ == "__main__":
    main()
