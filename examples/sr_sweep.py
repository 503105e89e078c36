"""The SR precision sweep of docs/RESULTS.md: driver, run plan and result store.

Run through examples/reproduce_sr_sweep.sh (which builds the data first):

    bash examples/reproduce_sr_sweep.sh                  # the whole sweep, 2 runs at a time
    bash examples/reproduce_sr_sweep.sh --dry-run        # the plan: every run and its state
    bash examples/reproduce_sr_sweep.sh --report         # table, claims and plot of the done runs
    bash examples/reproduce_sr_sweep.sh --v2 --commit    # the second sweep (below), committing each run

The model is mostly transformer: 6 layers x 256 hidden (4 heads), sequence 256, a
4096-piece BPE trained on the sample corpus (1.0M of its 5.8M parameters are the
tied embedding). Each run trains 1024 steps of 8 x 256 tokens (2.1M tokens) with
AdamW as in the paper (beta2 0.95, weight decay 0.1, clip 1.0), cosine decay to
LR/10 after 50 warm-up steps, and evaluates every 128 steps on the same 65,536
held-out tokens (32 batches of the validation split, from its start).

The plan, in the order runs start (a partial sweep is useful early):
1. `scan`: bf16-mixed at 0.5x, 1x, 2x, 4x of --base-lr, seed 1. The *best LR* is the
   scan's lowest final validation loss (ties: the lower LR).
2. for each seed: bf16-sr, bf16-mixed and bf16 (RTN) at 1x, 2x and 4x the best LR;
   fp32 and bf16-kahan at the best LR; the ablation: bf16-sr at the best LR with 8
   micro-batches of 1 per step (the same 8 x 256 tokens), gradient buffer in bf16
   (the default) vs --grad-reduce-dtype fp32.

The second sweep (--v2; docs/results/sr_sweep_v2/) answers the first one's flaw: its
corpus lists the Bible and then the plays, so the contiguous --split ranges validated
on the plays while training mostly on the Bible. v2 trains and validates on the
interleaved corpus (`megatron_sr.data.sample_files.interleave_documents`; the same
SPLIT then samples both sources alike), at the first sweep's best LR (V2_LR) and
twice it, without a scan (`v2_runs`): per seed, bf16-mixed, bf16 and bf16-sr at
both LRs; the accumulation ablation at 1x with 8 micro-batches of 1 (bf16 buffer
rounding to nearest, bf16 buffer with --grad-accumulation-rounding stochastic,
fp32 buffer); then, after every seed's, the longer arm: bf16-sr and bf16 with
twice the steps (reported apart, in OUT_long.md).

A run trains in its staging folder (--staging-dir, outside the repository by
default so that it outlives a fresh checkout on the same machine) and saves a
checkpoint at every evaluation; a run started again resumes from it, bit-exact,
so a sweep stopped mid-run loses at most one evaluation interval. The staging
folder's attempts.json keeps the run's wall time over all its attempts (updated
every poll of the driver, so a killed sweep loses at most one poll interval of
it). A finished run is stored in OUT/runs/NAME/ (its log, its TensorBoard events
and run.json: flags, code commit, wall time of all attempts and their number,
final validation loss; not the checkpoint), renamed into
place in one step when the run ends well, so a folder there always holds a whole
run; runs whose folder exists are skipped, which is how an interrupted sweep
resumes on any machine from the committed results. With --commit each finished
run is committed to git at once (only its folder).

Every run must see the same tokens. The first start of a sweep records the data
in OUT/data.json (sha256 of the tokenizer model and of the .bin/.idx files) and
copies the tokenizer to OUT/tokenizer.model (reproduce_sr_sweep.sh tokenizes
with that copy from then on, rather than training a new one with whatever
sentencepiece another machine has); a later start on data that differs stops
with an error naming the files. --report runs
tools/compare_runs.py --aggregate on OUT/runs/*/tensorboard, writing OUT.md (the
table, the paper's claims, the code commits, how far the sweep got and how
long its runs took, and what the runs train and validate on) and OUT.png (the mean curves).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from megatron_sr.cpu_bf16 import cpu_has_native_bf16  # noqa: E402
from megatron_sr.files import sha256_file  # noqa: E402

SCAN_MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)
GRID_MULTIPLIERS = (1.0, 2.0, 4.0)
GRID_STRATEGIES = ("bf16-sr", "bf16-mixed", "bf16")
BEST_LR_STRATEGIES = ("fp32", "bf16-kahan")
CHECKPOINTS = "checkpoints"
TRACKER = "latest_checkpointed_iteration.txt"  # written last by a save: a checkpoint exists
ATTEMPTS = "attempts.json"  # in a run's staging folder: {"seconds": wall time so far, "attempts": n}


@dataclass(frozen=True)
class Shape:
    """Model and schedule of every run of the sweep (QUICK shrinks it for tests)."""

    num_layers: int = 6
    hidden_size: int = 256
    num_attention_heads: int = 4
    seq_length: int = 256
    global_batch_size: int = 8
    train_iters: int = 1024
    warmup_iters: int = 50
    eval_interval: int = 128
    eval_iters: int = 32
    log_interval: int = 16


SPLIT = "97,3,0"  # train, validation, test: contiguous document ranges, in corpus order

QUICK_SHAPE = Shape(num_layers=2, hidden_size=64, num_attention_heads=2, seq_length=32,
                    global_batch_size=4, train_iters=8, warmup_iters=2, eval_interval=4,
                    eval_iters=2, log_interval=2)


@dataclass(frozen=True)
class RunSpec:
    precision: str
    lr: float
    seed: int
    micro_batch_size: Optional[int] = None  # None: the whole batch in one micro-batch
    grad_reduce_dtype: Optional[str] = None
    grad_accumulation_rounding: Optional[str] = None  # None: the default (nearest)
    train_iters: Optional[int] = None  # None: the shape's

    @property
    def name(self) -> str:
        name = f"{self.precision}_lr{self.lr:g}_seed{self.seed}"
        if self.micro_batch_size is not None:
            name += f"_mbs{self.micro_batch_size}"
        if self.grad_reduce_dtype is not None:
            name += f"_grad{self.grad_reduce_dtype}"
        if self.grad_accumulation_rounding == "stochastic":
            name += "_accsr"
        if self.train_iters is not None:
            name += f"_iters{self.train_iters}"
        return name

    def iters(self, shape: "Shape") -> int:
        return self.train_iters or shape.train_iters

    def flags(self, shape: Shape, data_prefix: str, tokenizer_model: str,
              staging_dir: str, cache_dir: str) -> list[str]:
        """pretrain_gpt.py's flags; TensorBoard and checkpoints go under staging_dir."""
        micro = self.micro_batch_size or shape.global_batch_size
        flags = [
            "--num-layers", shape.num_layers, "--hidden-size", shape.hidden_size,
            "--num-attention-heads", shape.num_attention_heads,
            "--seq-length", shape.seq_length, "--max-position-embeddings", shape.seq_length,
            "--attention-dropout", 0, "--hidden-dropout", 0,
            "--micro-batch-size", micro, "--global-batch-size", shape.global_batch_size,
            "--train-iters", self.iters(shape),
            "--lr", f"{self.lr:g}", "--min-lr", f"{self.lr / 10:g}",
            "--lr-decay-style", "cosine", "--lr-warmup-iters", shape.warmup_iters,
            "--weight-decay", 0.1, "--adam-beta1", 0.9, "--adam-beta2", 0.95,
            "--adam-eps", 1e-8, "--clip-grad", 1.0, "--seed", self.seed,
            "--precision", self.precision,
            "--data-path", data_prefix, "--split", SPLIT,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
            "--data-cache-path", cache_dir,
            "--log-interval", shape.log_interval, "--eval-interval", shape.eval_interval,
            "--eval-iters", shape.eval_iters,
            "--tensorboard-dir", os.path.join(staging_dir, "tensorboard"),
            "--save", os.path.join(staging_dir, CHECKPOINTS), "--load",
            os.path.join(staging_dir, CHECKPOINTS), "--save-interval", shape.eval_interval]
        if self.grad_reduce_dtype is not None:
            flags += ["--grad-reduce-dtype", self.grad_reduce_dtype]
        if self.grad_accumulation_rounding is not None:
            flags += ["--grad-accumulation-rounding", self.grad_accumulation_rounding]
        return [str(flag) for flag in flags]


