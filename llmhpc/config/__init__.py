"""Typed, validated configuration (Hydra + OmegaConf structured configs)."""

from llmhpc.config.load import all_keys, from_yaml, load_config, to_dict, to_yaml
from llmhpc.config.schema import (
    Config,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    RopeScalingConfig,
    RunConfig,
    TrainerConfig,
    WandbConfig,
)
from llmhpc.config.validate import ConfigError, validate

__all__ = [
    "Config", "ConfigError", "DataConfig", "LoggerConfig", "ModelConfig", "ParallelConfig", "PrecisionConfig",
    "RopeScalingConfig", "RunConfig", "TrainerConfig", "WandbConfig", "all_keys", "from_yaml", "load_config",
    "to_dict", "to_yaml", "validate",
]
