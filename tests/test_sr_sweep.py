"""examples/sr_sweep.py: the run plan, its flags, the result store, resuming."""
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest_plugins = ["data_fixtures"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


sr_sweep = _load("sr_sweep", "examples/sr_sweep.py")


def test_every_run_parses_to_the_intended_job():
    from megatron_sr.config import parse_args

    shape = sr_sweep.Shape()
    runs = sr_sweep.grid_runs(2e-3, [1, 2, 3]) + sr_sweep.scan_runs(1e-3)[:1]
    assert len({spec.name for spec in runs}) == len(runs)
    assert len(sr_sweep.grid_runs(2e-3, [1])) == 3 * 3 + 2 + 2
    v2 = sr_sweep.v2_runs([1, 2, 3], shape)
    assert len({spec.name for spec in v2}) == len(v2)
    for spec in runs + v2:
        job = parse_args(spec.flags(shape, "data/x", "tok.model", "tb", "cache"), 1)
        assert job.optimizer.precision == spec.precision and job.optimizer.lr == spec.lr
        assert job.optimizer.min_lr == pytest.approx(spec.lr / 10)
        assert job.training.seed == spec.seed
        assert job.training.train_iters == spec.iters(shape)
        tokens = job.training.train_iters * job.training.global_batch_size * job.model.seq_length
        assert tokens >= 2_000_000
        assert job.training.eval_iters * job.training.global_batch_size * job.model.seq_length \
            >= 65_536
        assert job.num_microbatches == (8 if spec.micro_batch_size == 1 else 1)
        assert job.optimizer.grad_reduce_dtype == spec.grad_reduce_dtype
        assert job.optimizer.grad_accumulation_rounding == (spec.grad_accumulation_rounding or "nearest")


def test_the_v2_plan():
    """Issue 28: 2e-3 (the first sweep's best LR) and 2x for bf16-mixed, bf16
    and bf16-sr; the accumulation ablation at 1x with 8 micro-batches (bf16
    buffer RTN, bf16 buffer SR, fp32 buffer); then the longer arm (bf16-sr vs
    bf16, twice the steps); 3 seeds each, every seed's short runs first."""
    shape = sr_sweep.Shape()
    runs = sr_sweep.v2_runs([1, 2, 3], shape)
    grid = {(s.precision, s.lr, s.seed) for s in runs
            if s.micro_batch_size is None and s.train_iters is None}
    assert grid == {(p, lr, seed) for p in ("bf16-mixed", "bf16", "bf16-sr") for lr in (2e-3, 4e-3)
                    for seed in (1, 2, 3)}
    ablation = [s for s in runs if s.micro_batch_size == 1]
    assert {(s.grad_reduce_dtype, s.grad_accumulation_rounding, s.seed) for s in ablation} == {
        (dtype, rounding, seed) for dtype, rounding in (("bf16", None), ("bf16", "stochastic"), ("fp32", None))
        for seed in (1, 2, 3)}
    assert all(s.precision == "bf16-sr" and s.lr == 2e-3 for s in ablation)
    longer = [s for s in runs if s.train_iters is not None]
    assert {(s.precision, s.seed) for s in longer} == {(p, seed) for p in ("bf16-sr", "bf16") for seed in (1, 2, 3)}
    assert all(s.train_iters == 2 * shape.train_iters and s.lr == 2e-3 for s in longer)
    assert len(runs) == 18 + 9 + 6 and runs[-len(longer):] == longer
    assert runs[:9] == [s for s in runs if s.seed == 1 and s.train_iters is None]
    assert "bf16-sr_lr0.002_seed1_mbs1_gradbf16_accsr" in {s.name for s in runs}


@pytest.fixture(scope="module")
def tiny_data(sample_slice, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep_data")
    subprocess.run([PYTHON, "tools/train_tokenizer.py", "--input", sample_slice, "--output-prefix",
                    str(folder / "tok"), "--vocab-size", "600"], cwd=ROOT, check=True,
                   capture_output=True)
    subprocess.run([PYTHON, "tools/preprocess_data.py", "--input", sample_slice, "--output-prefix",
                    str(folder / "slice"), "--tokenizer-type", "SentencePieceTokenizer",
                    "--tokenizer-model", str(folder / "tok.model"), "--append-eod"],
                   cwd=ROOT, check=True, capture_output=True)
    return str(folder / "slice_text_document"), str(folder / "tok.model")


def _sweep(tiny_data, out, *extra, env=None):
    prefix, tokenizer = tiny_data
    return subprocess.run([PYTHON, "examples/sr_sweep.py", "--quick", "--data-prefix", prefix,
                           "--tokenizer-model", tokenizer, "--out", str(out), "--cache-dir",
                           str(out / "cache"), "--staging-dir", str(out / "staging"),
                           "--seeds", "1", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))


def test_the_report_says_what_the_runs_train_and_validate_on(tmp_path):
    from megatron_sr.data.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "corpus")
    with IndexedDatasetBuilder(prefix, dtype=np.uint16) as builder:
        for length in [10] * 97 + [20] * 3:  # 100 documents: 97 train, 3 validation
            builder.add_document(np.arange(length))
    line = sr_sweep.data_line(prefix, sr_sweep.Shape())
    assert line == ("Data (--split 97,3,0 of 100 documents, 1,030 tokens): training on documents "
                    "0-96 (970 tokens), so a run's 2,097,152 training tokens are 2162.01 passes "
                    "over them; validation on 65,536 tokens of documents 97-99 (60 tokens).")


@pytest.mark.slow
def test_scan_then_grid_resumes_from_published_runs(tiny_data, tmp_path):
    out = tmp_path / "sweep"
    result = _sweep(tiny_data, out, "--max-runs", "4", "--jobs", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    store = sr_sweep.ResultStore(str(out), str(out / "staging"))
    scan = sr_sweep.scan_runs(1e-3)
    assert all(store.done(spec) for spec in scan)
    record = json.loads((out / "runs" / scan[0].name / "run.json").read_text())
    assert record["precision"] == "bf16-mixed" and record["final_valid_loss"] > 0
    assert (out / "runs" / scan[0].name / "run.log").is_file()
    assert not (out / "runs" / scan[0].name / "checkpoints").exists()
    assert not os.listdir(out / "staging")  # every started run was published
    best = sr_sweep.best_lr(store, 1e-3)
    losses = {spec.lr: store.final_valid_loss(spec) for spec in scan}
    assert best == min(losses, key=losses.get)

    plan = _sweep(tiny_data, out, "--dry-run").stdout
    assert f"best bf16-mixed LR: {best:g}" in plan
    assert plan.count("done ") == 4  # the scan's runs, each listed once (the grid reuses them)
    assert plan.count("to do") == len({s.name for s in sr_sweep.grid_runs(best, [1])}
                                      - {s.name for s in scan})
    assert f"to do  bf16-sr_lr{best:g}_seed1_mbs1_gradfp32" in plan

    report = _sweep(tiny_data, out, "--report")
    assert report.returncode == 0, report.stderr[-2000:]
    table = (tmp_path / "sweep.md").read_text()
    assert table.count("| bf16-mixed |") == 4 + 1  # a row per LR, and the best LR
    planned = 4 + len({s.name for s in sr_sweep.grid_runs(best, [1])} - {s.name for s in scan})
    assert f"Sweep progress: 4 of {planned} planned runs done;" in table
    assert re.search(r"CPUs: 4 on [A-Z0-9_]+, BF16 products (native|as FP32 GEMMs)\.", table)
    assert "All 4 runs ran code commit " in table
    assert sr_sweep.data_line(tiny_data[0], sr_sweep.QUICK_SHAPE) in table
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_run_is_not_published(tiny_data, tmp_path):
    out = tmp_path / "sweep"
    result = _sweep(tiny_data, out, "--max-runs", "1", "--jobs", "1",
                    env={"MEGATRON_SR_FAULT": "eio@checkpoint-write"})
    assert result.returncode == 1 and "FAILED" in result.stderr
    assert not (out / "runs").exists()
    name = sr_sweep.scan_runs(1e-3)[0].name
    assert "error" in (out / "staging" / name / "run.log").read_text().lower()


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint_to_the_same_result(tiny_data, tmp_path):
    first = sr_sweep.scan_runs(1e-3)[0]
    killed = _sweep(tiny_data, tmp_path / "a", "--max-runs", "1", "--jobs", "1",
                    env={"MEGATRON_SR_FAULT": "kill@train-step,iteration=6"})
    assert killed.returncode == 1
    assert (tmp_path / "a" / "staging" / first.name / "checkpoints" / sr_sweep.TRACKER).is_file()
    killed_attempt = json.loads(
        (tmp_path / "a" / "staging" / first.name / sr_sweep.ATTEMPTS).read_text())
    assert killed_attempt["attempts"] == 1 and killed_attempt["seconds"] > 0
    resumed = _sweep(tiny_data, tmp_path / "a", "--max-runs", "1", "--jobs", "1")
    assert resumed.returncode == 0 and f"resumed {first.name}" in resumed.stdout
    record = json.loads((tmp_path / "a" / "runs" / first.name / "run.json").read_text())
    # The wall time counts both attempts: the killed one's and the resumed one's (seconds).
    assert record["attempts"] == 2 and record["wall_minutes"] * 60 > killed_attempt["seconds"] + 1
    clean = _sweep(tiny_data, tmp_path / "b", "--max-runs", "1", "--jobs", "1")
    assert clean.returncode == 0
    losses = [sr_sweep.ResultStore(str(tmp_path / x), str(tmp_path / x / "staging"))
              .final_valid_loss(first) for x in ("a", "b")]
    assert losses[0] == losses[1]


def test_the_first_start_records_the_data_and_a_later_start_on_other_data_stops(tiny_data,
                                                                                tmp_path):
    prefix, tokenizer = tiny_data
    out = tmp_path / "sweep"
    assert _sweep(tiny_data, out, "--max-runs", "0").returncode == 0
    record = json.loads((out / sr_sweep.DATA_RECORD).read_text())
    assert record == sr_sweep.data_fingerprint(prefix, tokenizer)
    assert (out / sr_sweep.TOKENIZER_COPY).read_bytes() == open(tokenizer, "rb").read()
    assert _sweep(tiny_data, out, "--max-runs", "0").returncode == 0  # same data: runs on

    other = tmp_path / "other.model"
    other.write_bytes(open(tokenizer, "rb").read() + b"\0")
    stopped = _sweep((prefix, str(other)), out, "--max-runs", "0")
    assert stopped.returncode != 0
    assert "the data differs from the one the sweep's runs trained on" in stopped.stderr
    assert str(other) in stopped.stderr and prefix not in stopped.stderr
    assert json.loads((out / sr_sweep.DATA_RECORD).read_text()) == record  # record unchanged

    missing = _sweep((prefix + "_missing", tokenizer), out, "--max-runs", "0")
    assert missing.returncode != 0 and f"no such file: {prefix}_missing.bin" in missing.stderr


def test_sample_data_tokenizes_with_a_given_tokenizer_instead_of_training_one(tiny_data, tmp_path):
    """What reproduce_sr_sweep.sh does once the sweep's tokenizer is committed."""
    _, tokenizer = tiny_data
    script = ('set -euo pipefail; source examples/sample_data.sh; '
              'echo "$sample_tokenizer"; echo "$sample_prefix"')
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, root=ROOT, py=PYTHON,
                                                  SAMPLE_DIR=str(tmp_path / "data"),
                                                  SAMPLE_TOKENIZER_SOURCE=tokenizer))
    assert result.returncode == 0, result.stderr[-2000:]
    used, prefix = result.stdout.split()[-2:]
    assert used == str(tmp_path / "data" / "tokenizer.model")
    assert open(used, "rb").read() == open(tokenizer, "rb").read()
    assert not (tmp_path / "data" / "tokenizer.vocab").exists()  # nothing was trained
    assert os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def _regenerated_report(tmp_path, folder: str) -> tuple[str, int]:
    """(compare_runs' --aggregate report on the committed runs of
    docs/results/<folder>/runs whose length is the plan's, the number of
    committed runs), checked against the committed docs/results/<folder>.md."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import compare_runs

    results = os.path.join(ROOT, "docs", "results")
    shape = sr_sweep.Shape()
    done = [path for path in glob.glob(os.path.join(results, folder, "runs", "*"))
            if os.path.isfile(os.path.join(path, "run.json"))]
    runs = sorted(os.path.join(path, "tensorboard") for path in done
                  if not sr_sweep._trains_longer(path, shape))  # the longer arm is reported apart
    table = str(tmp_path / f"{folder}.md")
    assert compare_runs.main([*runs, "--aggregate", "--table", table]) == 0
    with open(table, encoding="utf-8") as handle:
        regenerated = handle.read()
    with open(os.path.join(results, f"{folder}.md"), encoding="utf-8") as handle:
        committed = handle.read()
    assert committed.startswith(regenerated), \
        f"rerun: bash examples/reproduce_sr_sweep.sh {'--v2 ' if 'v2' in folder else ''}--report"
    assert re.search(rf"^Sweep progress: {len(done)} of \d+ planned runs done", committed, re.M)
    return regenerated, len(done)


def _assert_quoted(regenerated: str, section: str) -> None:
    tables = [table for table in re.findall(r"(?:^\|.*\n)+", regenerated, re.M)
              if table.startswith(("| precision | lr |", "| A | B |"))]  # not the best-LR one
    claims = re.findall(r"^- \([123]\) .*$", regenerated, re.M)
    assert len(tables) == 2 and len(claims) == 3
    for quoted in tables + claims:
        assert quoted in section, f"RESULTS.md does not quote the report's {quoted[:40]!r}"


def _results_page() -> str:
    with open(os.path.join(ROOT, "docs", "RESULTS.md"), encoding="utf-8") as handle:
        return handle.read()


def test_results_md_quotes_what_compare_runs_prints_from_the_committed_runs(tmp_path):
    """docs/results/sr_sweep.md is compare_runs' report on exactly the committed
    runs (regenerated here), and RESULTS.md's sweep section quotes its tables
    and claims verbatim: the numbers in the docs are the runs' numbers."""
    regenerated, _ = _regenerated_report(tmp_path, "sr_sweep")
    page = _results_page()
    _assert_quoted(regenerated, page[page.index("## The sweep"):page.index("## The second sweep")])