def scan_runs(base_lr: float) -> list[RunSpec]:
    return [RunSpec("bf16-mixed", base_lr * m, seed=1) for m in SCAN_MULTIPLIERS]


def grid_runs(best_lr: float, seeds: list[int]) -> list[RunSpec]:
    runs = []
    for seed in seeds:
        for multiplier in GRID_MULTIPLIERS:
            runs += [RunSpec(p, best_lr * multiplier, seed) for p in GRID_STRATEGIES]
        runs += [RunSpec(p, best_lr, seed) for p in BEST_LR_STRATEGIES]
        runs += [RunSpec("bf16-sr", best_lr, seed, micro_batch_size=1, grad_reduce_dtype=dtype)
                 for dtype in ("bf16", "fp32")]
    return runs


V2_LR = 2e-3  # the first sweep's best bf16-mixed LR (docs/RESULTS.md)
V2_MULTIPLIERS = (1.0, 2.0)
V2_LONG_STRATEGIES = ("bf16-sr", "bf16")
V2_LONG_FACTOR = 2  # the longer arm trains this many times the shape's steps


def v2_runs(seeds: list[int], shape: "Shape") -> list[RunSpec]:
    """The second sweep's plan, in start order: per seed, bf16-mixed, bf16 and
    bf16-sr at 1x and 2x V2_LR, then the accumulation ablation at 1x with 8
    micro-batches of 1 (bf16-sr; bf16 buffer rounding to nearest, bf16 buffer
    with SR adds, fp32 buffer); after every seed's, the longer arm (bf16-sr
    and bf16 at 1x, V2_LONG_FACTOR times the steps)."""
    runs = []
    for seed in seeds:
        for multiplier in V2_MULTIPLIERS:
            runs += [RunSpec(p, V2_LR * multiplier, seed) for p in GRID_STRATEGIES]
        runs += [RunSpec("bf16-sr", V2_LR, seed, micro_batch_size=1, grad_reduce_dtype="bf16"),
                 RunSpec("bf16-sr", V2_LR, seed, micro_batch_size=1, grad_reduce_dtype="bf16",
                         grad_accumulation_rounding="stochastic"),
                 RunSpec("bf16-sr", V2_LR, seed, micro_batch_size=1, grad_reduce_dtype="fp32")]
    for seed in seeds:
        runs += [RunSpec(p, V2_LR, seed, train_iters=V2_LONG_FACTOR * shape.train_iters)
                 for p in V2_LONG_STRATEGIES]
    return runs


