"""Typed, validated settings: `config.json` (TrainingConfig) + `multidatabackend.json` (DatasetConfig).

`load_config` reports every problem of both files at once as a `ConfigError`, before any heavy work.
"""

from longcat_train.config.datasets import DatasetConfig, TextEmbedsConfig, VideoOptions
from longcat_train.config.loading import LoadedConfig, load_config, resolve_path
from longcat_train.config.model_paths import default_checkpoint_dir, longcat_home
from longcat_train.config.problems import ConfigError, ConfigProblem
from longcat_train.config.rules import check_frames, parse_resolution
from longcat_train.config.training import DEFAULT_LORA_TARGETS, TrainingConfig

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "ConfigError",
    "ConfigProblem",
    "DatasetConfig",
    "LoadedConfig",
    "TextEmbedsConfig",
    "TrainingConfig",
    "VideoOptions",
    "check_frames",
    "default_checkpoint_dir",
    "load_config",
    "longcat_home",
    "parse_resolution",
    "resolve_path",
]
