"""megatron_sr.optimizer: the standalone `AdamW` (any PyTorch loop, every precision
strategy); the training job's ZeRO-1 `distributed_optimizer` over the flat buffers of
`param_buffer`; the learning-rate schedules of `lr_schedules`."""
from megatron_sr.optimizer.adamw import AdamW

__all__ = ["AdamW"]
