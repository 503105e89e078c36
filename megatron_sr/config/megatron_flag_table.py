"""The decision megatron_sr takes for every Megatron-LM flag, read from megatron_flags.csv.

The table is data: one row per flag of Megatron-LM's GPT parser (and per
renamed, removed or Megatron-DeepSpeed flag still found in launch scripts),
kept next to this module and checked against Megatron-LM's source by
`tools/megatron_flag_table.py`. This module only reads and validates it; it
imports neither torch nor the rest of megatron_sr.

Columns:
    flag      the option string (`--use-flash-attn`), or `--flag=VALUE` for a
              decision about one value of a flag that has its own row
    source    where the flag comes from: 0.16+main, 0.16, main (Megatron-LM
              core_v0.16 and/or main), legacy (older Megatron-LM releases
              only), deepspeed (Megatron-DeepSpeed and DeepSpeed's launcher),
              mlcommons (the fork of MLCommons' GPT-3 reference, run_gpt3.sh)
    arity     values the flag takes in Megatron: 0 (store_true/store_false),
              1, a count, or argparse's ?, + or *; `A|B` when versions differ
    decision  implemented: our parser has it with Megatron's meaning
              alias:       means `target` (`--flag` takes the value given,
                           `--flag VALUE` is the fixed value it stands for)
              notice:      accepted and ignored with `message`: it only picks
                           an implementation detail
              refused:     stops the job with `message`, which says what to do
              implement:   to be implemented (changes what runs): a known gap
    target    alias only: the megatron_sr flag (and value) it means
    message   notice/refused/implement: one line, in our words; optional for
              implemented and alias rows

Lines starting with `#` are comments; fields that hold a comma are quoted
(CSV). A malformed table is a FlagTableError naming the file, line and field.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from typing import Optional

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_flags.csv")
COLUMNS = ("flag", "source", "arity", "decision", "target", "message")
DECISIONS = ("implemented", "alias", "notice", "refused", "implement")
SOURCES = ("0.16+main", "0.16", "main", "legacy", "deepspeed", "mlcommons")
_ARITY = re.compile(r"^(0|[1-9][0-9]*|\?|\+|\*)$")
_FLAG = re.compile(r"^--?[A-Za-z0-9][A-Za-z0-9_-]*(=[^\s=]+)?$")
_TARGET = re.compile(r"^--[a-z0-9][a-z0-9-]*( [^\s]+)?$")


class FlagTableError(ValueError):
    """The flag table breaks its schema; the message names file, line and field."""


@dataclass(frozen=True)
class FlagRecord:
    """One row of the table (see the module docstring for the columns)."""

    flag: str
    source: str
    arity: str
    decision: str
    target: str
    message: str
    line: int  # in the table file, for error messages

    @property
    def option(self) -> str:
        """The option string: `flag` without a `=VALUE` part."""
        return self.flag.split("=", 1)[0]

    @property
    def value(self) -> Optional[str]:
        """VALUE of a `--flag=VALUE` row, None for a flag row."""
        return self.flag.split("=", 1)[1] if "=" in self.flag else None

    @property
    def arities(self) -> tuple[str, ...]:
        """Every arity Megatron gives the flag (two when versions differ)."""
        return tuple(self.arity.split("|"))


def _check(record: FlagRecord, where: str) -> None:
    def fail(field: str, why: str) -> None:
        raise FlagTableError(f"{where}: {field} {getattr(record, field)!r}: {why}")

    if not _FLAG.match(record.flag):
        fail("flag", "not an option string (--name, or --name=VALUE for one value)")
    if record.source not in SOURCES:
        fail("source", f"not one of {', '.join(SOURCES)}")
    if not all(_ARITY.match(part) for part in record.arity.split("|")):
        fail("arity", "not 0, a count, ?, + or * (or two of them as A|B)")
    if record.decision not in DECISIONS:
        fail("decision", f"not one of {', '.join(DECISIONS)}")
    if record.decision == "alias":
        if not _TARGET.match(record.target):
            fail("target", "an alias needs the megatron_sr flag it means (--flag or --flag VALUE)")
    elif record.target:
        fail("target", f"only alias rows have a target, this row is {record.decision}")
    if record.decision in ("notice", "refused", "implement") and not record.message.strip():
        fail("message", f"a {record.decision} row needs a message saying "
                        + ("what happens instead" if record.decision == "notice" else
                           "what to do instead" if record.decision == "refused" else
                           "what is to be implemented"))
    if "\n" in record.message:
        fail("message", "must be one line")


def load_table(path: Optional[str] = None) -> tuple[FlagRecord, ...]:
    """Every row of the table at `path` (default: the package's
    megatron_flags.csv), in file order, validated: known columns, source,
    arity and decision; an alias has a target; a notice, refusal or
    to-implement row has a message; no flag twice; a `--flag=VALUE` row's
    flag has its own row. Raises FlagTableError otherwise."""
    path = path or TABLE_PATH
    records: list[FlagRecord] = []
    seen: dict[str, int] = {}
    header: Optional[list[str]] = None
    with open(path, encoding="utf-8", newline="") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            row = next(csv.reader([line]))
            where = f"{path}:{number}"
            if header is None:
                header = row
                if tuple(header) != COLUMNS:
                    raise FlagTableError(f"{where}: header {','.join(header)} is not "
                                         f"{','.join(COLUMNS)}")
                continue
            if len(row) != len(COLUMNS):
                raise FlagTableError(f"{where}: {len(row)} fields, expected {len(COLUMNS)} "
                                     f"({','.join(COLUMNS)})")
            record = FlagRecord(*row, line=number)
            _check(record, where)
            if record.flag in seen:
                raise FlagTableError(f"{where}: flag {record.flag} is already on line "
                                     f"{seen[record.flag]}")
            seen[record.flag] = number
            records.append(record)
    if header is None:
        raise FlagTableError(f"{path}: no header line ({','.join(COLUMNS)})")
    for record in records:
        if record.value is not None and record.option not in seen:
            raise FlagTableError(f"{path}:{record.line}: {record.flag} decides one value of "
                                 f"{record.option}, which has no row of its own")
    return tuple(records)
