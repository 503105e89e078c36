"""The GPT model (`gpt_model`, `transformer`, `norms`) and how it spreads over
ranks (`parallel_layout`: build_model, global parameter names, finalize_model_grads)."""
from megatron_sr.model.gpt_model import GPTModel, flops_per_token
from megatron_sr.model.parallel_layout import (
    build_model,
    finalize_model_grads,
    initialize_parameters,
    named_parameters_global,
    param_is_unique_in_model,
)
