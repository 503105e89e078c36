"""megatron_sr.recipes: what is trained, as Megatron-LM's providers (the model
chunk, the forward step and its loss, the datasets) that `pretrain` runs.

- `gpt`: the GPT of `megatron_sr.model.GPTModel` on Megatron GPT datasets;
  pretrain_gpt.py imports it, and `pretrain` takes it where a provider is None.
"""