def test_results_md_quotes_the_second_sweeps_report_and_its_progress(tmp_path):
    """The same for the second sweep (docs/results/sr_sweep_v2.md), whose
    RESULTS.md section also says how many of its planned runs are done."""
    regenerated, done = _regenerated_report(tmp_path, "sr_sweep_v2")
    page = _results_page()
    section = page[page.index("## The second sweep"):page.index("# The quick variant")]
    _assert_quoted(regenerated, section)
    planned = len(sr_sweep.v2_runs([1, 2, 3], sr_sweep.Shape()))
    assert f"{done} of its {planned} planned runs" in section


def test_interleaving_keeps_each_source_in_order_and_spreads_it_over_the_corpus():
    from megatron_sr.data.sample_files import interleave_documents

    long = [{"text": "x" * 100, "source": f"long {i}"} for i in range(4)]
    short = [{"text": "y" * 10, "source": f"short {i}"} for i in range(40)]
    order = [d["source"] for d in interleave_documents([short, long])]
    assert sorted(order) == sorted(d["source"] for d in short + long)
    assert [s for s in order if s.startswith("long")] == [f"long {i}" for i in range(4)]
    assert [s for s in order if s.startswith("short")] == [f"short {i}" for i in range(40)]
    # "long 0" has its middle at 1/8 of its source: between the shorts whose middles
    # are at 45/400 and 55/400 of theirs.
    assert order.index("long 0") == order.index("short 4") + 1
    assert order == [d["source"] for d in interleave_documents([short, long])]  # deterministic


