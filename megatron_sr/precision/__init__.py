"""megatron_sr.precision"""
