"""Compare training runs from their TensorBoard event files.

    python tools/compare_runs.py RUN_DIR [RUN_DIR ...] [--plot curves.png] [--table table.md]

Each RUN_DIR is a run's --tensorboard-dir (all event files in it are read, so
a resumed run counts as one). A run is labelled by the precision strategy and
peak learning rate that `megatron_sr.training_log.write_run_summary` records in
the text summary "run/config"; event files without it (e.g. from Megatron-LM)
fall back to the folder name, or to `--label`.

Writes:
- with --plot (needs matplotlib, `pip install megatron_sr[plot]`): a PNG with
  training loss, validation loss and update absorption against iteration, one
  line per run: colour = strategy, line style = learning rate;
- a markdown table (to --table, else stdout) of each run's final validation
  loss and perplexity (the last "lm loss validation" point), final training
  loss (mean of the last --tail logged points), median tokens/s over the run's
  logged intervals (the first dropped: it holds start-up/compilation), the
  training-state bytes of memory_report, peak memory ("memory/peak-bytes":
  peak RSS on the CPU, max allocated on CUDA; logging rank only) and the
  update absorption (mean of the last --tail points), the largest gradient
  norm logged after the LR warm-up (spikes at peak LR); then, per strategy,
  the learning rate with the best validation perplexity.
- with --aggregate, runs that differ only in their seed are one row instead:
  the mean, min and max over seeds of the final validation loss, the
  perplexity of the mean loss, the mean final training loss and absorption;
  the best LR of each strategy by mean loss; and the paper's three claims
  checked on those means (bf16-sr vs bf16-mixed at equal LR, each at its best
  LR, RTN bf16 against both); the same comparisons paired by seed (mean, min
  and max of the per-seed perplexity gap, and whether its sign holds on every
  seed), on the validation loss and on the final training loss; with --plot,
  the mean training loss, validation loss and absorption of each group
  against iteration.
Both tables end with the code commits the runs ran (from the run.json that
examples/sr_sweep.py writes beside a run's tensorboard folder), so a table
mixing code versions says so.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tags training writes and the strategies' order: torch-free modules of the library.
from megatron_sr.metric_names import (ABSORPTION, CONFIG_TEXT, GRAD_NORM, PEAK_BYTES,  # noqa: E402
                                      STATE_BYTES, TOKENS_PER_S, TRAIN_LOSS, VALID_LOSS,
                                      VALID_PPL)
from megatron_sr.precision.names import STRATEGY_NAMES as STRATEGY_ORDER  # noqa: E402

# Colours of the plot per strategy (others get the next colour of the cycle).
STRATEGY_COLORS = {"fp32": "black", "amp": "tab:purple", "bf16-mixed": "tab:blue",
                   "bf16": "tab:red", "bf16-sr": "tab:green", "bf16-kahan": "tab:orange"}
# Line style per learning rate (ascending); VARIANT_STYLE marks the variants of --aggregate.
LINE_STYLES = ("-", "--", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)))
VARIANT_STYLE = "-."


@dataclass
class Run:
    """One run's scalars (tag -> [(step, value)], step-sorted) and labels."""

    path: str
    scalars: dict[str, list[tuple[int, float]]]
    config: dict[str, str] = field(default_factory=dict)
    label_override: Optional[str] = None
    code_commit: Optional[str] = None  # from ../run.json, where the sweep wrote one

    @property
    def precision(self) -> str:
        if "precision" in self.config:
            return self.config["precision"]
        name = self.name
        known = sorted(STRATEGY_ORDER, key=len, reverse=True)
        return next((s for s in known if name.startswith(s)), name)

    @property
    def lr(self) -> Optional[float]:
        text = self.config.get("lr")
        if text is None:
            match = re.search(r"lr([0-9.eE+-]+)", self.name)
            text = match.group(1) if match else None
        try:
            return float(text) if text is not None else None
        except ValueError:
            return None

    @property
    def variant(self) -> str:
        """What sets a run apart beyond strategy, LR and seed: gradient accumulation
        over several micro-batches, a non-default gradient dtype, stochastically
        rounded gradient accumulation ("" when none)."""
        parts = []
        micro, batch = self.config.get("micro-batch-size"), self.config.get("global-batch-size")
        world = self.config.get("world-size", "1")
        if micro and batch and micro.isdigit() and batch.isdigit() and world.isdigit():
            data_parallel = int(world) // (int(self.config.get("tensor-model-parallel-size", 1))
                                           * int(self.config.get("pipeline-model-parallel-size", 1)))
            steps = int(batch) // (int(micro) * max(1, data_parallel))
            if steps > 1:
                parts.append(f"{steps} micro-batches")
        dtype = self.config.get("grad-reduce-dtype", "strategy default")
        if dtype != "strategy default":
            parts.append(f"grads {dtype}")
        if self.config.get("grad-accumulation-rounding", "nearest") == "stochastic":
            parts.append("grads SR-accumulated")
        return ", ".join(parts)

    @property
    def name(self) -> str:
        """The run's folder name; the folder above for a sweep run's ``NAME/tensorboard``."""
        path = os.path.normpath(self.path)
        if os.path.basename(path) == "tensorboard":
            path = os.path.dirname(path)
        return os.path.basename(path)

    @property
    def seed(self) -> Optional[str]:
        """The --seed the run recorded (None without a config)."""
        return self.config.get("seed")

    @property
    def label(self) -> str:
        if self.label_override:
            return self.label_override
        return self.precision + (f" lr={self.lr:g}" if self.lr is not None else "")

    def series(self, tag: str) -> list[tuple[int, float]]:
        return self.scalars.get(tag, [])

    def last(self, tag: str) -> Optional[float]:
        points = self.series(tag)
        return points[-1][1] if points else None

    def last_step(self, tag: str) -> Optional[int]:
        points = self.series(tag)
        return points[-1][0] if points else None

    def tail_mean(self, tag: str, count: int) -> Optional[float]:
        points = self.series(tag)[-count:]
        return sum(v for _, v in points) / len(points) if points else None

    def max_after_warmup(self, tag: str) -> Optional[float]:
        """The largest logged value after the run's LR warm-up (its recorded
        lr-warmup-iters; the whole run without one): a grad-norm spike at peak LR."""
        warmup = self.config.get("lr-warmup-iters", "0")
        after = int(warmup) if warmup.isdigit() else 0
        values = [v for step, v in self.series(tag) if step > after]
        return max(values) if values else None

    def median_after_first(self, tag: str) -> Optional[float]:
        values = [v for _, v in self.series(tag)]
        if len(values) > 1:
            values = values[1:]
        return statistics.median(values) if values else None


