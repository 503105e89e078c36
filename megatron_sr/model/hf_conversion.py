"""Export of a full GPT state dict to a Hugging Face `transformers` model directory.

Input: the FULL state dict (TP=1, PP=1, keyed by global parameter names; see
`megatron_sr.model.state_dict_layout`) and the model's `ModelConfig`. Output:
a directory with config.json and model.safetensors that
`AutoModelForCausalLM.from_pretrained` loads into a model computing the same
logits as ours (same padded vocabulary size; the tokenizer files are the
caller's). Three families can express our models:

- GPT-2 (`GPT2LMHeadModel`): learned absolute positions, LayerNorm, GeLU
  (exact, erf). HF's Conv1D stores weights [in, out], the transpose of ours;
  its fused c_attn is [q; k; v] over all heads, ours groups rows per head as
  (q, k, v). GPT-2 always has biases: a model without them exports zeros.
- Llama (`LlamaForCausalLM`): RoPE, RMSNorm, SwiGLU, tied or not; biases
  become attention_bias / mlp_bias; grouped-query attention becomes
  num_key_value_heads (our fused qkv rows are per query group: the group's
  q heads, then its k, then its v); --use-rope-scaling becomes the "llama3"
  rope type; --apply-layernorm-1p norms export gamma = weight + 1. Our RoPE
  rotates the two halves of each head ("rotate half"), as HF Llama does, so
  q and k rows need no permutation; with --rotary-interleaved each head's
  q and k rows are reordered (even features, then odd), which turns the
  interleaved pairs into halves and leaves q . k unchanged.
  --qk-layernorm and --rotary-percent < 1 have no Llama equivalent.
- Qwen2 (`Qwen2ForCausalLM`): a Llama whose q/k/v projections alone have
  biases, i.e. ours with --disable-bias-linear --add-qkv-bias; the same tensor
  names and conversions as Llama. Its sliding-window attention is not ours
  (imports refuse it).

Anything else (e.g. RoPE with LayerNorm, GeLU with RoPE) raises
`UnsupportedArchitectureError` naming the flags that differ from the nearest
family. `transformers` (and `safetensors`) are imported only when exporting.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch

from megatron_sr.config import ModelConfig
from megatron_sr.model.state_dict_layout import check_parameter_names, global_parameter_names

FAMILIES = {
    "gpt2": {"position_embedding_type": "learned_absolute", "normalization": "LayerNorm",
             "activation": "gelu"},
    "llama": {"position_embedding_type": "rope", "normalization": "RMSNorm",
              "activation": "swiglu"},
}
_FLAGS = {"position_embedding_type": "--position-embedding-type",
          "normalization": "--normalization", "activation": "--swiglu (activation)"}


class UnsupportedArchitectureError(ValueError):
    """The model config matches no Hugging Face family this module writes."""


def hf_family(config: ModelConfig) -> str:
    """'gpt2', 'llama' or 'qwen2' (a Llama with biases on q/k/v only);
    UnsupportedArchitectureError otherwise."""
    mismatches = {}
    for family, wanted in FAMILIES.items():
        mismatches[family] = [f"{_FLAGS[field]} is {getattr(config, field)!r}, {family} needs "
                              f"{value!r}" for field, value in wanted.items()
                              if getattr(config, field) != value]
        if not mismatches[family]:
            qkv_bias_only = family == "llama" and config.qkv_bias and not config.add_bias_linear
            return "qwen2" if qkv_bias_only else family
    nearest = min(mismatches, key=lambda family: len(mismatches[family]))
    raise UnsupportedArchitectureError(
        f"cannot export to Hugging Face: the model matches neither GPT-2 (learned_absolute "
        f"positions, LayerNorm, gelu) nor Llama (rope, RMSNorm, swiglu); nearest is {nearest}: "
        + "; ".join(mismatches[nearest]))


def hf_config_kwargs(config: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(family, keyword arguments of its transformers config class). Token ids
    (bos, eos) are left unset: they belong to the tokenizer, not the model."""
    family = hf_family(config)
    tied = not config.untie_embeddings_and_output_weights
    _check_llama_extras(config, family)
    if family == "gpt2":
        return family, dict(
            vocab_size=config.vocab_size, n_positions=config.max_position_embeddings,
            n_embd=config.hidden_size, n_layer=config.num_layers,
            n_head=config.num_attention_heads, n_inner=config.ffn_hidden_size,
            activation_function="gelu", layer_norm_epsilon=config.layernorm_epsilon,
            resid_pdrop=config.hidden_dropout, embd_pdrop=config.hidden_dropout,
            attn_pdrop=config.attention_dropout, initializer_range=config.init_method_std,
            tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None)
    biases = {} if family == "qwen2" else dict(attention_bias=config.add_bias_linear,
                                               mlp_bias=config.add_bias_linear)
    return family, dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups, head_dim=config.head_dim,
        hidden_act="silu", max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.layernorm_epsilon, tie_word_embeddings=tied,
        rope_parameters=_llama_rope_parameters(config), **biases,
        attention_dropout=config.attention_dropout, initializer_range=config.init_method_std,
        bos_token_id=None, eos_token_id=None)


