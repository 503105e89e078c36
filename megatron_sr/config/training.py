"""TrainingConfig: the loop's batch sizes, length, evaluation, logging and
checkpoints, each field with its flag."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_sr.config.flags import check_fields, flag

EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")  # --exit-signal


@dataclass
class TrainingConfig:
    """The loop: batch sizes, length, evaluation, logging, checkpoints.

    From `megatron_sr.config.arguments`, `global_batch_size` and `train_iters`
    are always set, and `rampup_batch_size` / `step_batch_size_schedule` hold
    the parsed forms of their flags (`megatron_sr.config.batch_size`)."""

    micro_batch_size: int = flag("--micro-batch-size", group="training", default=1, minimum=1,
                                 help="Samples per forward/backward on one data-parallel rank.")
    global_batch_size: Optional[int] = flag(  # default micro x data-parallel size
        "--global-batch-size", group="training", default=None, minimum=1,
        help="Samples per optimizer step over all ranks; a multiple of --micro-batch-size x "
             "data-parallel size (the default).")
    train_iters: Optional[int] = flag(  # from --train-samples: train_samples // global_batch_size
        "--train-iters", group="training", default=None, minimum=1,
        help="Optimizer steps to train (this or --train-samples).")
    train_samples: Optional[int] = flag("--train-samples", group="training", default=None,
                                        minimum=1,
                                        help="Samples to train on (this or --train-iters).")
    skip_train: bool = flag(
        "--skip-train", group="validation", default=False,
        help="Do not train: evaluate the model of --load (--eval-iters batches of the "
             "validation set, then of --test-data-path's) and exit; saves nothing; implies "
             "--no-load-optim.")
    eval_interval: int = flag("--eval-interval", group="validation", default=1000, minimum=1,
                              help="Evaluate every this many iterations.")
    eval_iters: int = flag("--eval-iters", group="validation", default=100, minimum=0,
                           help="Batches per evaluation; 0 disables evaluation.")
    log_interval: int = flag("--log-interval", group="logging", default=100, minimum=1,
                             help="Print the log line every this many iterations.")
    exit_interval: Optional[int] = flag(
        "--exit-interval", group="training", default=None, minimum=1,
        help="Save (with --save) and exit when the iteration is a multiple of this.")
    exit_duration_in_mins: Optional[float] = flag(
        "--exit-duration-in-mins", group="training", default=None, interval="(0, inf)",
        help="Save (with --save) and exit after this many minutes since the job started "
             "(set-up included).")
    seed: int = flag("--seed", group="initialization", default=1234, minimum=0,
                     maximum=2**32 - 1,
                     help="Seed of weight init, dropout, data order and the SR bits.")
    save: Optional[str] = flag("--save", group="checkpointing", default=None,
                               help="Directory to save checkpoints to.")
    load: Optional[str] = flag("--load", group="checkpointing", default=None,
                               help="Directory to resume from (its latest checkpoint).")
    save_interval: Optional[int] = flag("--save-interval", group="checkpointing", default=None,
                                        minimum=1, help="Save every this many iterations.")
    no_load_optim: bool = flag("--no-load-optim", group="checkpointing", default=False,
                               help="Do not load the optimizer state from --load.")
    no_load_rng: bool = flag(
        "--no-load-rng", group="checkpointing", default=False,
        help="Do not load the RNG states (python, numpy, torch, dropout) from --load; the SR "
             "bits follow the optimizer step, restored with the optimizer state.")
    no_save_optim: bool = flag(
        "--no-save-optim", group="checkpointing", default=False,
        help="Save checkpoints without the optimizer state and the LR scheduler (model, progress "
             "and RNG states only); resuming from one needs --no-load-optim or --finetune.")
    no_save_rng: bool = flag(
        "--no-save-rng", group="checkpointing", default=False,
        help="Save checkpoints without the RNG states; resuming from one needs --no-load-rng "
             "or --finetune.")
    ckpt_step: Optional[int] = flag(
        "--ckpt-step", group="checkpointing", default=None, minimum=0,
        help="Load this iteration of --load instead of the one its tracker names (the latest).")
    exit_on_missing_checkpoint: bool = flag(
        "--exit-on-missing-checkpoint", group="checkpointing", default=False,
        help="Stop with an error when --load holds no checkpoint, instead of training from "
             "scratch.")
    use_checkpoint_args: bool = flag(
        "--use-checkpoint-args", group="checkpointing", default=False,
        help="Take the model's architecture from the checkpoint --load names: its sizes fill "
             "--num-layers, --hidden-size, --num-attention-heads, --seq-length, "
             "--ffn-hidden-size, --kv-channels and --max-position-embeddings where the command "
             "line leaves them out, and its other architecture flags replace the command "
             "line's (a [flags] line names every value taken).")
    use_mp_args_from_checkpoint_args: bool = flag(
        "--use-mp-args-from-checkpoint-args", group="checkpointing", default=False,
        help="With --use-checkpoint-args: also take the tensor, pipeline and virtual pipeline "
             "parallel sizes from the checkpoint.")
    finetune: bool = flag("--finetune", group="checkpointing", default=False,
                          help="Load only the model from --load and start at iteration 0 "
                               "(implies --no-load-optim --no-load-rng).")
    override_existing_checkpoints: bool = flag(  # --save may hold another run's checkpoints
        "--override-existing-checkpoints", group="checkpointing", default=False,
        help="Allow --save to name a directory holding checkpoints of another run (one that is "
             "not also --load): its tracker and its iterations of the same numbers get replaced.")
    ckpt_format: str = flag(  # or "torch" (legacy per-rank files)
        "--ckpt-format", group="checkpointing", default="torch_dist",
        choices=("torch_dist", "torch"),
        help="torch_dist: torch.distributed.checkpoint, every rank writes what it owns, loads at "
             "any TP/PP/DP layout; torch: one file per TP/PP rank (Megatron's legacy layout), "
             "loads at the same TP/PP. --load reads either.")
    async_save: bool = flag("--async-save", group="checkpointing", default=False,
                            help="With --ckpt-format torch_dist: write checkpoints in the "
                                 "background; the next save and the end of training wait for it.")
    tensorboard_dir: Optional[str] = flag("--tensorboard-dir", group="logging", default=None,
                                          output_folder=True,
                                          help="Write TensorBoard scalars here.")
    max_skipped_iterations: int = flag(
        "--max-skipped-iterations", group="training", default=10, minimum=1,
        help="Stop after this many consecutive steps skipped for NaN/Inf gradients.")
    # False: NaN/Inf steps are still skipped and counted, but never stop the job.
    check_for_nan_in_loss_and_grad: bool = flag(
        "--no-check-for-nan-in-loss-and-grad", group="training", default=True,
        action="store_false",
        help="Do not stop the job for NaN/Inf gradients (or the NaN/Inf loss behind them): "
             "such steps are still skipped on every rank, so that no weight takes the NaN, and "
             "counted in the log line, but --max-skipped-iterations no longer applies.")
    # (start, increment, samples): the global batch grows from start by increment
    # up to global_batch_size over the first `samples` samples (Megatron's ramp-up).
    rampup_batch_size: Optional[tuple[int, int, int]] = flag(
        "--rampup-batch-size", group="training", default=None, type=int, nargs=3,
        metavar=("START", "INCREMENT", "SAMPLES"),
        help="Grow the global batch size from START by INCREMENT up to --global-batch-size, in "
             "equal steps over the first SAMPLES samples.")
    # ((first sample, global batch size), ...), first samples strictly increasing from 0:
    # the step's global batch is that of the last entry whose first sample has been
    # consumed (--step-batch-size-schedule, its token thresholds divided by the sequence
    # length); global_batch_size is then the largest of them.
    step_batch_size_schedule: Optional[tuple[tuple[int, int], ...]] = flag(
        "--step-batch-size-schedule", group="training", default=None, type=str, nargs="+",
        metavar="TOKENS:BATCH",
        help="Global batch size by tokens trained: 'TOKENS:BATCH TOKENS:BATCH ...' (one word "
             "or several, space- or comma-separated: a launch script's unquoted array splits "
             "it; counts may end in K, M, B or T for 1e3 to 1e12), the first at 0 tokens, "
             "thresholds increasing; a step uses the batch size of the last threshold reached "
             "(tokens / --seq-length samples consumed). --global-batch-size may be omitted; "
             "given, it must be the largest batch size of the schedule. Excludes "
             "--rampup-batch-size.")
    calculate_per_token_loss: bool = flag(
        "--calculate-per-token-loss", group="training", default=False,
        help="Average the loss over the step's loss tokens (all micro-batches and data-parallel "
             "ranks together) instead of averaging per-micro-batch means; they differ only when "
             "--eod-mask-loss masks tokens (then the step's micro-batches are read ahead to "
             "count them).")
    log_timers_to_tensorboard: bool = flag(
        "--log-timers-to-tensorboard", group="logging", default=False,
        help="Also write the per-phase step times (forward-backward; optimizer, which includes "
             "the gradient syncs) as TensorBoard scalars.")
    wandb_project: Optional[str] = flag(
        "--wandb-project", group="logging", default=None,
        help="Log the TensorBoard scalars to this Weights & Biases project too (needs `wandb`).")
    wandb_exp_name: Optional[str] = flag("--wandb-exp-name", group="logging", default=None,
                                         help="Weights & Biases run name.")
    wandb_save_dir: Optional[str] = flag(
        "--wandb-save-dir", group="logging", default=None, output_folder=True,
        help="Weights & Biases local folder (default: <--save>/wandb).")
    wandb_entity: Optional[str] = flag(
        "--wandb-entity", group="logging", default=None,
        help="Weights & Biases entity (user or team) the run is logged under (default: the "
             "account's default entity).")
    log_params_norm: bool = flag(
        "--log-params-norm", group="logging", default=False,
        help="At each --log-interval step, log the L2 norm of all parameters after the update "
             "(the fp32 master copy where there is one): 'params norm' in the log line, "
             "'params-norm' in TensorBoard.")
    log_num_zeros_in_grad: bool = flag(
        "--log-num-zeros-in-grad", group="logging", default=False,
        help="At each --log-interval step, log the number of zero elements of the reduced "
             "gradients: 'num zeros' in the log line, 'num-zeros' in TensorBoard.")
    log_memory_to_tensorboard: bool = flag(
        "--log-memory-to-tensorboard", group="logging", default=False,
        help="At each --log-interval step, write the last rank's memory use as TensorBoard "
             "scalars: mem-reserved-bytes, mem-allocated-bytes, mem-max-allocated-bytes and "
             "mem-allocated-count of the CUDA allocator; on a CPU, mem-allocated-bytes and "
             "mem-max-allocated-bytes are the process's current and peak resident memory.")
    log_validation_ppl_to_tensorboard: bool = flag(
        "--log-validation-ppl-to-tensorboard", group="logging", default=False,
        help="Also write the validation perplexity ('lm loss validation ppl') as a "
             "TensorBoard scalar beside the validation loss.")
    log_progress: bool = flag(
        "--log-progress", group="logging", default=False,
        help="Append to <--save>/progress.txt a line when the job starts and after each "
             "checkpoint save: iteration, job and cumulative throughput (TFLOP/s per GPU), "
             "floating-point operations and tokens so far (Megatron-LM's format).")
    profile: bool = flag("--profile", group="logging", default=False,
                         help="Record steps --profile-step-start .. --profile-step-end with the "
                              "torch profiler; the trace goes to --tensorboard-dir.")
    profile_step_start: int = flag("--profile-step-start", group="logging", default=10,
                                   help="First profiled iteration.")
    profile_step_end: int = flag("--profile-step-end", group="logging", default=12,
                                 help="Profiling stops before this iteration.")
    profile_ranks: tuple[int, ...] = flag("--profile-ranks", group="logging", default=(0,),
                                          type=int, nargs="+", help="Global ranks that profile.")
    exit_signal: str = flag(  # also saves and exits, besides SIGTERM
        "--exit-signal", group="training", default="SIGTERM", choices=EXIT_SIGNALS,
        help="A signal that, like SIGTERM, makes every rank save (with --save) and exit after "
             "the current step, e.g. SIGUSR1 sent by Slurm's `#SBATCH --signal=USR1@900` ahead "
             "of the time limit.")
    # Every this many iterations, check that DP and TP replicas are bitwise equal
    # (megatron_sr.replica_check); None: never.
    check_weight_hash_interval: Optional[int] = flag(
        "--check-weight-hash-across-dp-replicas-interval", group="training", default=None,
        minimum=1,
        help="Every this many iterations, hash every parameter on every rank and stop with an "
             "error naming the parameter and the ranks when the copies held by data-parallel "
             "replicas, or by tensor-parallel ranks of a parameter TP does not split, differ "
             "(default: never).")

    def __post_init__(self):
        self.profile_ranks = tuple(self.profile_ranks)
        check_fields(self)
