"""OPRD-Bridge stage 1 building blocks: teacher statistics, P_T/mu_T, P_S fits, the bridge file,
and cross-tokenizer position alignment (METHOD.md, "bridge").

The end-to-end tool over Megatron models is :mod:`oprd_mega.bridge.build`
(``tools/build_bridge.py``); it is not imported here, so the building blocks load without
Megatron. Neither is :mod:`oprd_mega.bridge.loaded` (a bridge file read and checked for
training, handed to the distillation step as plain tensors).
"""

from .alignment import AlignmentError, align_last_character
from .covariance import StreamingCovariance, all_reduce_covariance
from .file import (
    BridgeFile,
    BridgeMetadata,
    BridgeMismatchError,
    ModelIdentity,
    check_bridge_models,
    config_hash,
    load_bridge_file,
    save_bridge_file,
)
from .sampling import DEFAULT_MAX_ROWS, RowSelection, select_rows
from .student_map import FitConfig, FitResult, StudentMap, fit_student_map, mean_cosine
from .subspace import Subspace, principal_subspace, sweep_ranks
from .sweep import RankFit, fit_sweep, format_report

__all__ = [
    "DEFAULT_MAX_ROWS",
    "AlignmentError",
    "BridgeFile",
    "BridgeMetadata",
    "BridgeMismatchError",
    "FitConfig",
    "FitResult",
    "ModelIdentity",
    "RankFit",
    "RowSelection",
    "StreamingCovariance",
    "StudentMap",
    "Subspace",
    "align_last_character",
    "all_reduce_covariance",
    "check_bridge_models",
    "config_hash",
    "fit_student_map",
    "fit_sweep",
    "format_report",
    "load_bridge_file",
    "mean_cosine",
    "principal_subspace",
    "save_bridge_file",
    "select_rows",
    "sweep_ranks",
]