class ResultStore:
    """OUT/runs/NAME/{run.log, tensorboard/, run.json} for every finished run."""

    def __init__(self, out: str, staging_dir: str, label: str = "SR sweep"):
        self.runs_dir = os.path.join(out, "runs")
        self.staging_dir = staging_dir
        self.label = label  # begins the message of each run's commit

    def path(self, spec: RunSpec) -> str:
        return os.path.join(self.runs_dir, spec.name)

    def done(self, spec: RunSpec) -> bool:
        return os.path.isfile(os.path.join(self.path(spec), "run.json"))

    def final_valid_loss(self, spec: RunSpec) -> Optional[float]:
        if not self.done(spec):
            return None
        with open(os.path.join(self.path(spec), "run.json"), encoding="utf-8") as handle:
            return json.load(handle)["final_valid_loss"]

    def staging(self, spec: RunSpec) -> str:
        return os.path.join(self.staging_dir, spec.name)

    def publish(self, spec: RunSpec, record: dict) -> str:
        """Copies the run's log and events, with run.json, next to runs/NAME and renames
        the copy into place; then removes the staging folder (and its checkpoints)."""
        staging, final = self.staging(spec), self.path(spec)
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        shutil.copy2(os.path.join(staging, "run.log"), partial)
        shutil.copytree(os.path.join(staging, "tensorboard"), os.path.join(partial, "tensorboard"))
        with open(os.path.join(partial, "run.json"), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1, sort_keys=True)
        os.replace(partial, final)
        shutil.rmtree(staging)
        return final


