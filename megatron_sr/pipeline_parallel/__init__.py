"""Pipeline parallelism: point-to-point exchange of activations between stages
(`p2p_communication`) and the micro-batch schedules (`schedules`)."""
from megatron_sr.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
)
