"""A config field written once: its flag, help, group and the range its value must lie in.

A field of the config dataclasses declares its command-line flag with `flag`:

    lr: float = flag("--lr", default=1e-4, group="learning rate", required=True,
                     interval="[0, inf)", help="Peak learning rate (required).")

`add_flags` generates the argparse arguments of such fields (argparse dest = the
field name); `check_value` is the range check that a dataclass's `__post_init__`
(`check_fields`) and the flag validation of `megatron_sr.config.arguments` both
run, so a bad value gets the same message however it comes in. A field without
`flag` metadata (a derived value such as `ModelConfig.params_dtype`) has no flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

COMPAT_GROUP = "accepted for Megatron-LM launch scripts"  # megatron_compat's flags
# The help sections of `pretrain_gpt.py --help`, in order.
GROUPS = ("network size", "regularization", "training", "initialization", "learning rate",
          "checkpointing", "mixed precision", "distributed", "validation", "data", "logging",
          COMPAT_GROUP)


@dataclass(frozen=True)
class FlagSpec:
    """How one field appears on the command line and which values it accepts.

    `action`: "store" (a value), "store_true", "store_false" or "store_const" (with
    `const`). `required`: the parser's default is None and a missing flag is an
    error (the dataclass default serves library users). `minimum` / `maximum`:
    integer bounds; `interval`: a float interval such as "[0, 1)", NaN and +-inf
    always refused. `output_folder`: a folder the run creates and writes, checked
    before anything starts. `negative`: a Megatron "--no-..." switch, mutually
    exclusive with the flag, that keeps the default (with `negative_help`).
    """

    names: tuple[str, ...]
    group: str
    help: Optional[str] = None
    action: str = "store"
    const: Any = None
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[tuple] = None
    nargs: Optional[Any] = None
    metavar: Optional[Any] = None
    required: bool = False
    minimum: Optional[int] = None
    maximum: Optional[int] = None
    interval: Optional[str] = None
    output_folder: bool = False
    negative: Optional[str] = None
    negative_help: Optional[str] = None

    @property
    def name(self) -> str:
        """The flag as messages name it (the first of `names`)."""
        return self.names[0]

    @property
    def bounds(self) -> tuple[str, float, float, str]:
        """`interval` as (left bracket, low, high, right bracket)."""
        low, high = self.interval[1:-1].split(",")
        return self.interval[0], float(low), float(high), self.interval[-1]


def flag(*names: str, group: str, default: Any = dataclasses.MISSING,
         default_factory: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A dataclass field whose value comes from the flag `names[0]` (further names:
    other spellings of the same flag); `spec` is FlagSpec's keywords."""
    if group not in GROUPS:
        raise ValueError(f"flag {names[0]}: unknown help group {group!r}")
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"flag": FlagSpec(names=names, group=group, **spec)})


def flag_fields(cls: type) -> list[tuple[dataclasses.Field, FlagSpec]]:
    """The fields of dataclass `cls` that have a flag, in declaration order."""
    return [(field, field.metadata["flag"]) for field in dataclasses.fields(cls)
            if "flag" in field.metadata]


def unquoted(text: str) -> str:
    """An argparse `type`: the value without the quotes a shell array keeps
    around a quoted word (`SPLIT=("--split '99,1,0'")`)."""
    return text.strip("'\"")


def _value_type(hint: Any) -> Optional[type]:
    """int, float or None (str) from a field annotation such as Optional[int]."""
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]
    return options[0] if options[0] in (int, float) else None


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        return list(value) if isinstance(value, tuple) else value
    if field.default is dataclasses.MISSING:
        return None
    return list(field.default) if isinstance(field.default, tuple) else field.default


def _argparse_keywords(field: dataclasses.Field, spec: FlagSpec, hint: Any) -> dict:
    keywords: dict[str, Any] = {"dest": field.name, "help": spec.help}
    if spec.action in ("store_true", "store_false"):
        return {**keywords, "action": spec.action}
    if spec.action == "store" and hint is bool:
        return {**keywords, "action": "store_true"}
    if spec.action == "store_const":
        return {**keywords, "action": "store_const", "const": spec.const,
                "default": _field_default(field)}
    if spec.action != "store":
        raise ValueError(f"flag {spec.name}: unknown action {spec.action!r}")
    keywords["type"] = spec.type or _value_type(hint)
    keywords["default"] = None if spec.required else _field_default(field)
    for name in ("choices", "nargs", "metavar"):
        if getattr(spec, name) is not None:
            keywords[name] = getattr(spec, name)
    named = spec.name[2:].replace("-", "_")
    if spec.metavar is None and spec.choices is None and named != field.name:
        keywords["metavar"] = named.upper()  # the flag's name, not the field's
    return keywords


Flags = dict[str, tuple[argparse.Action, str]]  # flag name -> (its action, its help section)


def add_flags(parser: argparse.ArgumentParser, configs: Sequence[type]
              ) -> tuple[dict[str, argparse._ArgumentGroup], Flags]:
    """Adds the flag of every field of the dataclasses `configs` to `parser`, in the
    help sections of GROUPS (within one, in the order of `configs` and their fields).
    Returns the sections by title, and every flag name -> (its action, its section)."""
    groups = {title: parser.add_argument_group(title) for title in GROUPS}
    fields = [(field, spec, hints) for cls in configs for hints in [typing.get_type_hints(cls)]
              for field, spec in flag_fields(cls)]
    fields.sort(key=lambda entry: GROUPS.index(entry[1].group))  # usage line in section order
    flags: Flags = {}
    for field, spec, hints in fields:
        group = groups[spec.group]
        if spec.negative is not None:
            group = group.add_mutually_exclusive_group()
        action = group.add_argument(*spec.names, **_argparse_keywords(field, spec,
                                                                      hints[field.name]))
        flags.update((name, (action, spec.group)) for name in spec.names)
        if spec.negative is not None:
            negative = group.add_argument(spec.negative, dest=field.name,
                                          action="store_false", default=False,
                                          help=spec.negative_help)
            flags[spec.negative] = (negative, spec.group)
    return groups, flags


def check_value(spec: FlagSpec, value: Any) -> None:
    """Raises ValueError naming the flag when `value` lies outside the spec's range
    (None: an unset optional, always accepted)."""
    if value is None:
        return
    if spec.minimum is not None and value < spec.minimum:
        raise ValueError(f"{spec.name} must be >= {spec.minimum}, got {value}")
    if spec.maximum is not None and value > spec.maximum:
        raise ValueError(f"{spec.name} must be <= {spec.maximum}, got {value}")
    if spec.interval is not None:
        left, low, high, right = spec.bounds
        if not (math.isfinite(value) and (low <= value if left == "[" else low < value)
                and (value <= high if right == "]" else value < high)):
            raise ValueError(f"{spec.name} must be a finite number in {left}{low:g}, "
                             f"{high:g}{right}, got {value}")


def check_fields(config: Any) -> None:
    """`check_value` of every flag field of the dataclass instance `config`; its
    `__post_init__` calls this."""
    for field, spec in flag_fields(type(config)):
        check_value(spec, getattr(config, field.name))