def best_lr(store: ResultStore, base_lr: float) -> Optional[float]:
    """The scan's LR with the lowest final validation loss, once every scan run is done."""
    losses = [(store.final_valid_loss(spec), spec.lr) for spec in scan_runs(base_lr)]
    if any(loss is None for loss, _ in losses):
        return None
    return min(losses, key=lambda pair: (pair[0], pair[1]))[1]


def _git_commit_of_code() -> str:
    """The last commit that changed anything but the committed results: the runs a
    sweep commits one by one ran the same code (compare_runs counts these commits)."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%H", "--", ".",
                               ":(exclude)docs/results"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "megatron_sr",
                                "pretrain_gpt.py"], capture_output=True, text=True).stdout.strip()
        return head + ("+local changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _final_valid_loss(log_path: str, train_iters: int) -> Optional[float]:
    marker = f"validation loss at iteration {train_iters} | lm loss value: "
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if marker in line:
                return float(line.split(marker, 1)[1].split()[0])
    return None


@dataclass
class RunningJob:
    spec: RunSpec
    process: subprocess.Popen
    log: object
    started: float
    commit: str
    flags: list[str] = field(default_factory=list)
    earlier_seconds: float = 0.0  # wall time of the run's earlier attempts
    attempt: int = 1

    def wall_seconds(self) -> float:
        """Wall time of all the run's attempts, this one until now."""
        return self.earlier_seconds + time.time() - self.started

    def record_wall_time(self, staging: str) -> None:
        """Writes attempts.json (via a temporary name: a kill leaves the old or the new)."""
        path = os.path.join(staging, ATTEMPTS)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump({"seconds": round(self.wall_seconds(), 1), "attempts": self.attempt}, handle)
        os.replace(path + ".tmp", path)


def _earlier_attempts(staging: str) -> tuple[float, int]:
    """(wall seconds, number) of a staged run's earlier attempts; (0, 0) if none recorded."""
    try:
        with open(os.path.join(staging, ATTEMPTS), encoding="utf-8") as handle:
            record = json.load(handle)
        return float(record["seconds"]), int(record["attempts"])
    except (OSError, ValueError, KeyError):
        return 0.0, 0


def start_run(spec: RunSpec, store: ResultStore, shape: Shape, args) -> RunningJob:
    staging = store.staging(spec)
    resuming = os.path.isfile(os.path.join(staging, CHECKPOINTS, TRACKER))
    if not resuming:  # nothing to resume: start clean (no events of an earlier attempt)
        shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, CHECKPOINTS), exist_ok=True)
    flags = spec.flags(shape, args.data_prefix, args.tokenizer_model, staging, args.cache_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads_per_run))
    log = open(os.path.join(staging, "run.log"), "a" if resuming else "w", encoding="utf-8")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *flags],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"[sweep] {time.strftime('%H:%M:%S')} {'resumed' if resuming else 'started'} "
          f"{spec.name}", flush=True)
    earlier_seconds, earlier_attempts = _earlier_attempts(staging) if resuming else (0.0, 0)
    job = RunningJob(spec, process, log, time.time(), _git_commit_of_code(), flags,
                     earlier_seconds, earlier_attempts + 1)
    job.record_wall_time(staging)
    return job


def finish_run(job: RunningJob, store: ResultStore, shape: Shape, commit: bool) -> bool:
    job.log.close()
    staging = store.staging(job.spec)
    loss = _final_valid_loss(os.path.join(staging, "run.log"), job.spec.iters(shape))
    minutes = job.wall_seconds() / 60
    if job.process.returncode != 0 or loss is None:
        print(f"[sweep] {job.spec.name} FAILED (exit {job.process.returncode}); its log: "
              f"{os.path.join(staging, 'run.log')}", file=sys.stderr, flush=True)
        return False
    record = {"name": job.spec.name, "precision": job.spec.precision, "lr": job.spec.lr,
              "seed": job.spec.seed, "micro_batch_size": job.spec.micro_batch_size,
              "grad_reduce_dtype": job.spec.grad_reduce_dtype,
              "grad_accumulation_rounding": job.spec.grad_accumulation_rounding,
              "train_iters": job.spec.iters(shape),
              "final_valid_loss": loss,
              "wall_minutes": round(minutes, 2), "attempts": job.attempt,
              "code_commit": job.commit,
              "flags": job.flags, "host_cpu_threads": os.cpu_count(),
              "cpu_bf16_gemm": "native" if cpu_has_native_bf16() else "fp32"}
    final = store.publish(job.spec, record)
    print(f"[sweep] {time.strftime('%H:%M:%S')} finished {job.spec.name}: validation loss "
          f"{loss:.4f} ({math.exp(loss):.1f} ppl) in {minutes:.1f} min", flush=True)
    if commit:
        _commit(f"{store.label}: {job.spec.name} (validation loss {loss:.4f})", final)
    return True


