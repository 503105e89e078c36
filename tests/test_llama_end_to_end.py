"""The done-criterion of Llama-class support, end to end on CPU ranks.

A byte-level BPE tokenizer.json is trained here with the `tokenizers`
library; tools/preprocess_data.py tokenizes a slice of the sample corpus with
it (--tokenizer-type HuggingFaceTokenizer); a tiny Llama-style model
(grouped-query attention 4 heads / 2 groups, SwiGLU, RMSNorm, RoPE, untied,
no biases) trains under TP 2 x PP 2 on 4 Gloo ranks with Megatron's flags;
tools/checkpoint_convert.py exports it to Hugging Face with the tokenizer;
and `transformers` greedy generation is the text tools/text_generation.py
prints. fp32, so both sides compute the same logits to rounding.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest_plugins = ["data_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
VOCAB = 384
PROMPT = "And God said, Let there be"
NEW_TOKENS = 12
LLAMA = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
         "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
         "--seq-length", "32", "--max-position-embeddings", "32",
         "--position-embedding-type", "rope", "--rotary-base", "10000", "--swiglu",
         "--normalization", "RMSNorm", "--untie-embeddings-and-output-weights",
         "--disable-bias-linear", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
         "--init-method-std", "0.02", "--micro-batch-size", "2", "--global-batch-size", "8",
         "--train-iters", "30", "--lr", "3e-3", "--lr-decay-style", "cosine", "--min-lr", "3e-4",
         "--lr-warmup-iters", "3", "--precision", "fp32", "--tensor-model-parallel-size", "2",
         "--pipeline-model-parallel-size", "2", "--sequence-parallel",
         "--log-interval", "10", "--eval-interval", "1000", "--eval-iters", "0",
         "--make-vocab-size-divisible-by", "64"]


def run(args, timeout=600):
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_tiny_llama_trains_at_tp2_pp2_exports_and_generates_like_transformers(sample_slice,
                                                                              tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with open(sample_slice, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    tokenizer.save(str(tokenizer_dir / "tokenizer.json"))

    data = tmp_path / "data" / "slice"
    run([sys.executable, "tools/preprocess_data.py", "--input", str(sample_slice),
         "--output-prefix", str(data), "--tokenizer-type", "HuggingFaceTokenizer",
         "--tokenizer-model", str(tokenizer_dir), "--append-eod"])

    save = tmp_path / "checkpoint"
    train = run([TORCHRUN, "--standalone", "--nproc_per_node", "4", "pretrain_gpt.py", *LLAMA,
                 "--data-path", f"{data}_text_document", "--split", "99,1,0",
                 "--data-cache-path", str(tmp_path / "cache"),
                 "--tokenizer-type", "HuggingFaceTokenizer",
                 "--tokenizer-model", str(tokenizer_dir), "--save", str(save)])
    assert "[setup] world 4 = TP 2 x PP 2 x DP 1" in train.stdout
    losses = [float(line.split("lm loss: ")[1].split()[0])
              for line in train.stdout.splitlines() if "lm loss: " in line]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, losses  # it learns

    ours = run([sys.executable, "tools/text_generation.py", "--load", str(save), "--prompt",
                PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--greedy"]).stdout
    ours_text = ours.split("\n" + "-" * 40)[0]

    hf_dir = tmp_path / "hf"
    run([sys.executable, "tools/checkpoint_convert.py", "--load", str(save), "--save",
         str(hf_dir), "--to-hf", "--hf-dtype", "float32"])
    assert "tokenizer.json" in os.listdir(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["model_type"], config["num_attention_heads"],
            config["num_key_value_heads"]) == ("llama", 4, 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    hf_tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    prompt_ids = hf_tokenizer.encode(PROMPT).ids
    padded = config["vocab_size"]
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS,
                                   do_sample=False, suppress_tokens=list(range(VOCAB, padded)),
                                   eos_token_id=config["eos_token_id"],
                                   pad_token_id=config["eos_token_id"])
    theirs_text = hf_tokenizer.decode(generated[0].tolist(), skip_special_tokens=False)
    assert len(generated[0]) > len(prompt_ids)
    assert theirs_text == ours_text
