"""Text generation from a GPT held on one pipeline stage, any TP size:
`generate` (with or without a KV cache) and the sampling rule it applies
(`sample_next_tokens`)."""
from megatron_sr.inference.generation import generate
from megatron_sr.inference.sampling import sample_next_tokens