def _commit(message: str, *paths: str, attempts: int = 30) -> None:
    """Commits only `paths` (other staged work is left alone); retries while git is busy."""
    for _ in range(attempts):
        add = subprocess.run(["git", "-C", ROOT, "add", "--", *paths], capture_output=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "-C", ROOT, "commit", "-q", "-m", message, "--", *paths],
            capture_output=True).returncode == 0
        if done:
            return
        time.sleep(20)
    print(f"[sweep] could not commit {', '.join(paths)}; commit by hand", file=sys.stderr,
          flush=True)


def plan(store: ResultStore, args) -> list[RunSpec]:
    """Runs to do now, in order: the scan, then (once the best LR is known) the
    grid; with --v2, `v2_runs`."""
    if args.v2:
        return v2_runs(args.seeds, args.shape)
    runs = scan_runs(args.base_lr)
    lr = best_lr(store, args.base_lr)
    if lr is not None:
        runs += [spec for spec in grid_runs(lr, args.seeds) if spec not in runs]
    return runs


DATA_RECORD = "data.json"
TOKENIZER_COPY = "tokenizer.model"


def data_fingerprint(data_prefix: str, tokenizer_model: str) -> dict[str, str]:
    """sha256 of the tokenizer model and of the tokenized corpus's two files."""
    return {"tokenizer_model": sha256_file(tokenizer_model), "bin": sha256_file(data_prefix + ".bin"),
            "idx": sha256_file(data_prefix + ".idx")}


def check_data(out: str, data_prefix: str, tokenizer_model: str, commit: bool,
               label: str = "SR sweep") -> None:
    """Records the sweep's data on its first start (OUT/data.json and a copy of the
    tokenizer, committed with --commit); afterwards exits with an error when the
    given data differs from the record, since its runs would not be comparable."""
    record_path = os.path.join(out, DATA_RECORD)
    missing = [path for path in (tokenizer_model, data_prefix + ".bin", data_prefix + ".idx")
               if not os.path.isfile(path)]
    if missing:
        raise SystemExit(f"[sweep] no such file: {', '.join(missing)} (--data-prefix "
                         f"{data_prefix}, --tokenizer-model {tokenizer_model})")
    fingerprint = data_fingerprint(data_prefix, tokenizer_model)
    if os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as handle:
            recorded = json.load(handle)
        differing = [name for name in fingerprint if recorded.get(name) != fingerprint[name]]
        if differing:
            files = {"tokenizer_model": tokenizer_model, "bin": data_prefix + ".bin",
                     "idx": data_prefix + ".idx"}
            raise SystemExit(
                f"[sweep] the data differs from the one the sweep's runs trained on "
                f"({record_path}): {', '.join(files[name] for name in differing)} "
                f"(sha256 {', '.join(fingerprint[name][:12] for name in differing)}; recorded "
                f"{', '.join(str(recorded.get(name))[:12] for name in differing)}). Tokenize the "
                f"sample corpus with {os.path.join(out, TOKENIZER_COPY)} (reproduce_sr_sweep.sh "
                f"does) and check that the corpus packages are the pinned ones.")
        return
    os.makedirs(out, exist_ok=True)
    shutil.copyfile(tokenizer_model, os.path.join(out, TOKENIZER_COPY + ".partial"))
    os.replace(os.path.join(out, TOKENIZER_COPY + ".partial"), os.path.join(out, TOKENIZER_COPY))
    with open(record_path + ".partial", "w", encoding="utf-8") as handle:
        json.dump(fingerprint, handle, indent=1, sort_keys=True)
    os.replace(record_path + ".partial", record_path)
    if commit:
        _commit(f"{label}: the data every run trains on (its tokenizer, sha256 of the files)",
                os.path.join(out, TOKENIZER_COPY), record_path)


