"""Peak memory growth of one ``hf_to_mcore`` conversion (a world of one, no torchrun).

Usage: memory_worker.py HF_DIR MCORE_DIR [--built-model]. Prints, as the last line, the JSON
``{"anon_mib": ..., "rss_mib": ...}``: the peak growth of anonymous resident memory (the tensors
this process holds) and of all resident memory (also counting the HF files' mapped pages, which
the kernel may drop at any time), sampled every millisecond from the start of the conversion.
``--built-model`` runs the former path (build the model, load it, save it) for comparison.
"""

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def resident_kib() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "VmRSS"):
                fields[name] = int(value.split()[0])
    return fields


class PeakSampler(threading.Thread):
    """Keeps the highest ``resident_kib`` values seen until :meth:`stop`."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = resident_kib()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            now = resident_kib()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            time.sleep(0.001)

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.join()
        return self.peak


def convert_with_built_model(hf_dir: Path, mcore_dir: Path) -> None:
    from oprd_mega.convert.hf_io import HFCheckpointReader
    from oprd_mega.convert.mcore_io import load_hf_weights, save_mcore_checkpoint
    from oprd_mega.models import build_gpt_model
    from oprd_mega.models.hf_config import load_hf_config

    args = load_hf_config(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    model = build_gpt_model(args, params_dtype=reader.validate(args))
    load_hf_weights(model, args, reader)
    save_mcore_checkpoint(model, args, mcore_dir, hf_source=hf_dir)


def main() -> None:
    from oprd_mega.convert.convert import hf_to_mcore
    from oprd_mega.parallel import ParallelLayout, destroy_distributed, init_distributed

    hf_dir, mcore_dir = Path(sys.argv[1]), Path(sys.argv[2])
    init_distributed(ParallelLayout())  # start-up costs are not the conversion's
    start = resident_kib()
    sampler = PeakSampler()
    sampler.start()
    if "--built-model" in sys.argv:
        convert_with_built_model(hf_dir, mcore_dir)
    else:
        hf_to_mcore(hf_dir, mcore_dir, progress=False)
    peak = sampler.stop()
    destroy_distributed()
    growth = {
        "anon_mib": round((peak["RssAnon"] - start["RssAnon"]) / 1024, 1),
        "rss_mib": round((peak["VmRSS"] - start["VmRSS"]) / 1024, 1),
    }
    print(json.dumps(growth))


if __name__ == "__main__":
    main()