def _check_llama_extras(config: ModelConfig, family: str) -> None:
    """Options outside the GPT-2 / Llama families' three defining fields."""
    unsupported = []
    if config.qk_layernorm:
        unsupported.append("--qk-layernorm")
    if config.rotary_percent != 1.0:
        unsupported.append(f"--rotary-percent {config.rotary_percent}")
    if family == "gpt2":
        if config.num_query_groups != config.num_attention_heads:
            unsupported.append("--group-query-attention")
        if config.head_dim * config.num_attention_heads != config.hidden_size:
            unsupported.append(f"--kv-channels {config.head_dim}")
        if config.apply_layernorm_1p:
            unsupported.append("--apply-layernorm-1p")
    if unsupported:
        raise UnsupportedArchitectureError(
            f"cannot export to Hugging Face {family}: {', '.join(unsupported)} has no "
            f"equivalent there")


def _llama_rope_parameters(config: ModelConfig) -> dict[str, Any]:
    if not config.use_rope_scaling:
        return {"rope_type": "default", "rope_theta": config.rotary_base}
    return {"rope_type": "llama3", "rope_theta": config.rotary_base,
            "factor": config.rope_scaling_factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _split_qkv(tensor: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Our fused rows [(heads + 2 groups) x d, ...], per query group (its q
    heads, k, v) -> q [heads x d, ...], k, v [groups x d, ...], head-major."""
    heads, groups, d = config.num_attention_heads, config.num_query_groups, config.head_dim
    rest = tensor.shape[1:]
    grouped = tensor.reshape(groups, heads // groups + 2, d, *rest)
    q = grouped[:, :heads // groups].reshape(heads, d, *rest)
    k, v = grouped[:, -2], grouped[:, -1]  # [groups, d, ...]
    if config.rotary_interleaved:  # feature order (0, 2, 4, ..., 1, 3, ...) per head
        order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
        q, k = q[:, order], k[:, order]
    return q.reshape(heads * d, *rest), k.reshape(groups * d, *rest), v.reshape(groups * d, *rest)


def _norm_weight(state: Mapping[str, torch.Tensor], name: str, config: ModelConfig):
    """gamma of a norm: the stored weight, + 1 under --apply-layernorm-1p."""
    return state[name] + 1 if config.apply_layernorm_1p else state[name]


def _gpt2_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig):
    dtype = state["embedding.word_embeddings.weight"].dtype

    def bias(name: str, size: int) -> torch.Tensor:
        return state[name] if name in state else torch.zeros(size, dtype=dtype)

    h, f = config.hidden_size, config.ffn_hidden_size
    out = {"transformer.wte.weight": state["embedding.word_embeddings.weight"],
           "transformer.wpe.weight": state["embedding.position_embeddings.weight"],
           "transformer.ln_f.weight": state["decoder.final_layernorm.weight"],
           "transformer.ln_f.bias": state["decoder.final_layernorm.bias"]}
    for i in range(config.num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"transformer.h.{i}."
        qkv_bias = bias(ours + "self_attention.linear_qkv.bias", 3 * h)
        out.update({
            theirs + "ln_1.weight": state[ours + "input_layernorm.weight"],
            theirs + "ln_1.bias": state[ours + "input_layernorm.bias"],
            theirs + "attn.c_attn.weight": torch.cat(
                _split_qkv(state[ours + "self_attention.linear_qkv.weight"], config)).t(),
            theirs + "attn.c_attn.bias": torch.cat(_split_qkv(qkv_bias, config)),
            theirs + "attn.c_proj.weight": state[ours + "self_attention.linear_proj.weight"].t(),
            theirs + "attn.c_proj.bias": bias(ours + "self_attention.linear_proj.bias", h),
            theirs + "ln_2.weight": state[ours + "pre_mlp_layernorm.weight"],
            theirs + "ln_2.bias": state[ours + "pre_mlp_layernorm.bias"],
            theirs + "mlp.c_fc.weight": state[ours + "mlp.linear_fc1.weight"].t(),
            theirs + "mlp.c_fc.bias": bias(ours + "mlp.linear_fc1.bias", f),
            theirs + "mlp.c_proj.weight": state[ours + "mlp.linear_fc2.weight"].t(),
            theirs + "mlp.c_proj.bias": bias(ours + "mlp.linear_fc2.bias", h),
        })
    if config.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = state["output_layer.weight"]
    return out


def _suffixes(with_bias: bool) -> list[str]:
    return ["weight", "bias"] if with_bias else ["weight"]


def _llama_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig):
    """Llama's (and Qwen2's: the same names) state dict from ours."""
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": _norm_weight(state, "decoder.final_layernorm.weight", config)}
    for i in range(config.num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = _norm_weight(
            state, ours + "input_layernorm.weight", config)
        out[theirs + "post_attention_layernorm.weight"] = _norm_weight(
            state, ours + "pre_mlp_layernorm.weight", config)
        for suffix in _suffixes(config.qkv_bias):
            q, k, v = _split_qkv(state[ours + "self_attention.linear_qkv." + suffix], config)
            out.update({theirs + "self_attn.q_proj." + suffix: q,
                        theirs + "self_attn.k_proj." + suffix: k,
                        theirs + "self_attn.v_proj." + suffix: v})
        for suffix in _suffixes(config.add_bias_linear):
            gate, up = state[ours + "mlp.linear_fc1." + suffix].chunk(2, dim=0)
            out.update({
                theirs + "self_attn.o_proj." + suffix:
                    state[ours + "self_attention.linear_proj." + suffix],
                theirs + "mlp.gate_proj." + suffix: gate,
                theirs + "mlp.up_proj." + suffix: up,
                theirs + "mlp.down_proj." + suffix: state[ours + "mlp.linear_fc2." + suffix],
            })
    if config.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = state["output_layer.weight"]
    return out


def to_hf_state_dict(full_state: Mapping[str, torch.Tensor], config: ModelConfig,
                     dtype: Optional[torch.dtype] = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(family, HF-named state dict): contiguous tensors that own their storage,
    in `dtype` (default: the input's). A tied model has no "lm_head.weight"
    (transformers ties it on load). Raises UnsupportedArchitectureError, or
    ValueError listing the names when `full_state` is not `config`'s model."""
    family = hf_family(config)
    check_parameter_names("full state dict", list(full_state), global_parameter_names(config))
    convert = _gpt2_state_dict if family == "gpt2" else _llama_state_dict
    hf_state = convert(full_state, config)
    return family, {name: tensor.to(dtype=dtype or tensor.dtype, copy=True,
                                    memory_format=torch.contiguous_format)
                    for name, tensor in hf_state.items()}


def save_hf_model(full_state: Mapping[str, torch.Tensor], config: ModelConfig,
                  directory: str | os.PathLike, *, dtype: Optional[torch.dtype] = None,
                  extra_config: Optional[Mapping[str, Any]] = None) -> str:
    """Writes `directory`/config.json and model.safetensors; returns the family.

    `extra_config`: further transformers config fields (e.g. bos_token_id,
    eos_token_id from the tokenizer). The weights are loaded strictly into a
    transformers model before saving, so a name or shape mismatch raises here.
    """
    try:
        import transformers
    except ImportError as error:
        raise ImportError("save_hf_model needs the `transformers` (>= 5) and `safetensors` "
                          "packages: pip install 'transformers>=5' safetensors") from error
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"save_hf_model needs transformers >= 5 (its Llama config takes "
                          f"rope_parameters), found {transformers.__version__}")
    family, kwargs = hf_config_kwargs(config)
    hf_state = to_hf_state_dict(full_state, config, dtype)[1]
    config_class, model_class = {
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    hf_config = config_class(**{**kwargs, **(extra_config or {})})
    hf_config.dtype = next(iter(hf_state.values())).dtype
    with torch.device("meta"):
        model = model_class(hf_config)
    result = model.load_state_dict(hf_state, strict=False, assign=True)
    tied_head = {"lm_head.weight"} if hf_config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) != tied_head:
        raise RuntimeError(f"save_hf_model: the {family} weights do not fit {model_class.__name__}:"
                           f" missing {sorted(set(result.missing_keys) - tied_head)}, "
                           f"unexpected {result.unexpected_keys}")
    model.tie_weights()
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return family


