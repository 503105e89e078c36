"""megatron_sr.optimizer: the standalone AdamW (and, later, the distributed optimizer)."""
from megatron_sr.optimizer.adamw import AdamW

__all__ = ["AdamW"]