def _parse_config(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            rows[key.strip()] = value.strip()
    return rows


def load_run(path: str, label: Optional[str] = None) -> Run:
    """Reads every event file under `path` (a --tensorboard-dir).
    Raises FileNotFoundError when there is none."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    if not os.path.isdir(path) or not any("tfevents" in f for f in os.listdir(path)):
        raise FileNotFoundError(f"{path}: no TensorBoard event files (expected a --tensorboard-dir)")
    accumulator = ea.EventAccumulator(path, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {}
    for tag in tags.get(ea.SCALARS, []):
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
        scalars[tag] = sorted(by_step.items())  # a resumed run's later point wins
    config = {}
    text_tag = CONFIG_TEXT + "/text_summary"
    if text_tag in tags.get(ea.TENSORS, []):
        tensor = accumulator.Tensors(text_tag)[-1].tensor_proto
        config = _parse_config(b"".join(tensor.string_val).decode("utf-8", "replace"))
    return Run(path=path, scalars=scalars, config=config, label_override=label,
               code_commit=_code_commit(path))


def _code_commit(tensorboard_dir: str) -> Optional[str]:
    record = os.path.join(os.path.dirname(os.path.abspath(tensorboard_dir)), "run.json")
    if not os.path.isfile(record):
        return None
    with open(record, encoding="utf-8") as handle:
        return json.load(handle).get("code_commit")


def code_commits_note(runs: Sequence[Run]) -> Optional[str]:
    """One line naming the code commit(s) the runs ran; None when no run records one."""
    counts = collections.Counter(run.code_commit or "unknown" for run in runs)
    if set(counts) == {"unknown"}:
        return None
    if len(counts) == 1:
        return f"All {len(runs)} runs ran code commit {next(iter(counts))[:12]}."
    return (f"The runs ran {len(counts)} code commits (their bits differ where the code "
            f"changed in between): " + ", ".join(f"{commit[:12]} ({count} run{'s' * (count > 1)})"
                                                 for commit, count in counts.most_common()) + ".")


def _sort_key(run: Run):
    order = STRATEGY_ORDER.index(run.precision) if run.precision in STRATEGY_ORDER else 99
    return (order, run.precision, run.lr if run.lr is not None else math.inf, run.variant,
            run.path)


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / (1 << 20):.1f}"


def markdown_table(runs: Sequence[Run], tail: int = 5) -> str:
    """The per-run table, then the best learning rate of each strategy."""
    lines = ["| run | precision | lr | iters | train loss | val loss | val ppl | tokens/s "
             "| state MiB | peak MiB | absorption | max grad norm |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        ppl = run.last(VALID_PPL)
        loss = run.last(VALID_LOSS)
        if ppl is None and loss is not None:
            ppl = math.exp(min(20.0, loss))
        iters = run.last_step(TRAIN_LOSS) or run.last_step(VALID_LOSS)
        lines.append(" | ".join([
            f"| {run.name}", run.precision,
            _fmt(run.lr, "g"), _fmt(iters, "d"), _fmt(run.tail_mean(TRAIN_LOSS, tail), ".3f"),
            _fmt(loss, ".4f"), _fmt(ppl, ".1f"), _fmt(run.median_after_first(TOKENS_PER_S), ".0f"),
            _mib(run.last(STATE_BYTES)), _mib(run.last(PEAK_BYTES)),
            _fmt(run.tail_mean(ABSORPTION, tail), ".3f"),
            _fmt(run.max_after_warmup(GRAD_NORM), ".2f")]) + " |")
    best = {}
    for run in runs:
        loss = run.last(VALID_LOSS)
        if loss is not None and (run.precision not in best or loss < best[run.precision].last(VALID_LOSS)):
            best[run.precision] = run
    if best:
        lines += ["", "| precision | best lr | val loss | val ppl |", "|---|---|---:|---:|"]
        for precision, run in best.items():
            loss = run.last(VALID_LOSS)
            lines.append(f"| {precision} | {_fmt(run.lr, 'g')} | {loss:.4f} | "
                         f"{math.exp(min(20.0, loss)):.1f} |")
    note = code_commits_note(runs)
    return "\n".join(lines + (["", note] if note else [])) + "\n"


def final_valid_loss(run: Run) -> Optional[float]:
    """The run's last validation loss."""
    return run.last(VALID_LOSS)


def tail_of(tag: str, tail: int) -> Callable[[Run], Optional[float]]:
    """run -> the mean of its last `tail` logged points of `tag` (a final training
    loss or absorption)."""
    return lambda run: run.tail_mean(tag, tail)


@dataclass
class Group:
    """Runs that differ only in their seed: one (strategy, LR, variant)."""

    precision: str
    lr: Optional[float]
    variant: str
    runs: list[Run]

    @property
    def label(self) -> str:
        lr = f" lr={self.lr:g}" if self.lr is not None else ""
        return self.precision + lr + (f" ({self.variant})" if self.variant else "")

    def values(self, value: Callable[[Run], Optional[float]]) -> list[float]:
        """`value(run)` of each run that has one."""
        return [v for v in map(value, self.runs) if v is not None]

    def values_by_seed(self, value: Callable[[Run], Optional[float]]) -> dict[str, float]:
        """seed -> `value(run)`, for each seeded run that has one."""
        pairs = ((run.seed, value(run)) for run in self.runs if run.seed is not None)
        return {seed: v for seed, v in pairs if v is not None}

    def final_losses(self) -> list[float]:
        return self.values(final_valid_loss)

    def mean_loss(self) -> Optional[float]:
        losses = self.final_losses()
        return statistics.fmean(losses) if losses else None

    def mean_series(self, tag: str) -> list[tuple[int, float]]:
        """The mean over runs at the steps every run logged."""
        by_step: dict[int, list[float]] = {}
        for run in self.runs:
            for step, value in run.series(tag):
                by_step.setdefault(step, []).append(value)
        return [(step, statistics.fmean(values)) for step, values in sorted(by_step.items())
                if len(values) == len(self.runs)]


def group_runs(runs: Sequence[Run]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for run in sorted(runs, key=_sort_key):
        key = (run.precision, run.lr, run.variant)
        groups.setdefault(key, Group(run.precision, run.lr, run.variant, [])).runs.append(run)
    return list(groups.values())


def best_groups(groups: Sequence[Group]) -> dict[str, Group]:
    """The LR with the lowest mean final validation loss of each strategy
    (runs without a variant only)."""
    best: dict[str, Group] = {}
    for group in groups:
        loss = group.mean_loss()
        if group.variant or loss is None:
            continue
        if group.precision not in best or loss < best[group.precision].mean_loss():
            best[group.precision] = group
    return best


def _ppl(loss: float) -> float:
    return math.exp(min(20.0, loss))


def aggregate_table(groups: Sequence[Group], tail: int = 5) -> str:
    """Mean and spread over seeds of each group, the best LR of each strategy, the
    gaps paired by seed, and the paper's claims on the means."""
    lines = ["| precision | lr | variant | seeds | val loss mean | min | max | ppl of mean "
             "| train loss mean | absorption |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for group in groups:
        losses, train = group.final_losses(), group.values(tail_of(TRAIN_LOSS, tail))
        absorption = group.values(tail_of(ABSORPTION, tail))
        mean = group.mean_loss()
        lines.append(" | ".join([
            f"| {group.precision}", _fmt(group.lr, "g"), group.variant or "-", str(len(losses)),
            _fmt(mean, ".4f"), _fmt(min(losses) if losses else None, ".4f"),
            _fmt(max(losses) if losses else None, ".4f"),
            _fmt(_ppl(mean) if mean is not None else None, ".2f"),
            _fmt(statistics.fmean(train) if train else None, ".4f"),
            _fmt(statistics.fmean(absorption) if absorption else None, ".3f")]) + " |")
    best = best_groups(groups)
    if best:
        lines += ["", "| precision | best lr | seeds | val loss mean | ppl |", "|---|---|---:|---:|---:|"]
        for precision, group in best.items():
            lines.append(f"| {precision} | {_fmt(group.lr, 'g')} | {len(group.final_losses())} | "
                         f"{group.mean_loss():.4f} | {_ppl(group.mean_loss()):.2f} |")
    lines += paired_gaps_table(groups, tail)
    claims = paper_claims(groups, tail)
    if claims:
        lines += ["", "Claims (on mean validation perplexity over seeds):", ""]
        lines += [f"- {claim}" for claim in claims]
    note = code_commits_note([run for group in groups for run in group.runs])
    return "\n".join(lines + (["", note] if note else [])) + "\n"


def paired_comparisons(groups: Sequence[Group]) -> list[tuple[Group, Group]]:
    """The (A, B) group pairs compared seed by seed: each strategy against
    bf16-mixed at the same LR, RTN bf16 against bf16-sr at the same LR, and
    each variant against the groups of its strategy and LR listed before it
    (the plain runs, an earlier variant)."""
    plain = {(g.precision, g.lr): g for g in groups if not g.variant}
    pairs = []
    for index, group in enumerate(groups):
        if group.variant:
            pairs += [(group, other) for other in groups[:index]
                      if (other.precision, other.lr) == (group.precision, group.lr)]
            continue
        for reference in ("bf16-mixed", "bf16-sr" if group.precision == "bf16" else None):
            other = plain.get((reference, group.lr))
            if other is not None and other is not group:
                pairs.append((group, other))
    return pairs


def _seed_gaps(losses_a: dict[str, float], losses_b: dict[str, float]) -> list[float]:
    """Perplexity gaps (percent, positive: a is worse) on each seed both have."""
    return [_ppl_gap(losses_a[seed], losses_b[seed]) for seed in losses_a if seed in losses_b]


def _gap_cells(gaps: list[float]) -> str:
    if not gaps:
        return "- | - | - | -"
    agree = ("-" if len(gaps) == 1 else
             "yes" if all(g > 0 for g in gaps) or all(g < 0 for g in gaps) else "no")
    return f"{statistics.fmean(gaps):+.2f}% | {min(gaps):+.2f}% | {max(gaps):+.2f}% | {agree}"


def paired_gaps_table(groups: Sequence[Group], tail: int = 5) -> list[str]:
    """Markdown lines: for each pair of `paired_comparisons`, the perplexity of A
    relative to B on each seed both ran (a seed fixes the initialization and
    the data order), as mean, min and max in percent (positive: A is worse),
    and whether every seed agrees on the sign; first on the final validation
    loss, then on the final training loss (the mean of the last `tail` logged
    points: the same batches for both runs of a seed). Empty when no seed is
    shared."""
    rows = []
    for a, b in paired_comparisons(groups):
        gaps = _seed_gaps(a.values_by_seed(final_valid_loss), b.values_by_seed(final_valid_loss))
        if not gaps:
            continue
        train_loss = tail_of(TRAIN_LOSS, tail)
        train_gaps = _seed_gaps(a.values_by_seed(train_loss), b.values_by_seed(train_loss))
        rows.append(f"| {a.label} | {b.label} | {len(gaps)} | {_gap_cells(gaps)} | "
                    f"{_gap_cells(train_gaps)} |")
    if not rows:
        return []
    return ["", "Paired by seed (the runs of one seed share initialization and data order): "
            "perplexity of A relative to B, per seed, on the validation loss and on the "
            f"training loss (mean of the last {tail} logged points):", "",
            "| A | B | seeds | val: mean | min | max | same sign on every seed "
            "| train: mean | min | max | same sign |",
            "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|", *rows]


def _ppl_gap(loss_a: float, loss_b: float) -> float:
    """Perplexity at loss_a relative to loss_b, in percent (positive: a is worse)."""
    return 100.0 * (_ppl(loss_a) / _ppl(loss_b) - 1.0)


def _relative_ppl(a: Group, b: Group) -> float:
    """Perplexity of a's mean loss relative to b's, in percent (positive: a is worse)."""
    return _ppl_gap(a.mean_loss(), b.mean_loss())


def paper_claims(groups: Sequence[Group], tail: int = 5) -> list[str]:
    """The paper's claims, each stated as met / not met with its numbers:
    (1) bf16-sr within 1% of bf16-mixed in perplexity at every shared LR;
    (2) bf16-sr at its best LR at least as good as bf16-mixed at its best;
    (3) RTN bf16 worse than bf16-sr at every shared LR, by how much, with the
        absorption of each (the mechanism: updates lost to rounding)."""
    plain = {(g.precision, g.lr): g for g in groups if not g.variant and g.mean_loss() is not None}
    claims = []
    shared = sorted(lr for (p, lr) in plain if p == "bf16-sr" and ("bf16-mixed", lr) in plain)
    if shared:
        gaps = [(lr, _relative_ppl(plain["bf16-sr", lr], plain["bf16-mixed", lr])) for lr in shared]
        met = all(abs(gap) <= 1.0 or gap < 0 for _, gap in gaps)
        claims.append(f"(1) bf16-sr within 1% of bf16-mixed at equal LR: "
                      f"{'met' if met else 'not met'} ("
                      + ", ".join(f"lr {lr:g}: {gap:+.2f}%" for lr, gap in gaps) + ")")
    best = best_groups(groups)
    if "bf16-sr" in best and "bf16-mixed" in best:
        gap = _relative_ppl(best["bf16-sr"], best["bf16-mixed"])
        claims.append(f"(2) bf16-sr at its best LR ({best['bf16-sr'].lr:g}) at least as good as "
                      f"bf16-mixed at its best ({best['bf16-mixed'].lr:g}): "
                      f"{'met' if gap <= 0 else 'not met'} ({gap:+.2f}% perplexity)")
    shared = sorted(lr for (p, lr) in plain if p == "bf16" and ("bf16-sr", lr) in plain)
    if shared:
        parts, worse = [], True
        for lr in shared:
            rtn, sr = plain["bf16", lr], plain["bf16-sr", lr]
            gap = _relative_ppl(rtn, sr)
            worse &= gap > 0
            absorption = [statistics.fmean(a) if a else None for a in
                          (g.values(tail_of(ABSORPTION, tail)) for g in (rtn, sr))]
            parts.append(f"lr {lr:g}: {gap:+.2f}% vs bf16-sr, absorption "
                         f"{_fmt(absorption[0], '.3f')} vs {_fmt(absorption[1], '.3f')}")
        claims.append(f"(3) RTN bf16 worse than bf16-sr: {'met' if worse else 'not met'} ("
                      + "; ".join(parts) + ")")
    return claims


def plot_groups(groups: Sequence[Group], path: str, title: Optional[str] = None) -> None:
    """Mean training loss, validation loss and update absorption of each group
    against iteration."""
    plt = _pyplot()
    lrs = sorted({g.lr for g in groups if g.lr is not None})
    panels = [(TRAIN_LOSS, "training loss (mean over seeds)"),
              (VALID_LOSS, "validation loss (mean over seeds)"),
              (ABSORPTION, "update absorption (mean over seeds)")]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5))
    for group in groups:
        color = STRATEGY_COLORS.get(group.precision, "gray")
        style = LINE_STYLES[lrs.index(group.lr) % len(LINE_STYLES)] if group.lr in lrs else "-"
        if group.variant:
            style = VARIANT_STYLE
        for axis, (tag, _) in zip(axes, panels):
            points = group.mean_series(tag)
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, linestyle=style, color=color,
                          label=f"{group.label} (n={len(group.runs)})",
                          marker="o" if tag == VALID_LOSS else None, markersize=3, linewidth=1.2)
    for axis, (tag, name) in zip(axes, panels):
        axis.set_xlabel("iteration")
        axis.set_title(name)
        axis.grid(alpha=0.3)
        finals = [series[-1][1] for series in (g.mean_series(tag) for g in groups) if series]
        if finals and tag != ABSORPTION:  # zoom on the ends of the loss curves
            low, high = min(finals), max(finals)
            margin = 0.6 * (high - low or 0.1)
            axis.set_ylim(low - 0.2 * margin, high + 2 * margin)
    axes[1].legend(fontsize=7, ncol=2)
    _save(plt, figure, path, title)


