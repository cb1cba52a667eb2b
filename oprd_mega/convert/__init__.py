"""Checkpoint conversion and the HF <-> Megatron name/layout mapping (one per family).

``hf_to_mcore_state`` / ``mcore_to_hf_state`` are the single mapping used by conversion,
weight sync and export; ``hf_to_mcore`` / ``mcore_to_hf`` convert whole checkpoints.
"""

from oprd_mega.convert.hf_io import CheckpointError, HFCheckpointReader
from oprd_mega.convert.mapping import (
    get_mapping,
    hf_names,
    hf_to_mcore_state,
    mcore_to_hf_state,
    tp_kind,
)

__all__ = [
    "CheckpointError",
    "HFCheckpointReader",
    "get_mapping",
    "hf_names",
    "hf_to_mcore_state",
    "mcore_to_hf_state",
    "tp_kind",
]