def run_cpu(run_dir: str) -> str:
    """The CPU a finished run trained on, from its log's `[setup] CPU capability`
    line (e.g. "AVX2, BF16 products as FP32 GEMMs"); "unknown" without one."""
    with open(os.path.join(run_dir, "run.log"), encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("[setup] CPU capability "):
                capability = line.split()[3].rstrip(":")
                native = "with native BF16 products" in line
                return f"{capability}, BF16 products {'native' if native else 'as FP32 GEMMs'}"
    return "unknown"


def progress_line(store: ResultStore, args) -> str:
    """How many planned runs are done, how long they took (from their run.json)
    and on which kinds of CPU (their bits differ between kinds, not their statistics)."""
    planned = plan(store, args)
    records, cpus = [], collections.Counter()
    for spec in planned:
        if store.done(spec):
            with open(os.path.join(store.path(spec), "run.json"), encoding="utf-8") as handle:
                records.append(json.load(handle))
            cpus[run_cpu(store.path(spec))] += 1
    hours = sum(record["wall_minutes"] for record in records) / 60
    scope = ("" if args.v2 or best_lr(store, args.base_lr) is not None
             else " (the scan is unfinished, so the grid is not counted yet)")
    machines = "; ".join(f"{count} on {cpu}" for cpu, count in cpus.most_common())
    return (f"Sweep progress: {len(records)} of {len(planned)} planned runs done{scope}; "
            f"their wall times add up to {hours:.1f} h (each run on 1 thread, "
            f"{args.jobs} at a time; a resumed run counts all its attempts). "
            f"CPUs: {machines or 'none yet'}.")


def data_line(data_prefix: str, shape: Shape) -> str:
    """What the runs train and validate on: the --split document ranges of the corpus
    and their tokens, how many passes over the train split a run makes, and how much
    of the validation split an evaluation reads."""
    from megatron_sr.data.gpt_dataset import split_document_ranges
    from megatron_sr.data.indexed_dataset import IndexedDataset

    lengths = IndexedDataset(data_prefix).sequence_lengths
    (train_start, train_end), (valid_start, valid_end), _ = split_document_ranges(
        SPLIT, len(lengths))
    train_tokens = int(lengths[train_start:train_end].sum(dtype=np.int64))
    valid_tokens = int(lengths[valid_start:valid_end].sum(dtype=np.int64))
    run_tokens = shape.train_iters * shape.global_batch_size * shape.seq_length
    eval_tokens = shape.eval_iters * shape.global_batch_size * shape.seq_length
    return (f"Data (--split {SPLIT} of {len(lengths)} documents, {train_tokens + valid_tokens:,} "
            f"tokens): training on documents {train_start}-{train_end - 1} ({train_tokens:,} "
            f"tokens), so a run's {run_tokens:,} training tokens are "
            f"{run_tokens / train_tokens:.2f} passes over them; validation on "
            f"{eval_tokens:,} tokens of documents {valid_start}-{valid_end - 1} "
            f"({valid_tokens:,} tokens).")


def _trains_longer(run_dir: str, shape: Shape) -> bool:
    with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as handle:
        return json.load(handle).get("train_iters", shape.train_iters) > shape.train_iters


def report(store: ResultStore, args, shape: Shape) -> int:
    """compare_runs --aggregate over the finished runs, into OUT.md and OUT.png;
    with --v2 the longer arm's runs separately, into OUT_long.md and OUT_long.png
    (compare_runs groups runs by strategy, LR and variant, not by length)."""
    import compare_runs

    runs = sorted(glob.glob(os.path.join(store.runs_dir, "*", "tensorboard")))
    if not runs:
        print(f"[sweep] no finished run in {store.runs_dir}", file=sys.stderr)
        return 1
    out = os.path.normpath(args.out)
    table = out + ".md"
    longer = [run for run in runs if _trains_longer(os.path.dirname(run), shape)]
    runs = [run for run in runs if run not in longer]
    status = 0
    if runs:
        status = compare_runs.main([*runs, "--aggregate", "--table", table, "--plot", out + ".png",
                                    "--title", f"{store.label}: mean over seeds"])
    if longer:
        status = compare_runs.main([*longer, "--aggregate", "--table", out + "_long.md", "--plot",
                                    out + "_long.png", "--title",
                                    f"{store.label}, {V2_LONG_FACTOR}x the steps: mean over seeds"]) or status
    lines = [progress_line(store, args), data_line(args.data_prefix, shape)]
    with open(table, "a", encoding="utf-8") as handle:
        handle.write("".join(f"\n{line}\n" for line in lines))
    print("\n".join(lines))
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-prefix", required=True, help="the tokenized corpus (.bin/.idx)")
    parser.add_argument("--tokenizer-model", required=True, help="its SentencePiece model")
    parser.add_argument("--v2", action="store_true",
                        help="the second sweep (`v2_runs`, on the interleaved corpus); its defaults "
                             "of --out, --cache-dir and --staging-dir end in sr_sweep_v2")
    parser.add_argument("--out", help="default: docs/results/sr_sweep (--v2: .../sr_sweep_v2)")
    parser.add_argument("--cache-dir", help="dataset index cache (default: .cache/sr_sweep[_v2])")
    parser.add_argument("--staging-dir",
                        help="where runs train and keep their checkpoints until they finish "
                             "(default: ~/.cache/megatron_sr/sr_sweep[_v2]_staging)")
    parser.add_argument("--base-lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads-per-run", type=int, default=1)
    parser.add_argument("--max-runs", type=int, help="stop after starting this many runs")
    parser.add_argument("--quick", action="store_true", help="a tiny shape, for tests")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--report", action="store_true",
                        help="write OUT.md and OUT.png from the finished runs and exit")
    args = parser.parse_args(argv)
    name = "sr_sweep_v2" if args.v2 else "sr_sweep"
    args.out = args.out or os.path.join(ROOT, "docs", "results", name)
    args.cache_dir = args.cache_dir or os.path.join(ROOT, ".cache", name)
    args.staging_dir = args.staging_dir or os.path.join(os.path.expanduser("~"), ".cache", "megatron_sr",
                                                        f"{name}_staging")
    shape = QUICK_SHAPE if args.quick else Shape()
    args.shape = shape
    store = ResultStore(args.out, args.staging_dir, "SR sweep v2" if args.v2 else "SR sweep")

    if args.report:
        return report(store, args, shape)
    if args.dry_run:
        if args.v2:
            print(f"sweep v2 at LR {V2_LR:g} (the first sweep's best) and its multiples {V2_MULTIPLIERS}")
        else:
            lr = best_lr(store, args.base_lr)
            print(f"best bf16-mixed LR: {'not known yet (scan unfinished)' if lr is None else f'{lr:g}'}")
        for spec in plan(store, args):
            print(f"{'done ' if store.done(spec) else 'to do'}  {spec.name}")
        return 0

    check_data(args.out, args.data_prefix, args.tokenizer_model, args.commit, store.label)
    running: list[RunningJob] = []
    started = failed = 0
    while True:
        waiting = [spec for spec in plan(store, args) if not store.done(spec)
                   and all(job.spec != spec for job in running)]
        can_start = args.max_runs is None or started < args.max_runs
        while waiting and can_start and len(running) < args.jobs:
            running.append(start_run(waiting.pop(0), store, shape, args))
            started += 1
            can_start = args.max_runs is None or started < args.max_runs
        if not running:
            break
        time.sleep(0.5 if args.quick else 10)
        for job in running:
            job.record_wall_time(store.staging(job.spec))
        for job in [job for job in running if job.process.poll() is not None]:
            running.remove(job)
            failed += not finish_run(job, store, shape, args.commit)
        if failed:  # a failing run would fail again: stop starting new ones
            for job in running:
                job.process.wait()
                finish_run(job, store, shape, args.commit)
            break
    remaining = [spec for spec in plan(store, args) if not store.done(spec)]
    print(f"[sweep] {len(remaining)} runs left" + (" (scan unfinished: the grid is not planned "
          "yet)" if not args.v2 and best_lr(store, args.base_lr) is None else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