def _save(plt, figure, path: str, title: Optional[str]) -> None:
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib "
                         "(or pip install -e '.[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(runs: Sequence[Run], path: str, title: Optional[str] = None) -> None:
    """Training loss, validation loss and update absorption against iteration."""
    plt = _pyplot()

    lrs = sorted({run.lr for run in runs if run.lr is not None})
    panels = [(TRAIN_LOSS, "training loss"), (VALID_LOSS, "validation loss"),
              (ABSORPTION, "update absorption (fraction of updates lost)")]
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8))
    cycle = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    colors = dict(STRATEGY_COLORS)
    for run in runs:
        if run.precision not in colors:
            colors[run.precision] = next(cycle, "gray")
        style = LINE_STYLES[lrs.index(run.lr) % len(LINE_STYLES)] if run.lr in lrs else "-"
        for axis, (tag, _) in zip(axes, panels):
            points = run.series(tag)
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, linestyle=style, color=colors[run.precision],
                          label=run.label, marker="o" if tag == VALID_LOSS else None,
                          markersize=3, linewidth=1.2)
    for axis, (tag, name) in zip(axes, panels):
        axis.set_xlabel("iteration")
        axis.set_title(name)
        axis.grid(alpha=0.3)
    # Zoom the loss panels on the part where runs differ: above the best final
    # value, below the worst value at 1/4 of the run.
    for axis, tag in ((axes[0], TRAIN_LOSS), (axes[1], VALID_LOSS)):
        finals = [run.series(tag)[-1][1] for run in runs if run.series(tag)]
        if finals:
            horizon = max(run.series(tag)[-1][0] for run in runs if run.series(tag)) // 4
            early = [v for run in runs for s, v in run.series(tag) if s >= horizon]
            low, high = min(finals), max(early or finals)
            margin = 0.05 * (high - low or 1.0)
            axis.set_ylim(low - margin, high + margin)
    axes[1].legend(fontsize=7, ncol=2)
    _save(plt, figure, path, title)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="--tensorboard-dir of each run")
    parser.add_argument("--plot", help="write the loss curves to this PNG (needs matplotlib)")
    parser.add_argument("--table", help="write the markdown table here (default: stdout)")
    parser.add_argument("--label", action="append", default=[],
                        help="label of the n-th run (repeat; default: strategy and LR)")
    parser.add_argument("--title", help="title of the plot")
    parser.add_argument("--aggregate", action="store_true",
                        help="one row per (strategy, LR, variant): mean/min/max over seeds, "
                             "and the paper's claims")
    parser.add_argument("--tail", type=int, default=5,
                        help="logged points averaged for the final train loss and absorption")
    args = parser.parse_args(argv)
    if len(args.label) > len(args.runs):
        parser.error(f"{len(args.label)} --label for {len(args.runs)} runs")
    labels = args.label + [None] * (len(args.runs) - len(args.label))
    runs = []
    for path, label in zip(args.runs, labels):
        try:
            runs.append(load_run(path, label))
        except FileNotFoundError as exc:
            print(f"[compare_runs] skipped: {exc}", file=sys.stderr)
    if not runs:
        parser.error("no run with event files")
    runs.sort(key=_sort_key)
    groups = group_runs(runs) if args.aggregate else None
    table = aggregate_table(groups, args.tail) if groups else markdown_table(runs, args.tail)
    if args.table:
        os.makedirs(os.path.dirname(os.path.abspath(args.table)), exist_ok=True)
        with open(args.table, "w", encoding="utf-8") as handle:
            handle.write(table)
    print(table, end="")
    if args.plot:
        if groups:
            plot_groups(groups, args.plot, args.title)
        else:
            plot(runs, args.plot, args.title)
        print(f"[compare_runs] wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
