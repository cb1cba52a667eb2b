"""The training configuration: one typed, validated object read from YAML plus overrides."""

from oprd_mega.config.against_models import check_models
from oprd_mega.config.diff import config_diff
from oprd_mega.config.errors import ConfigError
from oprd_mega.config.loader import (
    apply_override,
    dump_config,
    load_config,
    to_yaml,
    validate_config,
)
from oprd_mega.config.schema import TrainConfig, check_paths, data_parallel_size

__all__ = [
    "ConfigError",
    "TrainConfig",
    "apply_override",
    "check_models",
    "check_paths",
    "config_diff",
    "data_parallel_size",
    "dump_config",
    "load_config",
    "to_yaml",
    "validate_config",
]
