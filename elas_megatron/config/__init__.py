"""Configuration: the dataclass schema and the YAML/CLI loader."""
from elas_megatron.config.loader import config_from_dict, config_to_dict, dump_config, load_config
from elas_megatron.config.schema import (CheckpointConfig, Config, ConfigError, DataConfig, LogConfig, ModelConfig,
                                         OptimConfig, ParallelConfig, TrainConfig, validate)

__all__ = ["Config", "ConfigError", "ModelConfig", "ParallelConfig", "OptimConfig", "DataConfig", "TrainConfig",
           "CheckpointConfig", "LogConfig", "load_config", "dump_config", "config_to_dict", "config_from_dict",
           "validate"]
