"""Tensor parallelism: autograd communication (`mappings`), split linear and
embedding layers (`layers`), and the cross entropy over split logits
(`cross_entropy`)."""
from megatron_sr.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_sr.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelRank,
    VocabParallelEmbedding,
    constant_init,
    full_shape,
    full_tensor_from_shards,
    normal_init,
    set_parallel_attributes,
    shard_element_index,
    shard_full_tensor,
    tensor_parallel_rank,
)
from megatron_sr.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
