"""Megatron-LM's flags, as the table megatron_flags.csv decides them.

Flag names are Megatron-LM's wherever megatron_sr has the flag (the config
fields declare those), so a Megatron launch script runs here with at most its
unsupported flags removed. Every Megatron-LM flag is a row of
megatron_flags.csv (its columns: `megatron_sr.config.megatron_flag_table`); the
rows are data, and this module knows only what each decision does:

- implemented: the flag is ours (a config field declares it); a row whose flag
  megatron_sr lacks is an error, and so is a flag of ours under another decision.
- alias: `target` is our flag it stands for. "--flag": another spelling, its
  value passes through; "--flag VALUE": a switch meaning that value (one of the
  flag's choices, as written), which conflicts with the flag given another value
  or another alias of it. Listed in the help section of the target.
- notice: accepted with the row's arity and ignored; a one-line notice says
  `message` (what happens instead). `pretrain` prints the notices on rank 0.
- refused: accepted with the row's arity, then an error naming the flag and
  giving `message` (what to do instead).
- implement: a known gap, refused as not implemented yet (`message`: what it
  would do). Once a config field declares the flag, its row says implemented.

A `--flag=VALUE` row decides one value. Of a flag of ours: implemented, the
flag accepts it; refused or implement, argparse lets it past the flag's choices
and the job stops with the row's message; notice, the flag keeps its default.
Of a flag of the table: the row replaces the flag row's decision for that value.

Arity, the values Megatron's flag takes: 0 (a switch), a count, ?, + or *;
`A|B` (versions differ) accepts both (`1|0` is `?`, `*|+` is `*`). Parsed, a
flag of the table is the attribute named by its option string
(`vars(args)["--use-flash-attn"]`), present only when given; `--help` lists
none of them one by one but says how many there are and where the table is.

`add_megatron_flags` adds the rows to the parser `build_parser` generates;
`apply_megatron_flags` resolves them on the parsed flags (aliases, then
refusals, then notices). `megatron_table()` is the package's table, read once
per process; another (`MegatronTable(load_table(path))`) plugs in as `table`.
"""
from __future__ import annotations

import argparse
import collections
import functools
from typing import Any, Mapping, Optional, Sequence

from megatron_sr.config.flags import COMPAT_GROUP, Flags
from megatron_sr.config.megatron_flag_table import FlagRecord, load_table

REFUSING = ("refused", "implement")  # the decisions that stop the job


class MegatronTable:
    """The rows of a flag table, indexed: `flags` (flag rows by option string),
    `values` (value rows by option string, then value) and `switch_aliases`
    (our flag -> the alias rows that mean one value of it)."""

    def __init__(self, records: Sequence[FlagRecord]):
        self.records = tuple(records)
        self.flags = {record.flag: record for record in self.records if record.value is None}
        self.values: dict[str, dict[str, FlagRecord]] = {}
        self.switch_aliases: dict[str, list[FlagRecord]] = {}
        for record in self.records:
            if record.value is not None:
                self.values.setdefault(record.option, {})[record.value] = record
            elif record.decision == "alias" and " " in record.target:
                self.switch_aliases.setdefault(record.target.partition(" ")[0], []).append(record)

    @functools.cached_property
    def foreign_actions(self) -> tuple[argparse.Action, ...]:
        """The argparse actions of the flags that are neither ours nor aliases,
        built once: nothing changes them, so every parser shares them (after
        `add_megatron_flags` has checked that none of them is ours)."""
        template = argparse.ArgumentParser(add_help=False).add_argument_group()
        for record in self.flags.values():
            if record.decision not in ("implemented", "alias"):
                template.add_argument(record.flag, dest=record.flag, default=argparse.SUPPRESS,
                                      help=argparse.SUPPRESS, **_arity_keywords(record.arities))
        return tuple(template._group_actions)

    def deciding(self, option: str, value: Any) -> FlagRecord:
        """The row that decides `option` given with `value`: its value row, else its flag row."""
        rows = self.values.get(option, {})
        return rows.get(value, self.flags[option]) if isinstance(value, str) else self.flags[option]


@functools.lru_cache(maxsize=None)
def megatron_table() -> MegatronTable:
    """megatron_sr/config/megatron_flags.csv, read and validated once per process."""
    return MegatronTable(load_table())


_ARITY_RANGES = {"0": (0, 0), "?": (0, 1), "+": (1, None), "*": (0, None)}


def _arity_keywords(arities: Sequence[str]) -> dict[str, Any]:
    """argparse keywords taking every arity of `arities` (FlagRecord.arities)."""
    ranges = [_ARITY_RANGES[arity] if arity in _ARITY_RANGES else (int(arity), int(arity))
              for arity in arities]
    low = min(low for low, _ in ranges)
    high = None if any(high is None for _, high in ranges) else max(high for _, high in ranges)
    if high == 0:
        return {"action": "store_true"}
    if low == high:
        return {"metavar": "VALUE", **({} if low == 1 else {"nargs": low})}
    if high == 1:
        return {"metavar": "VALUE", "nargs": "?", "const": True}
    return {"metavar": "VALUE", "nargs": "+" if low else "*"}


