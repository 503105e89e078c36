"""megatron_sr.data"""
