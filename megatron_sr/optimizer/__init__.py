"""megatron_sr.optimizer"""
