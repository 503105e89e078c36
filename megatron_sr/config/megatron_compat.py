"""Megatron-LM's flags that are not megatron_sr's own: one table, two helpers.

Flag names are Megatron-LM's wherever megatron_sr has the flag (the config
fields declare those), so a Megatron launch script runs here with at most its
unsupported flags removed. Every other Megatron flag a script may give is a row
of MEGATRON_FLAGS, a `MegatronFlag` with one of four decisions:

- implemented: megatron_sr does it. `target` names our flag when it is spelled
  differently (None: our flag of the same name); a row with no flag of ours is
  accepted as a switch whose `message` says how it is implemented here.
- alias: `target` is our flag it stands for. "--flag": another spelling, its
  value passes through; "--flag VALUE": a switch meaning that value (one of the
  flag's choices, as written), which conflicts with the flag given another value
  or another alias of it.
- notice: accepted and ignored; a one-line notice says `message` (what happens
  instead). `pretrain` prints the notices on rank 0.
- refused: an error giving `message`, the reason; with `accepted_value`, only
  other values are refused (Megatron's default changes nothing).

`add_megatron_flags` adds the rows to the parser `build_parser` generates;
`apply_megatron_flags` resolves them on the parsed flags (refusals first, then
aliases, then notices). A larger table of the same rows (e.g. loaded from a data
file through `MegatronFlag.from_row`) plugs in as their `table` argument, which
`build_parser` and `job_config_from_args` pass on as `megatron_flags`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from megatron_sr.config.flags import COMPAT_GROUP

DECISIONS = ("implemented", "alias", "notice", "refused")


@dataclass(frozen=True)
class MegatronFlag:
    """One Megatron-LM flag and what megatron_sr does with it (see the module
    docstring). `takes_value`: the flag is followed by a value (`type`, `choices`
    constrain it; `nargs`: argparse's, for a flag that takes several); `group`:
    its help section."""

    name: str
    decision: str
    takes_value: bool = False
    target: Optional[str] = None
    message: str = ""
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[tuple] = None
    nargs: Optional[Any] = None
    accepted_value: Any = None
    group: str = COMPAT_GROUP

    def __post_init__(self):
        if self.decision not in DECISIONS:
            raise ValueError(f"Megatron flag {self.name}: decision {self.decision!r} is not one "
                             f"of {', '.join(DECISIONS)}")
        if self.decision == "alias" and not self.target:
            raise ValueError(f"Megatron flag {self.name}: an alias needs its target flag")
        if self.decision in ("notice", "refused") and not self.message:
            raise ValueError(f"Megatron flag {self.name}: a {self.decision} needs its message")

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "MegatronFlag":
        """A row of a flag table as data: name, decision, takes_value, target (or
        alias_of), message; the other fields optional. An unknown column is an error."""
        fields = dict(row)
        unknown = set(fields) - set(cls.__dataclass_fields__) - {"alias_of"}
        if unknown:
            raise ValueError(f"Megatron flag table row {fields.get('name')}: unknown column(s) "
                             f"{', '.join(sorted(unknown))}")
        if "alias_of" in fields:
            fields["target"] = fields.pop("alias_of")
        if fields.get("choices") is not None:
            fields["choices"] = tuple(fields["choices"])
        return cls(**fields)

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")


def implemented(name: str, message: str, group: str = COMPAT_GROUP) -> MegatronFlag:
    return MegatronFlag(name, "implemented", message=message, group=group)


def alias(name: str, target: str) -> MegatronFlag:
    return MegatronFlag(name, "alias", target=target)


def notice(name: str, message: str, **value: Any) -> MegatronFlag:
    return MegatronFlag(name, "notice", takes_value=bool(value), message=message, **value)


def refused(name: str, message: str, **value: Any) -> MegatronFlag:
    return MegatronFlag(name, "refused", takes_value=bool(value), message=message, **value)


_FP8 = "FP8 training is not supported: megatron_sr keeps the weights in BF16 and its " \
       "stochastic rounding is defined for BF16 storage; drop the --fp8-* flags (the run is " \
       "then BF16)"

MEGATRON_FLAGS: tuple[MegatronFlag, ...] = (
    alias("--bf16", "--precision bf16-mixed"),
    alias("--grad-reduce-in-bf16", "--grad-reduce-dtype bf16"),
    alias("--accumulate-allreduce-grads-in-fp32", "--grad-reduce-dtype fp32"),
    alias("--recompute-activations", "--recompute-granularity selective"),
    alias("--layernorm-epsilon", "--norm-epsilon"),
    alias("--override-opt_param-scheduler", "--override-opt-param-scheduler"),
    alias("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler"),
    implemented("--exit-signal-handler",
                "Accepted for Megatron-LM scripts: here the handler is always on (SIGTERM and "
                "--exit-signal save with --save and exit after the current step).",
                group="training"),
    refused("--fp16", "is not supported: megatron_sr trains in bf16; use --precision bf16-mixed "
                      "(what Megatron's --bf16 does) or a pure one: bf16-sr, bf16, bf16-kahan"),
    refused("--fp8-format", _FP8, choices=("e4m3", "hybrid")),
    refused("--fp8-amax-history-len", _FP8, type=int),
    refused("--fp8-amax-compute-algo", _FP8, choices=("most_recent", "max")),
    refused("--fp8-param-gather", _FP8),
    refused("--fp8-recipe", _FP8, type=str),
    refused("--fp8-margin", _FP8, type=int),
    refused("--context-parallel-size", "context parallelism is not implemented; use 1 (split "
                                       "long sequences with --tensor-model-parallel-size and "
                                       "--sequence-parallel instead)",
            type=int, accepted_value=1),
    notice("--attention-backend", "attention is torch's scaled_dot_product_attention, which "
                                  "picks its own kernel (flash / memory-efficient / math)",
           choices=("auto", "flash", "fused", "unfused", "local")),
    notice("--use-mcore-models", "megatron_sr has one GPT implementation (megatron-core's "
                                 "layout)"),
    notice("--cross-entropy-loss-fusion", "the vocab-parallel cross entropy is always the "
                                          "fused one"),
    notice("--manual-gc", "Python's garbage collector runs as usual"),
    notice("--empty-unused-memory-level", "the CUDA caching allocator is left alone",
           type=int, choices=(0, 1, 2)),
    notice("--no-create-attention-mask-in-dataloader",
           "the data loader never builds attention masks; the model builds document masks "
           "itself"),
    notice("--no-mmap-bin-files", ".bin files are always memory-mapped"),
    notice("--log-throughput", "the log line always shows the throughput"),
)


def _help(row: MegatronFlag) -> str:
    if row.decision == "notice":
        return f"Ignored: {row.message}."
    if row.decision == "refused":
        unless = "" if row.accepted_value is None else f" unless {row.accepted_value}"
        completes = row.message.startswith(("is ", "are "))
        return f"Refused{unless}: {_sentence(row.name, row.message) if completes else row.message}."
    return row.message


def add_megatron_flags(parser: argparse.ArgumentParser,
                       groups: Mapping[str, argparse._ArgumentGroup],
                       flags: Mapping[str, tuple[argparse.Action, str]],
                       table: Sequence[MegatronFlag] = MEGATRON_FLAGS) -> None:
    """Adds the rows of `table` to `parser`. `groups`: its help sections by title;
    `flags`: our flags, name -> (action, section title). Raises ValueError for a
    row that names a flag megatron_sr does not have."""
    for row in table:
        target_name, _, value = (row.target or row.name).partition(" ")
        if row.decision == "implemented" and target_name in flags:
            continue
        if row.decision == "alias":
            if target_name not in flags:
                raise ValueError(f"Megatron flag {row.name}: its target {target_name} is not a "
                                 f"megatron_sr flag")
            target, group = flags[target_name]
            if value:
                target.default = None  # None: not given (a conflict needs to know)
                groups[group].add_argument(row.name, action="store_true",
                                           help=f"Megatron's flag: same as {row.target}.")
            else:
                _add_spelling(groups[group], row.name, target)
            continue
        if row.decision == "implemented" and not row.message:
            raise ValueError(f"Megatron flag {row.name} is marked implemented, but megatron_sr "
                             f"has no such flag")
        group = groups.get(row.group) or parser.add_argument_group(row.group)
        if row.takes_value:
            group.add_argument(row.name, type=row.type, choices=row.choices, nargs=row.nargs,
                               default=row.accepted_value, help=_help(row))
        else:
            group.add_argument(row.name, action="store_true", help=_help(row))


def _add_spelling(group: argparse._ArgumentGroup, name: str, target: argparse.Action) -> None:
    """`name` as another spelling of `target`: same dest and values; the default
    stays `target`'s."""
    help = f"Megatron's spelling of {target.option_strings[0]}."
    if target.nargs == 0:  # a switch (store_true, store_false, store_const)
        group.add_argument(name, dest=target.dest, action="store_const", const=target.const,
                           default=argparse.SUPPRESS, help=help)
    else:
        group.add_argument(name, dest=target.dest, type=target.type, nargs=target.nargs,
                           choices=target.choices, metavar=target.metavar,
                           default=argparse.SUPPRESS, help=help)


def _refusal(args: argparse.Namespace, table: Sequence[MegatronFlag]) -> Optional[str]:
    given = []
    for row in table:
        value = getattr(args, row.dest, None)
        if row.decision == "refused" and value not in (None, False) \
                and (row.accepted_value is None or value != row.accepted_value):
            shown = row.name if row.accepted_value is None else f"{row.name} {value}"
            given.append((shown, row.message))
    if not given:
        return None
    names = ", ".join(shown for shown, message in given if message == given[0][1])
    return _sentence(names, given[0][1])


def _sentence(names: str, message: str) -> str:
    """A refusal: `message` completes the sentence after the flags ("is not
    supported: ...") or, after a colon, gives the reason."""
    completes = message.startswith(("is ", "are "))
    return f"{names} {message}" if completes else f"{names}: {message}"


def _resolve_aliases(args: argparse.Namespace, defaults: Mapping[str, Any],
                     flags: Mapping[str, str], table: Sequence[MegatronFlag]) -> None:
    """Sets the dest of every flag that switch aliases stand for: its own value,
    else the value of the alias given, else `defaults[flag]`."""
    switches: dict[str, list[MegatronFlag]] = {}
    for row in table:
        if row.decision == "alias" and " " in row.target:
            switches.setdefault(row.target.partition(" ")[0], []).append(row)
    for target, rows in switches.items():
        dest = flags[target]
        direct = getattr(args, dest)
        given = [] if direct is None else [(f"{target} {direct}", direct)]
        given += [(row.name, row.target.partition(" ")[2]) for row in rows
                  if getattr(args, row.dest)]
        for name, value in given[1:]:
            if value != given[0][1]:
                raise ValueError(f"{name} means {target} {value}, which conflicts with "
                                 f"{given[0][0]}: give one")
        setattr(args, dest, given[0][1] if given else defaults[target])


def apply_megatron_flags(args: argparse.Namespace, defaults: Mapping[str, Any],
                         flags: Mapping[str, str],
                         table: Sequence[MegatronFlag] = MEGATRON_FLAGS) -> list[str]:
    """Resolves the rows of `table` on `args` (parsed by a parser that
    `add_megatron_flags` completed; changed in place): raises ValueError for a
    refused flag given, sets what aliases stand for, and returns one notice per
    ignored flag given. `defaults`: our flags' defaults by name; `flags`: our
    flags' dests by name."""
    refusal = _refusal(args, table)
    if refusal is not None:
        raise ValueError(refusal)
    _resolve_aliases(args, defaults, flags, table)
    notices = []
    for row in table:
        value = getattr(args, row.dest, None)
        if row.decision == "notice" and value not in (None, False):
            words = value if isinstance(value, list) else [value]
            shown = "" if value is True else " " + " ".join(str(word) for word in words)
            notices.append(f"[flags] {row.name}{shown} is accepted and ignored: {row.message}")
    return notices
