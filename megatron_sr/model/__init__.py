"""The GPT model (`gpt_model`, `transformer`, `norms`), how it spreads over
ranks (`parallel_layout`: chunk placements, build_model, global parameter names,
finalize_model_grads), its parameters as data read from the model built on
`meta` (`parameter_specs`), offline reshaping of its full state dict over
TP/PP ranks (`state_dict_layout`) and export to Hugging Face (`hf_conversion`,
needs `transformers`)."""
from megatron_sr.model.gpt_model import GPTModel, flops_per_token
from megatron_sr.model.parallel_layout import (
    build_model,
    chunk_layers,
    finalize_model_grads,
    initialize_parameters,
    named_parameters_global,
    param_is_unique_in_model,
)
from megatron_sr.model.transformer import KVCache
