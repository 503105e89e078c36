"""megatron_sr.data: from JSONL text to GPT training samples (see docs/DATA.md).

- `tokenizers`: `build_tokenizer` by Megatron's ``--tokenizer-type`` names.
- `indexed_dataset`: Megatron's ``.bin``/``.idx`` reader and writer.
- `preprocessing`: the engine of ``tools/preprocess_data.py``.
- `gpt_dataset`: splits, sample indices, blending; `build_gpt_datasets`.
- `micro_batches`: a DP rank's micro-batches through a torch DataLoader (`--num-workers`).
- `sample_files`: the GPT-2 BPE files and the sample corpus, cached.
"""
