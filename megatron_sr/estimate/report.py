"""The estimator's reports: one job's per-stage table (`format_estimate`) and
strategies side by side (`format_comparison`), in GiB (2^30 bytes)."""
from __future__ import annotations

from typing import Optional

from megatron_sr.config import JobConfig
from megatron_sr.estimate.job import JobEstimate

GIB = 2 ** 30


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def _layout_line(job: JobConfig) -> str:
    parallel, model = job.parallel, job.model
    vp = parallel.virtual_pipeline_model_parallel_size
    parts = [f"TP={parallel.tensor_model_parallel_size}",
             f"PP={parallel.pipeline_model_parallel_size}" + (f" x VP={vp}" if vp else ""),
             f"DP={job.data_parallel_size}", f"world={job.world_size}",
             f"micro-batch={job.training.micro_batch_size}",
             f"global batch={job.training.global_batch_size}",
             f"micro-batches/step={job.num_microbatches}"]
    if parallel.sequence_parallel:
        parts.append("sequence parallel")
    if parallel.use_distributed_optimizer:
        parts.append("distributed optimizer")
    if model.recompute_granularity:
        parts.append(f"recompute {model.recompute_granularity}")
    return ", ".join(parts)


def _stage_table(title: str, estimate: JobEstimate, columns: list[tuple]) -> list[str]:
    """A blank line, `title`, a header and one row per pipeline stage;
    `columns`: (heading, width, the cell of a stage as a str)."""
    columns = [("stage", 5, lambda stage: str(stage.pipeline_rank))] + columns
    return ["", title, " ".join(f"{heading:>{width}}" for heading, width, _ in columns)] + [
        " ".join(f"{cell(stage):>{width}}" for _, width, cell in columns)
        for stage in estimate.stages]


def _gib_of(field: str):
    return lambda stage: _gib(getattr(stage, field))


def format_estimate(estimate: JobEstimate) -> str:
    """The per-rank report of one strategy, in GiB (2^30 bytes)."""
    job = estimate.job
    lines = [f"model: {estimate.num_parameters / 1e9:.3f} B parameters (vocab padded to "
             f"{job.model.vocab_size}); precision {estimate.strategy.name}",
             f"layout: {_layout_line(job)}"]
    lines += _stage_table("memory per rank (GiB)", estimate, [
        ("params", 8, _gib_of("params")), ("grads", 8, _gib_of("grads")),
        ("master", 8, _gib_of("master")), ("optim", 8, _gib_of("optimizer")),
        ("act/mb", 8, _gib_of("activations_per_microbatch")),
        ("in flight", 10, lambda stage: "+".join(map(str, stage.microbatches_in_flight))),
        ("act peak", 9, _gib_of("activations_peak")), ("total", 8, _gib_of("total"))])
    lines += _stage_table("sent per rank per step (GiB)", estimate, [
        ("DP r-scat", 10, _gib_of("sent_grad_reduce_scatter")),
        ("DP a-gath", 10, _gib_of("sent_param_all_gather")),
        ("DP a-red", 9, _gib_of("sent_grad_all_reduce")),
        ("TP", 8, _gib_of("sent_tensor_parallel")), ("PP", 8, _gib_of("sent_pipeline")),
        ("total", 8, _gib_of("sent_total"))])
    lines += _stage_table("start-up and overlap per rank", estimate, [
        ("init tmp", 9, _gib_of("init_temporary")), ("setup peak", 11, _gib_of("setup_peak")),
        ("grad-reduce overlap", 20, lambda stage: f"{stage.grad_reduce_overlap:.3f}"),
        ("param-gather overlap", 21, lambda stage: f"{stage.param_gather_overlap:.3f}")])
    flops = estimate.model_flops_per_step
    lines += ["", f"model FLOPs per step: {flops:.4g} ({flops / job.world_size:.4g} per rank)"]
    return "\n".join(lines)


DEVICE_MEMORY_GIB = {"80GB": 81559 / 1024, "141GB": 143771 / 1024}
"""What nvidia-smi reports as total memory of an H100 80GB and an H200 141GB, in GiB."""


def format_comparison(estimates: list[JobEstimate],
                      references: tuple[str, ...] = ("bf16-mixed", "amp"),
                      device_memory_gib: Optional[dict[str, float]] = None,
                      markdown: bool = False) -> str:
    """One row per strategy: the peak rank's memory (GiB), the ratio of its total to
    each of `references`' totals, and which of `device_memory_gib` it fits in
    (total <= capacity; no headroom for what the estimate leaves out)."""
    device_memory_gib = DEVICE_MEMORY_GIB if device_memory_gib is None else device_memory_gib
    by_name = {e.strategy.name: e for e in estimates}
    refs = [name for name in references if name in by_name]
    header = (["precision", "params", "grads", "master", "optimizer", "activations", "total"]
              + [f"vs {r}" for r in refs] + ["fits in"])
    rows = []
    for estimate in estimates:
        stage = estimate.peak_stage
        fits = [name for name, gib in device_memory_gib.items() if stage.total / GIB <= gib]
        rows.append([estimate.strategy.name]
                    + [_gib(n) for n in (stage.params, stage.grads, stage.master, stage.optimizer,
                                         stage.activations_peak, stage.total)]
                    + [f"{stage.total / by_name[r].peak_stage.total:.3f}" for r in refs]
                    + [", ".join(fits) or "none"])
    title = (f"layout: {_layout_line(estimates[0].job)}\n"
             f"peak rank's memory (GiB); vs X = this total / X's total")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
        lines = [" ".join(cell.rjust(width) if i else cell.ljust(width)
                          for i, (cell, width) in enumerate(zip(row, widths)))
                 for row in [header] + rows]
    return title + "\n\n" + "\n".join(lines)