def _accepts(action: argparse.Action, value: str) -> bool:
    """Whether our flag's `action` takes `value` (after its type) among its choices."""
    if action.choices is None:
        return True
    try:
        return (action.type(value) if action.type else value) in action.choices
    except (TypeError, ValueError):
        return False


class _Choices(tuple):
    """A flag's own choices (what `--help` and argparse's "invalid choice" list),
    also admitting `admitted`: the table's values of the flag that
    `apply_megatron_flags` decides."""

    def __new__(cls, choices: Sequence[Any], admitted: Sequence[Any]):
        self = super().__new__(cls, choices)
        self.admitted = frozenset(admitted)
        return self

    def __contains__(self, value: Any) -> bool:
        return super().__contains__(value) or value in self.admitted


def _check_flag_row(record: FlagRecord, ours: bool) -> None:
    if record.decision == "implemented" and not ours:
        raise ValueError(f"Megatron flag table line {record.line}: {record.flag} is marked "
                         f"implemented, but megatron_sr has no such flag")
    if ours and record.decision != "implemented":
        raise ValueError(f"Megatron flag table line {record.line}: {record.flag} is a "
                         f"megatron_sr flag, but the table says {record.decision}: mark it "
                         f"implemented")


def _admit_values(option: str, rows: Mapping[str, FlagRecord], flags: Flags) -> None:
    """Checks the value rows of `option` against our flag of that name (an
    implemented value is one it takes; another, where the flag has choices, is
    one it does not) and lets the other values past its choices. Nothing to do
    for a flag of the table: `apply_megatron_flags` decides its values."""
    for record in rows.values():
        if record.decision == "alias" or (option not in flags
                                          and record.decision == "implemented"):
            raise ValueError(f"Megatron flag table line {record.line}: {record.flag}: a value "
                             f"of {'our' if option in flags else 'a foreign'} flag cannot be "
                             f"{record.decision}")
    if option not in flags:
        return
    action = flags[option][0]
    for value, record in rows.items():
        implemented, taken = record.decision == "implemented", _accepts(action, value)
        if implemented and not taken:
            raise ValueError(f"Megatron flag table line {record.line}: {record.flag} is marked "
                             f"implemented, but {option} does not take {value}")
        if not implemented and taken and action.choices is not None:
            raise ValueError(f"Megatron flag table line {record.line}: {option} takes {value}, "
                             f"but the table says {record.decision}: mark it implemented")
    if action.choices is not None:
        action.choices = _Choices(action.choices, [
            action.type(value) if action.type else value
            for value, record in rows.items() if record.decision != "implemented"])


def add_megatron_flags(groups: Mapping[str, argparse._ArgumentGroup], flags: Flags,
                       table: Optional[MegatronTable] = None) -> None:
    """Adds the rows of `table` (default: `megatron_table()`) to the parser whose
    help sections are `groups` (by title); `flags`: our flags, name -> (action,
    section title), as `flags.add_flags` returns them.
    Raises ValueError for a row that disagrees with our flags (see the module docstring)."""
    table = table or megatron_table()
    section = groups[COMPAT_GROUP]
    section.description = _section_description(table, flags)
    for option, rows in table.values.items():  # before the aliases copy our flags' choices
        _admit_values(option, rows, flags)
    for record in table.flags.values():
        _check_flag_row(record, record.flag in flags)
        if record.decision == "alias":
            _add_alias(record, groups, flags)
    for action in table.foreign_actions:
        section._add_action(action)


def _section_description(table: MegatronTable, flags: Flags) -> str:
    counts = collections.Counter(record.decision for record in table.flags.values()
                                 if record.flag not in flags and record.decision != "alias")
    gaps = (f" {counts['implement']} are not implemented yet (they stop the job saying so)."
            if counts["implement"] else "")
    return (f"Megatron-LM's other flags are accepted, so that its launch scripts parse: "
            f"{counts['notice']} are ignored with a one-line notice saying what happens "
            f"instead, {counts['refused']} stop the job with the reason and what to do "
            f"instead.{gaps} Aliases are listed beside the flag they stand for. Every flag's "
            f"decision and message: megatron_sr/config/megatron_flags.csv.")


class _Default(str):
    """A flag's default as the parser stores it when the flag is not given, so
    that a switch alias tells it apart from the same value given."""