def test_the_v2_corpus_validates_on_both_sources(sample_corpus, tmp_path):
    """The interleaved sample corpus: the same documents as the first sweep's,
    under its own cache name, and its --split validation range holds Bible
    chapters and plays, each a sizeable share of the text."""
    from megatron_sr.data import sample_files
    from megatron_sr.data.gpt_dataset import split_document_ranges

    path = sample_files.sample_corpus(str(tmp_path), interleaved=True)
    assert os.path.basename(path) == sample_files.SAMPLE_CORPUS_INTERLEAVED_NAME != \
        os.path.basename(sample_corpus)
    with open(path, encoding="utf-8") as handle:
        documents = [json.loads(line) for line in handle]
    with open(sample_corpus, encoding="utf-8") as handle:
        first = [json.loads(line) for line in handle]
    assert sorted(d["source"] for d in documents) == sorted(d["source"] for d in first)
    _, (start, end), _ = split_document_ranges(sr_sweep.SPLIT, len(documents))
    bible = sum(len(d["text"]) for d in documents[start:end] if d["source"].startswith("kjv "))
    plays = sum(len(d["text"]) for d in documents[start:end] if d["source"].startswith("shakespeare "))
    assert 0.25 < bible / (bible + plays) < 0.75


def test_v2_dry_run_lists_its_plan_under_its_own_folders(tiny_data, tmp_path):
    prefix, tokenizer = tiny_data
    result = subprocess.run([PYTHON, "examples/sr_sweep.py", "--v2", "--quick", "--dry-run", "--data-prefix",
                             prefix, "--tokenizer-model", tokenizer, "--out", str(tmp_path / "v2")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    listed = [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("to do")]
    assert listed == [spec.name for spec in sr_sweep.v2_runs([1, 2, 3], sr_sweep.QUICK_SHAPE)]
    assert "bf16-sr_lr0.002_seed1_iters16" in listed
