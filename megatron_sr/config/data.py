"""DataConfig: where samples come from and how they are tokenized, each field with its flag."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_sr.config.flags import check_fields, flag, unquoted
from megatron_sr.data.micro_batches import DATALOADER_TYPES
from megatron_sr.data.tokenizers import MAX_VOCAB_SIZE, TOKENIZER_TYPES


@dataclass
class DataConfig:
    """Where samples come from. `data_path` is Megatron's list: prefixes,
    optionally each preceded by a weight, divided into train, valid and test
    by `split`; `train_data_path`, `valid_data_path` and `test_data_path` are
    such lists for one split each, instead (an empty one: that split is not
    read). `seq_length` has no flag of its own: it is --seq-length,
    `ModelConfig.seq_length`."""

    data_path: list[str] = flag(
        "--data-path", group="data", default_factory=list, nargs="*",
        help="Dataset prefixes (PATH for PATH.bin/.idx), each optionally preceded by its "
             "blending weight: W1 P1 W2 P2 ...")
    split: str = flag("--split", group="data", default="969,30,1", type=unquoted,
                      help="Train,valid,test proportions, e.g. 969,30,1.")
    train_data_path: list[str] = flag(
        "--train-data-path", group="data", default_factory=list, nargs="*",
        help="Training dataset prefixes (weights as in --data-path), instead of --data-path and "
             "--split; all their documents are training data.")
    valid_data_path: list[str] = flag(
        "--valid-data-path", group="data", default_factory=list, nargs="*",
        help="Validation dataset prefixes (weights as in --data-path), with --train-data-path; "
             "without it there is no validation.")
    test_data_path: list[str] = flag(
        "--test-data-path", group="data", default_factory=list, nargs="*",
        help="Test dataset prefixes (weights as in --data-path), with --train-data-path: "
             "--eval-iters batches are evaluated after training (and with --skip-train).")
    dataloader_type: str = flag(
        "--dataloader-type", group="data", default="single", choices=DATALOADER_TYPES,
        help="Sample order: single (the dataset's items in order, a resumed run going on from "
             "the samples consumed) or cyclic (every pass over a dataset in a fresh "
             "permutation seeded by --seed and the pass number).")
    data_cache_path: Optional[str] = flag("--data-cache-path", group="data", default=None,
                                          output_folder=True,
                                          help="Where to keep the sample index files.")
    mock_data: bool = flag("--mock-data", group="data", default=False,
                           help="Synthetic data instead of --data-path.")
    tokenizer_type: str = flag("--tokenizer-type", group="data", default="GPT2BPETokenizer",
                               choices=TOKENIZER_TYPES)
    vocab_file: Optional[str] = flag("--vocab-file", group="data", default=None,
                                     help="GPT2BPETokenizer vocabulary (JSON).")
    merge_file: Optional[str] = flag("--merge-file", group="data", default=None,
                                     help="GPT2BPETokenizer merges.")
    tokenizer_model: Optional[str] = flag(
        "--tokenizer-model", group="data", default=None,
        help="SentencePiece model file (SentencePieceTokenizer, GPTSentencePieceTokenizer, "
             "Llama2Tokenizer); HuggingFaceTokenizer: a tokenizer.json or a local folder "
             "holding one; TikTokenizer: a tiktoken BPE ranks file; Llama3Tokenizer: Meta's "
             "tiktoken tokenizer.model.")
    vocab_size: Optional[int] = flag(  # NullTokenizer only
        "--vocab-size", group="data", default=None, minimum=1, maximum=MAX_VOCAB_SIZE - 1,
        help="NullTokenizer: number of token ids (other tokenizers: ignored).")
    tiktoken_pattern: str = flag(
        "--tiktoken-pattern", group="data", default="v2", choices=("v1", "v2"),
        help="TikTokenizer pre-tokenization regex: v1 (GPT-4's cl100k) or v2 (with the "
             "Llama-3 / o200k number and word rules).")
    tiktoken_num_special_tokens: int = flag(
        "--tiktoken-num-special-tokens", group="data", default=1000,
        help="TikTokenizer: ids reserved for special tokens below the BPE ids.")
    seq_length: int = 1024
    num_workers: int = flag(
        "--num-workers", group="data", default=0, minimum=0,
        help="Data loader worker processes per rank (0: read on the training thread); the "
             "samples and their order do not depend on it.")
    # Document-aware batches (eod = the tokenizer's end-of-document id):
    eod_mask_loss: bool = flag(  # no loss where the input token is eod
        "--eod-mask-loss", group="data", default=False,
        help="No loss at positions whose input token is eod (predicting the next document's "
             "first token).")
    reset_position_ids: bool = flag("--reset-position-ids", group="data", default=False,
                                    help="Positions restart at 0 after every eod token.")
    reset_attention_mask: bool = flag(
        "--reset-attention-mask", group="data", default=False,
        help="Tokens attend only within their document (after the last eod).")

    def __post_init__(self):
        check_fields(self)