def _add_alias(record: FlagRecord, groups: Mapping[str, argparse._ArgumentGroup],
               flags: Flags) -> None:
    target_name, _, value = record.target.partition(" ")
    if target_name not in flags:
        raise ValueError(f"Megatron flag table line {record.line}: {record.flag}: its target "
                         f"{target_name} is not a megatron_sr flag")
    target, group = flags[target_name]
    help = f"Same as {record.target}" + (f" ({record.message})" if record.message else "") + "."
    if value:
        if not _accepts(target, value):
            raise ValueError(f"Megatron flag table line {record.line}: {record.flag}: "
                             f"{target_name} does not take {value}")
        if not isinstance(target.default, (str, type(None))):
            raise ValueError(f"Megatron flag table line {record.line}: {record.flag}: "
                             f"{target_name}'s default is not a string")
        if target.default is not None:  # a conflict needs to know whether it was given
            target.default = _Default(target.default)
        groups[group].add_argument(record.flag, dest=record.flag, action="store_true",
                                   default=argparse.SUPPRESS, help=help)
    elif target.nargs == 0:  # a switch (store_true, store_false, store_const)
        groups[group].add_argument(record.flag, dest=target.dest, action="store_const",
                                   const=target.const, default=argparse.SUPPRESS, help=help)
    else:
        groups[group].add_argument(record.flag, dest=target.dest, type=target.type,
                                   nargs=target.nargs, choices=target.choices,
                                   metavar=target.metavar, default=argparse.SUPPRESS, help=help)


def _resolve_aliases(args: argparse.Namespace, defaults: Mapping[str, Any],
                     dests: Mapping[str, str], table: MegatronTable) -> None:
    """Sets the dest of every flag that switch aliases stand for: its own value,
    else the value of the alias given, else `defaults[flag]`."""
    for target, rows in table.switch_aliases.items():
        dest = dests[target]
        direct = getattr(args, dest)
        given = [] if direct is None or isinstance(direct, _Default) else \
            [(f"{target} {direct}", direct)]
        given += [(row.flag, row.target.partition(" ")[2]) for row in rows
                  if hasattr(args, row.flag)]
        for name, value in given[1:]:
            if value != given[0][1]:
                raise ValueError(f"{name} means {target} {value}, which conflicts with "
                                 f"{given[0][0]}: give one")
        setattr(args, dest, given[0][1] if given else defaults[target])


def _shown(name: str, value: Any) -> str:
    """The flag as given: `--name`, `--name VALUE` or `--name V1 V2`."""
    words = value if isinstance(value, list) else [] if value is True else [value]
    return " ".join([name, *map(str, words)])


def _reason(names: str, record: FlagRecord) -> str:
    """One line of a refusal. A message that starts with "is"/"are" completes
    the sentence after the flags; any other gives the reason after a colon."""
    if record.decision == "implement":
        instead = "leave it out to run without it" if record.value is None else \
            f"give {record.option} another value"
        return f"{names}: not implemented in megatron_sr yet ({record.message}); {instead}"
    if record.message.startswith(("is ", "are ")):
        return f"{names} {record.message}"
    return f"{names}: {record.message}"


def _given(args: argparse.Namespace, defaults: Mapping[str, Any], dests: Mapping[str, str],
           table: MegatronTable):
    """(the flag as given, its deciding row) for every flag of the table given,
    in command-line order, then for every value of our flags that a value row
    decides other than implemented (a notice's flag gets its default back)."""
    for name, value in list(vars(args).items()):
        if name.startswith("--") and table.flags[name].decision != "alias":
            yield _shown(name, value), table.deciding(name, value)
    for option, rows in table.values.items():
        value = getattr(args, dests[option]) if option in dests else None
        record = rows.get(str(value)) if value is not None else None
        if record is not None and record.decision != "implemented":
            if record.decision == "notice":
                setattr(args, dests[option], defaults[option])
            yield _shown(option, value), record


def apply_megatron_flags(args: argparse.Namespace, defaults: Mapping[str, Any],
                         dests: Mapping[str, str],
                         table: Optional[MegatronTable] = None) -> list[str]:
    """Resolves the rows of `table` (default: `megatron_table()`) on `args` (parsed
    by a parser that `add_megatron_flags` completed; changed in place): sets what
    aliases stand for, raises ValueError listing every refused or not yet
    implemented flag given (one line per reason), and returns one notice per
    ignored flag given. `defaults`: our flags' defaults by name; `dests`: our
    flags' dests by name."""
    table = table or megatron_table()
    _resolve_aliases(args, defaults, dests, table)
    refusals: dict[FlagRecord, list[str]] = {}
    notices = []
    for shown, record in _given(args, defaults, dests, table):
        if record.decision in REFUSING:
            same = next((row for row in refusals if (row.decision, row.message)
                         == (record.decision, record.message)), record)
            refusals.setdefault(same, []).append(shown)
        elif record.decision == "notice":
            notices.append(f"[flags] {shown} is accepted and ignored: {record.message}")
    if refusals:
        raise ValueError("\n".join(_reason(", ".join(names), record)
                                   for record, names in refusals.items()))
    return notices
