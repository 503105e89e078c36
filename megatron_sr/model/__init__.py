"""megatron_sr.model"""