# ----- import: a Hugging Face model directory -> our full state dict -------------------------

def _merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               config: ModelConfig) -> torch.Tensor:
    """q [heads x d, ...], k, v [groups x d, ...] (head-major) -> our fused rows
    per query group (its q heads, k, v); inverse of `_split_qkv` (without
    --rotary-interleaved, which Hugging Face models do not use)."""
    heads, groups, d = config.num_attention_heads, config.num_query_groups, config.head_dim
    rest = q.shape[1:]
    per_group = q.reshape(groups, heads // groups, d, *rest)
    return torch.cat([per_group, k.reshape(groups, 1, d, *rest), v.reshape(groups, 1, d, *rest)],
                     dim=1).reshape(config.qkv_size, *rest)


def model_config_from_hf(hf_config, *, params_dtype: torch.dtype = torch.bfloat16
                         ) -> tuple[str, ModelConfig]:
    """(family, ModelConfig) of a transformers GPT-2, Llama or Qwen2 config, with
    `vocab_size` the HF one (the caller pads it); num_key_value_heads becomes
    --num-query-groups, a head_dim other than hidden / heads --kv-channels, the
    llama3 rope type --use-rope-scaling, Qwen2's q/k/v biases --add-qkv-bias.
    UnsupportedArchitectureError naming the field for what our model cannot
    express (other rope scalings, another activation, sliding windows)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "gpt2":
        if hf_config.activation_function not in ("gelu", "gelu_new"):
            raise UnsupportedArchitectureError(
                f"GPT-2 activation_function {hf_config.activation_function!r}: only gelu "
                f"(and gelu_new, its tanh approximation) map to our gelu")
        return "gpt2", ModelConfig(
            num_layers=hf_config.n_layer, hidden_size=hf_config.n_embd,
            num_attention_heads=hf_config.n_head, vocab_size=hf_config.vocab_size,
            seq_length=hf_config.n_positions,
            ffn_hidden_size=hf_config.n_inner or 4 * hf_config.n_embd,
            max_position_embeddings=hf_config.n_positions,
            layernorm_epsilon=hf_config.layer_norm_epsilon,
            untie_embeddings_and_output_weights=not hf_config.tie_word_embeddings,
            hidden_dropout=hf_config.resid_pdrop, attention_dropout=hf_config.attn_pdrop,
            init_method_std=hf_config.initializer_range, params_dtype=params_dtype)
    if model_type in ("llama", "qwen2"):
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or \
            hf_config.num_attention_heads
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        llama3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
        if rope_type == "llama3" and any(float(rope.get(key, -1)) != value
                                         for key, value in llama3.items()):
            raise UnsupportedArchitectureError(
                f"Llama rope_parameters {rope}: --use-rope-scaling is Llama 3's scaling with "
                f"{llama3}")
        if rope_type not in ("default", "llama3"):
            raise UnsupportedArchitectureError(f"Llama rope_type {rope_type!r}: only the "
                                               f"default and llama3 RoPE are supported")
        head_dim = getattr(hf_config, "head_dim", None)
        kv_channels = (head_dim if head_dim and head_dim * hf_config.num_attention_heads
                       != hf_config.hidden_size else None)
        if hf_config.hidden_act != "silu":
            raise UnsupportedArchitectureError(f"Llama hidden_act {hf_config.hidden_act!r}: "
                                               f"only silu (SwiGLU) is supported")
        _check_llama_or_qwen2_biases(hf_config, model_type)
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return model_type, ModelConfig(
            num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
            num_attention_heads=hf_config.num_attention_heads,
            vocab_size=hf_config.vocab_size, seq_length=hf_config.max_position_embeddings,
            ffn_hidden_size=hf_config.intermediate_size,
            max_position_embeddings=hf_config.max_position_embeddings,
            position_embedding_type="rope", rotary_base=float(theta), normalization="RMSNorm",
            layernorm_epsilon=hf_config.rms_norm_eps, activation="swiglu",
            add_bias_linear=model_type == "llama" and bool(hf_config.attention_bias),
            add_qkv_bias=model_type == "qwen2",
            untie_embeddings_and_output_weights=not hf_config.tie_word_embeddings,
            hidden_dropout=0.0, attention_dropout=hf_config.attention_dropout,
            init_method_std=hf_config.initializer_range, params_dtype=params_dtype,
            num_query_groups=kv_heads, kv_channels=kv_channels,
            use_rope_scaling=rope_type == "llama3",
            rope_scaling_factor=float(rope.get("factor", ModelConfig.rope_scaling_factor)))
    raise UnsupportedArchitectureError(f"cannot import Hugging Face model_type {model_type!r}: "
                                       f"only gpt2, llama and qwen2 are supported")


def _check_llama_or_qwen2_biases(hf_config, model_type: str) -> None:
    """Llama: attention_bias (q, k, v, o) and mlp_bias must agree (our
    --disable-bias-linear covers both). Qwen2: q/k/v biases always; its
    sliding-window layers are refused (our attention is full causal)."""
    if model_type == "llama":
        if bool(hf_config.attention_bias) != bool(getattr(hf_config, "mlp_bias", False)):
            raise UnsupportedArchitectureError("Llama attention_bias != mlp_bias: our "
                                               "--disable-bias-linear covers both")
        return
    layer_types = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
    if getattr(hf_config, "use_sliding_window", False) or layer_types != {"full_attention"}:
        raise UnsupportedArchitectureError(
            f"Qwen2 use_sliding_window / layer_types {sorted(layer_types)}: sliding-window "
            f"attention is not implemented (only full_attention layers)")


def _from_gpt2(hf: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"embedding.word_embeddings.weight": hf["transformer.wte.weight"],
           "embedding.position_embeddings.weight": hf["transformer.wpe.weight"],
           "decoder.final_layernorm.weight": hf["transformer.ln_f.weight"],
           "decoder.final_layernorm.bias": hf["transformer.ln_f.bias"]}
    for i in range(config.num_layers):
        theirs, ours = f"transformer.h.{i}.", f"decoder.layers.{i}."
        out.update({
            ours + "input_layernorm.weight": hf[theirs + "ln_1.weight"],
            ours + "input_layernorm.bias": hf[theirs + "ln_1.bias"],
            ours + "self_attention.linear_qkv.weight": _merge_qkv(
                *hf[theirs + "attn.c_attn.weight"].t().chunk(3, dim=0), config),
            ours + "self_attention.linear_qkv.bias": _merge_qkv(
                *hf[theirs + "attn.c_attn.bias"].chunk(3, dim=0), config),
            ours + "self_attention.linear_proj.weight": hf[theirs + "attn.c_proj.weight"].t(),
            ours + "self_attention.linear_proj.bias": hf[theirs + "attn.c_proj.bias"],
            ours + "pre_mlp_layernorm.weight": hf[theirs + "ln_2.weight"],
            ours + "pre_mlp_layernorm.bias": hf[theirs + "ln_2.bias"],
            ours + "mlp.linear_fc1.weight": hf[theirs + "mlp.c_fc.weight"].t(),
            ours + "mlp.linear_fc1.bias": hf[theirs + "mlp.c_fc.bias"],
            ours + "mlp.linear_fc2.weight": hf[theirs + "mlp.c_proj.weight"].t(),
            ours + "mlp.linear_fc2.bias": hf[theirs + "mlp.c_proj.bias"],
        })
    if config.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = hf["lm_head.weight"]
    return out


def _from_llama(hf: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from Llama's (or Qwen2's: the same names)."""
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    for i in range(config.num_layers):
        theirs, ours = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[ours + "input_layernorm.weight"] = hf[theirs + "input_layernorm.weight"]
        out[ours + "pre_mlp_layernorm.weight"] = hf[theirs + "post_attention_layernorm.weight"]
        attention, mlp = theirs + "self_attn.", theirs + "mlp."
        for suffix in _suffixes(config.qkv_bias):
            out[ours + "self_attention.linear_qkv." + suffix] = _merge_qkv(
                hf[attention + "q_proj." + suffix], hf[attention + "k_proj." + suffix],
                hf[attention + "v_proj." + suffix], config)
        for suffix in _suffixes(config.add_bias_linear):
            out.update({
                ours + "self_attention.linear_proj." + suffix: hf[attention + "o_proj." + suffix],
                ours + "mlp.linear_fc1." + suffix: torch.cat(
                    [hf[mlp + "gate_proj." + suffix], hf[mlp + "up_proj." + suffix]]),
                ours + "mlp.linear_fc2." + suffix: hf[mlp + "down_proj." + suffix],
            })
    if config.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = hf["lm_head.weight"]
    return out


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor], family: str, config: ModelConfig,
                       padded_vocab_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Our full state dict (global names, `config.params_dtype`, contiguous)
    from a GPT-2, Llama or Qwen2 HF state dict; inverse of `to_hf_state_dict`. The
    vocabulary rows are padded with zeros to `padded_vocab_size` when given.
    KeyError names the HF tensor that is missing."""
    state = (_from_gpt2 if family == "gpt2" else _from_llama)(hf_state, config)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in state and padded_vocab_size and padded_vocab_size > state[name].shape[0]:
            pad = state[name].new_zeros(padded_vocab_size - state[name].shape[0],
                                        state[name].shape[1])
            state[name] = torch.cat([state[name], pad])
    return {name: state[name].to(dtype=config.params_dtype, copy=True,
                                 memory_format=torch.contiguous_format)
            for name in global_parameter_names(config)}


def load_hf_model(directory: str | os.PathLike, *, params_dtype: torch.dtype = torch.bfloat16,
                  make_vocab_size_divisible_by: int = 128
                  ) -> tuple[str, ModelConfig, dict[str, torch.Tensor], int]:
    """Reads a transformers model directory (config.json and model.safetensors,
    or its sharded index): (family, ModelConfig with the padded vocabulary,
    our full state dict, the HF vocabulary size)."""
    try:
        import transformers
        from safetensors.torch import load_file
    except ImportError as error:
        raise ImportError("load_hf_model needs `transformers` and `safetensors`") from error
    import json

    hf_config = transformers.AutoConfig.from_pretrained(directory)
    family, config = model_config_from_hf(hf_config, params_dtype=params_dtype)
    index = os.path.join(directory, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index, encoding="utf-8"))["weight_map"].values()))
             if os.path.isfile(index) else ["model.safetensors"])
    hf_state: dict[str, torch.Tensor] = {}
    for name in files:
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"{index} names {name!r}: weight files must lie in {directory}")
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (only safetensors weights are read)")
        hf_state.update(load_file(path))
    if family == "gpt2" and "wte.weight" in hf_state:  # saved from GPT2Model (the hub's gpt2)
        hf_state = {"transformer." + name: tensor for name, tensor in hf_state.items()}
    hf_vocab = config.vocab_size
    multiple = make_vocab_size_divisible_by
    config.vocab_size = -(-hf_vocab // multiple) * multiple
    return family, config, from_hf_state_dict(hf_state, family, config, config.vocab_size), \
        hf_vocab
