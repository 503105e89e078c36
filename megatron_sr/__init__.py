"""megatron_sr: Megatron-style GPT pretraining in pure BF16 with stochastic rounding."""

__version__ = "0.1.0"
