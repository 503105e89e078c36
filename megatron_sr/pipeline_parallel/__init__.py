"""megatron_sr.pipeline_parallel"""
