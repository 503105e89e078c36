"""JobConfig: one training job's typed configs together, as `parse_args` returns them."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from megatron_sr.config.data import DataConfig
from megatron_sr.config.flags import check_fields, flag
from megatron_sr.config.model import ModelConfig
from megatron_sr.config.optimizer import OptimizerConfig
from megatron_sr.config.parallel import ParallelConfig
from megatron_sr.config.training import TrainingConfig
from megatron_sr.data.gpt_dataset import memory_bytes
from megatron_sr.data.tokenizers import padded_vocab_size


@dataclass(frozen=True)
class JobConfig:
    """One training job's configuration: what `parse_args` returns, already
    validated, and what `pretrain_gpt.py` and `tools/estimate.py` hand to the
    parts they build.

    The vocabulary is known only once the tokenizer is built, so `model.vocab_size`
    is 0 (unknown) until `with_vocab_size(tokenizer.vocab_size)` returns the job
    with the padded size filled in; build the model only from that job.
    `training.global_batch_size` and `training.train_iters` are always set.
    """

    model: ModelConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    data: DataConfig
    training: TrainingConfig
    world_size: int
    make_vocab_size_divisible_by: int = flag(
        "--make-vocab-size-divisible-by", group="network size", default=128, minimum=1,
        help="Pad the vocabulary to a multiple of this x --tensor-model-parallel-size.")
    unpadded_vocab_size: Optional[int] = None  # the tokenizer's, once known
    # One line per accepted Megatron flag that changes nothing here, saying what
    # happens instead; `pretrain` prints them on rank 0.
    notices: tuple[str, ...] = ()

    def __post_init__(self):
        check_fields(self)

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.parallel.tensor_model_parallel_size
                                   * self.parallel.pipeline_model_parallel_size)

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per data-parallel rank per optimizer step."""
        return self.training.global_batch_size // (self.training.micro_batch_size
                                                   * self.data_parallel_size)

    def with_vocab_size(self, vocab_size: int) -> "JobConfig":
        """A copy whose `model.vocab_size` is the tokenizer's `vocab_size` padded to a
        multiple of --make-vocab-size-divisible-by x --tensor-model-parallel-size."""
        if vocab_size < 1:
            raise ValueError(f"tokenizer vocabulary size must be >= 1, got {vocab_size}")
        padded = padded_vocab_size(vocab_size, self.make_vocab_size_divisible_by,
                                   self.parallel.tensor_model_parallel_size)
        table_bytes = (padded // self.parallel.tensor_model_parallel_size * self.model.hidden_size
                       * self.model.params_dtype.itemsize)
        if table_bytes > memory_bytes():
            raise ValueError(f"the tokenizer's {vocab_size} ids (--tokenizer-type, --vocab-size) "
                             f"need an embedding of {table_bytes / 2**30:.0f} GiB per "
                             f"tensor-parallel rank, more than this machine's memory "
                             f"({memory_bytes() / 2**30:.0f} GiB)")
        return replace(self, model=replace(self.model, vocab_size=padded),
                       unpadded_vocab_size=vocab_size)
