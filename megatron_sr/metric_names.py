"""The tags a training run writes to TensorBoard (and wandb), in one place:
`megatron_sr.training_log` writes them, tools/compare_runs.py reads them back.
Torch-free, so that the tools import it without torch.

Megatron-LM's tags keep Megatron's spelling; ours sit beside them. The tags of
`VS_SAMPLES_TAGS` are also written as "<tag> vs samples" against consumed samples.
"""

# Megatron-LM's scalars.
LEARNING_RATE = "learning-rate"
BATCH_SIZE = "batch-size"
TRAIN_LOSS = "lm loss"
LOSS_SCALE = "loss-scale"
WORLD_SIZE = "world-size"
GRAD_NORM = "grad-norm"
ITERATION_TIME = "iteration-time"  # with --log-timers-to-tensorboard
THROUGHPUT = "throughput"  # TFLOP/s per device, with --log-timers-to-tensorboard
VALID_LOSS = "lm loss validation"
VALID_PPL = "lm loss validation ppl"  # with --log-validation-ppl-to-tensorboard
PARAMS_NORM = "params-norm"  # with --log-params-norm
NUM_ZEROS = "num-zeros"  # with --log-num-zeros-in-grad
# With --log-memory-to-tensorboard (the CUDA allocator's; the first two on a CPU too).
MEM_ALLOCATED = "mem-allocated-bytes"
MEM_MAX_ALLOCATED = "mem-max-allocated-bytes"
MEM_RESERVED = "mem-reserved-bytes"
MEM_ALLOCATED_COUNT = "mem-allocated-count"

# Ours.
TOKENS_PER_S = "throughput/tokens-per-s"
TFLOPS_PER_DEVICE = "throughput/tflops-per-device"
ABSORPTION = "update-absorption"
SKIPPED_ITERATIONS = "skipped-iterations"
NAN_ITERATIONS = "nan-iterations"
CONSUMED_SAMPLES = "consumed-samples"
PEAK_BYTES = "memory/peak-bytes"
CONFIG_TEXT = "run/config"  # text: the run's precision, LR schedule, sizes, layout


def memory_tag(kind: str) -> str:
    """The scalar of a training-state size of `memory_report` ("params", ...,
    "total"), written once at step 0."""
    return f"memory/{kind}-bytes"


def timer_tag(phase: str) -> str:
    """The scalar of a phase's mean time per step (--log-timers-to-tensorboard)."""
    return f"{phase}-time"


STATE_BYTES = memory_tag("total")

VS_SAMPLES_TAGS = frozenset({LEARNING_RATE, BATCH_SIZE, TRAIN_LOSS, LOSS_SCALE, WORLD_SIZE,
                             GRAD_NORM, VALID_LOSS, VALID_PPL, PARAMS_NORM, NUM_ZEROS})
