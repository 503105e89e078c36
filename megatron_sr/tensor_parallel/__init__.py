"""megatron_sr.tensor_parallel"""
