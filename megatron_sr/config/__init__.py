"""Typed configurations, passed explicitly to the parts that use them, and the
Megatron-LM-style command line that fills them.

- `flags`: `flag(...)`, a dataclass field that declares its flag, help and range,
  and the parser generation from such fields.
- `model`, `parallel`, `optimizer`, `data`, `training`: the config dataclasses
  (`parallel` also holds `validate_parallel_layout`); `job`: `JobConfig`, all of
  them for one training job.
- `derived`: values computed from several flags (FFN size, virtual pipeline size,
  --lr-*-samples in iterations, ...); `batch_size`: the global batch size, its
  ramp and schedule, the run length.
- `megatron_flag_table`: reads megatron_flags.csv, every Megatron-LM flag with its
  decision; `megatron_compat`: applies it to the parser (aliases, notices, refusals
  with reasons, not yet implemented).
- `arguments`: `build_parser`, `parse_args`, `job_config_from_args`.

Tests and library users build the dataclasses directly; `parse_args` builds them
from flags. Modules this package imports (`data.gpt_dataset`,
`optimizer.lr_schedules`) import its configs for annotations only.
"""
from megatron_sr.config.model import ModelConfig
from megatron_sr.config.parallel import ParallelConfig, validate_parallel_layout
from megatron_sr.config.optimizer import OptimizerConfig
from megatron_sr.config.data import DataConfig
from megatron_sr.config.training import EXIT_SIGNALS, TrainingConfig
from megatron_sr.config.batch_size import global_batch_size_at
from megatron_sr.config.job import JobConfig
from megatron_sr.config.arguments import build_parser, job_config_from_args, parse_args

__all__ = ["DataConfig", "EXIT_SIGNALS", "JobConfig", "ModelConfig", "OptimizerConfig",
           "ParallelConfig", "TrainingConfig", "build_parser", "global_batch_size_at",
           "job_config_from_args", "parse_args", "validate_parallel_layout"]
