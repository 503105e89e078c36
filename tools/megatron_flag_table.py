"""Lists the flags of a Megatron-LM GPT parser that megatron_flags.csv lacks.

    python tools/megatron_flag_table.py --megatron MEGATRON_GIT_OR_CHECKOUT [--ref REF]
    python tools/megatron_flag_table.py --arguments-py path/to/megatron/training/arguments.py
    python tools/megatron_flag_table.py --megatron DIR --ref REF --dump   # every flag, as CSV

Reads Megatron-LM's source and never imports it (nor torch): the option strings
are those of every `*.add_argument("--...")` call in
`megatron/training/arguments.py` (`megatron/arguments.py` before core 0.8; an
`action=argparse.BooleanOptionalAction` adds `--no-X` too), plus the flags its
`ArgumentGroupFactory(SomeConfig, exclude=[...]).build_group(...)` calls
generate from the fields of those dataclasses (found by class name anywhere
under `megatron/`), with the factory's naming rules: `--field-name`; a bool
field that defaults to False is a store_true flag, any other bool field the
store_false pair `--no-field-name` / `--disable-field-name`; a list field takes
`nargs='+'`; a field's `metadata={"argparse_meta": {...}}` overrides all of
these. pretrain_gpt.py's optional `add_modelopt_args`
(megatron/post_training/arguments.py, present when nvidia-modelopt is
installed) is read too when the source has it. For core_v0.16.1 this gives the
option strings and arities of the parser Megatron builds when imported
(besides -h/--help).

`--arguments-py` alone has no dataclasses to read: it lists the flags of the
plain add_argument calls and names the factory groups it could not expand.

Prints one line per missing flag (and per flag whose value arity differs from
the table's) and exits 1 when there is any: the table is then out of date with
that Megatron-LM version. The table's arities are core 0.16's and main's, so
an older release reports the few flags whose nargs changed since. `--dump`
prints `flag,arity,where` of every flag found.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional

ARGUMENTS_PY = ("megatron/training/arguments.py", "megatron/arguments.py")  # core 0.8+, older
MODELOPT_ARGUMENTS_PY = "megatron/post_training/arguments.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE_MODULE = os.path.join(ROOT, "megatron_sr", "config", "megatron_flag_table.py")


@dataclass(frozen=True)
class SourceFlag:
    """One option string of Megatron's parser and how many values it takes:
    "0" (store_true / store_false / store_const), "1", or argparse's nargs
    ("?", "+", "*", or a count)."""

    flag: str
    arity: str
    where: str  # "path/arguments.py:LINE" or "ClassName.field"


class MegatronSource:
    """Reads files of one Megatron-LM version: a git directory at `ref`, or a
    checkout folder (ref None)."""

    def __init__(self, path: str, ref: Optional[str] = None):
        self.path, self.ref = path, ref
        if ref is not None:
            self._git("rev-parse", "--verify", f"{ref}^{{commit}}")

    def _git(self, *args: str) -> str:
        result = subprocess.run(["git", "-C", self.path, *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"git -C {self.path} {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def read(self, relpath: str) -> Optional[str]:
        """The text of `relpath`, or None when this version has no such file."""
        if self.ref is not None:
            names = self._git("ls-tree", "--name-only", self.ref, "--", relpath).split()
            return self._git("show", f"{self.ref}:{relpath}") if names else None
        full = os.path.join(self.path, relpath)
        if not os.path.isfile(full):
            return None
        with open(full, encoding="utf-8") as f:
            return f.read()

    def python_files(self) -> list[str]:
        """Every .py file under megatron/."""
        if self.ref is not None:
            return [name for name in self._git("ls-tree", "-r", "--name-only", self.ref, "--",
                                               "megatron").split() if name.endswith(".py")]
        found = []
        for folder, _, files in os.walk(os.path.join(self.path, "megatron")):
            found += [os.path.relpath(os.path.join(folder, name), self.path)
                      for name in files if name.endswith(".py")]
        return sorted(found)

    def describe(self) -> str:
        return f"{self.path} at {self.ref}" if self.ref else self.path


def _arity(action: Optional[str], nargs: object) -> str:
    if action in ("store_true", "store_false", "store_const", "count", "help", "version"):
        return "0"
    return "1" if nargs is None else str(nargs)


def _keyword(call: ast.Call, name: str) -> object:
    """A literal keyword argument of `call` (None when absent); a non-literal
    one as its source text."""
    for keyword in call.keywords:
        if keyword.arg == name:
            try:
                return ast.literal_eval(keyword.value)
            except ValueError:
                return ast.unparse(keyword.value)
    return None


def add_argument_flags(source_text: str, filename: str,
                       function: Optional[str] = None) -> list[SourceFlag]:
    """The option strings of every `.add_argument(...)` call in `source_text`
    (only inside `def function` when given). A call whose option strings are
    not string literals is a ValueError naming its line: the table could not
    be checked against it."""
    tree = ast.parse(source_text, filename=filename)
    if function is not None:
        defs = [node for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef) and node.name == function]
        if not defs:
            return []
        tree = defs[0]
    flags = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        if not all(isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                   for arg in node.args):
            raise ValueError(f"{filename}:{node.lineno}: add_argument with option strings that "
                             f"are not literals: {ast.unparse(node)[:120]}")
        action = _keyword(node, "action")
        where = f"{filename}:{node.lineno}"
        options = [arg.value for arg in node.args if arg.value.startswith("-")]
        if isinstance(action, str) and action.endswith("BooleanOptionalAction"):
            # argparse adds --no-X for every --X
            flags += [SourceFlag(option, "0", where) for option in options]
            flags += [SourceFlag("--no-" + option[2:], "0", where) for option in options
                      if option.startswith("--")]
            continue
        arity = _arity(action, _keyword(node, "nargs"))
        flags += [SourceFlag(option, arity, where) for option in options]
    return flags


@dataclass(frozen=True)
class _Factory:
    class_name: str
    exclude: tuple[str, ...]
    line: int


def _factory_calls(tree: ast.AST) -> list[_Factory]:
    """Every `ArgumentGroupFactory(Class, exclude=...)`; an `exclude` given as
    a name is resolved to the list literal last assigned to that name."""
    lists: dict[str, list[str]] = {}
    factories = []
    nodes = sorted((node for node in ast.walk(tree) if hasattr(node, "lineno")),
                   key=lambda node: (node.lineno, node.col_offset))
    for node in nodes:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.List):
            try:
                lists[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == "ArgumentGroupFactory":
            if not node.args or not isinstance(node.args[0], ast.Name):
                raise ValueError(f"line {node.lineno}: ArgumentGroupFactory of something that "
                                 f"is not a class name: {ast.unparse(node)[:120]}")
            exclude: object = []
            for keyword in node.keywords:
                if keyword.arg == "exclude":
                    if isinstance(keyword.value, ast.Name):
                        if keyword.value.id not in lists:
                            raise ValueError(f"line {node.lineno}: exclude={keyword.value.id} "
                                             f"is not a list literal assigned before")
                        exclude = lists[keyword.value.id]
                    else:
                        exclude = ast.literal_eval(keyword.value)
            factories.append(_Factory(node.args[0].id, tuple(exclude), node.lineno))
    return factories


class _ClassIndex:
    """Class definitions under megatron/ by name, read from the source on demand."""

    def __init__(self, source: MegatronSource):
        self.source = source
        self._found: dict[str, ast.ClassDef] = {}

    def _files_defining(self, name: str) -> list[str]:
        pattern = rf"class {name}[(:]"  # candidates; the AST picks the definitions
        if self.source.ref is not None:
            result = subprocess.run(["git", "-C", self.source.path, "grep", "-l", "-E", pattern,
                                     self.source.ref, "--", "megatron"],
                                    capture_output=True, text=True)
            return [line.split(":", 1)[1] for line in result.stdout.split()
                    if line.endswith(".py")]
        return [path for path in self.source.python_files()
                if re.search(pattern, self.source.read(path) or "")]

    def find(self, name: str) -> ast.ClassDef:
        if name not in self._found:
            found = [(path, node) for path in self._files_defining(name)
                     for node in ast.parse(self.source.read(path), filename=path).body
                     if isinstance(node, ast.ClassDef) and node.name == name]
            if len(found) != 1:
                where = ", ".join(path for path, _ in found) or "nowhere"
                raise ValueError(f"class {name} is defined {len(found)} times under megatron/ "
                                 f"({where}): cannot tell which dataclass the factory reads")
            self._found[name] = found[0][1]
        return self._found[name]


def _unwrap_optional(annotation: ast.expr) -> ast.expr:
    """X for Optional[X], X | None and Union[X, None]; the annotation otherwise."""
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        if isinstance(annotation.right, ast.Constant) and annotation.right.value is None:
            return _unwrap_optional(annotation.left)
    if isinstance(annotation, ast.Subscript):
        name = ast.unparse(annotation.value).split(".")[-1]
        if name == "Optional":
            return _unwrap_optional(annotation.slice)
        if name == "Union" and isinstance(annotation.slice, ast.Tuple) and \
                len(annotation.slice.elts) == 2 and \
                isinstance(annotation.slice.elts[1], ast.Constant) and \
                annotation.slice.elts[1].value is None:
            return _unwrap_optional(annotation.slice.elts[0])
    return annotation


def _field_default(value: Optional[ast.expr]) -> tuple[bool, object, dict]:
    """(init, default, argparse_meta) of a dataclass field's assigned value;
    a default that is not a literal is returned as its source text."""
    if isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] == "field":
        init, default, meta = True, None, {}
        for keyword in value.keywords:
            if keyword.arg == "init":
                init = bool(ast.literal_eval(keyword.value))
            elif keyword.arg == "default":
                try:
                    default = ast.literal_eval(keyword.value)
                except ValueError:
                    default = ast.unparse(keyword.value)
            elif keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
                for key, item in zip(keyword.value.keys, keyword.value.values):
                    if isinstance(key, ast.Constant) and key.value == "argparse_meta" and \
                            isinstance(item, ast.Dict):
                        for meta_key, meta_value in zip(item.keys, item.values):
                            try:
                                meta[meta_key.value] = ast.literal_eval(meta_value)
                            except ValueError:
                                meta[meta_key.value] = ast.unparse(meta_value)
        return init, default, meta
    if value is None:
        return True, None, {}
    try:
        return True, ast.literal_eval(value), {}
    except ValueError:
        return True, ast.unparse(value), {}


def _dataclass_fields(index: _ClassIndex, name: str) -> dict[str, ast.AnnAssign]:
    """The fields of dataclass `name` in `dataclasses.fields` order: those of its
    bases first (a redefinition keeps the base's place), ClassVars left out."""
    node = index.find(name)
    fields: dict[str, ast.AnnAssign] = {}
    for base in node.bases:
        base_name = ast.unparse(base).split(".")[-1]
        if base_name not in ("object", "Generic", "ABC"):
            fields.update(_dataclass_fields(index, base_name))
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and \
                "ClassVar" not in ast.unparse(item.annotation):
            fields[item.target.id] = item
    return fields


def factory_flags(index: _ClassIndex, factory: _Factory) -> list[SourceFlag]:
    """The flags `ArgumentGroupFactory(factory.class_name, exclude).build_group`
    adds, by the factory's rules (see the module docstring)."""
    flags = []
    for name, item in _dataclass_fields(index, factory.class_name).items():
        init, default, meta = _field_default(item.value)
        if name in factory.exclude or not init:
            continue
        annotation = _unwrap_optional(item.annotation)
        names = ["--" + name.replace("_", "-")]
        action, nargs = None, None
        if isinstance(annotation, ast.Name) and annotation.id == "bool":
            action = "store_true" if default == False else "store_false"  # noqa: E712 (as Megatron)
            if action == "store_false":
                names = ["--no-" + name.replace("_", "-"), "--disable-" + name.replace("_", "-")]
        elif isinstance(annotation, ast.Subscript) and \
                ast.unparse(annotation.value).split(".")[-1] in ("list", "List"):
            nargs = "+"
        names = list(meta.get("arg_names", names))
        action = meta.get("action", action)
        nargs = meta.get("nargs", nargs)
        arity = _arity(action, nargs)
        flags += [SourceFlag(flag, arity, f"{factory.class_name}.{name}") for flag in names]
    return flags


def megatron_flags(source: Optional[MegatronSource] = None,
                   arguments_py: Optional[str] = None,
                   warn: Callable[[str], None] = print) -> dict[str, SourceFlag]:
    """Every flag of Megatron-LM's GPT parser in `source` (or only the plain
    add_argument flags of the file `arguments_py`), by option string."""
    if source is not None:
        filename = next((path for path in ARGUMENTS_PY if source.read(path) is not None), None)
        if filename is None:
            raise SystemExit(f"{source.describe()} has none of {', '.join(ARGUMENTS_PY)}: not a "
                             f"Megatron-LM checkout?")
        text = source.read(filename)
    else:
        with open(arguments_py, encoding="utf-8") as f:
            text = f.read()
        filename = arguments_py
    found = add_argument_flags(text, filename)
    factories = _factory_calls(ast.parse(text, filename=filename))
    if source is None:
        if factories:
            warn(f"note: {len(factories)} ArgumentGroupFactory group(s) not expanded without "
                 f"the checkout ({', '.join(f.class_name for f in factories)}): their flags are "
                 f"not listed; pass --megatron")
    else:
        index = _ClassIndex(source)
        for factory in factories:
            found += factory_flags(index, factory)
        modelopt = source.read(MODELOPT_ARGUMENTS_PY)
        if modelopt is not None:
            found += add_argument_flags(modelopt, MODELOPT_ARGUMENTS_PY, "add_modelopt_args")
    flags: dict[str, SourceFlag] = {}
    for flag in found:
        flags.setdefault(flag.flag, flag)
    return flags


def _load_table_module():
    """megatron_sr/config/megatron_flag_table.py, loaded from its file: it needs
    neither torch nor the rest of the package."""
    spec = importlib.util.spec_from_file_location("megatron_flag_table", TABLE_MODULE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--megatron", help="A Megatron-LM git directory (with --ref) or checkout.")
    where.add_argument("--arguments-py", help="A Megatron-LM megatron/training/arguments.py.")
    parser.add_argument("--ref", help="With --megatron: the tag, branch or commit to read.")
    parser.add_argument("--table", help="The table to check (default: the package's).")
    parser.add_argument("--dump", action="store_true",
                        help="Print flag,arity,where of every flag found instead of checking.")
    args = parser.parse_args(argv)
    if args.ref is not None and args.megatron is None:
        parser.error("--ref needs --megatron")
    source = MegatronSource(args.megatron, args.ref) if args.megatron else None
    flags = megatron_flags(source, args.arguments_py, warn=lambda line: print(line, file=sys.stderr))
    if args.dump:
        print("flag,arity,where")
        for flag in sorted(flags.values(), key=lambda f: f.flag.lower()):
            print(f"{flag.flag},{flag.arity},{flag.where}")
        return 0
    table = _load_table_module()
    records = {record.flag: record for record in table.load_table(args.table)}
    problems = []
    for flag in sorted(flags.values(), key=lambda f: f.flag.lower()):
        record = records.get(flag.flag)
        if record is None:
            problems.append(f"missing: {flag.flag} (arity {flag.arity}, {flag.where})")
        elif flag.arity not in record.arities:
            problems.append(f"arity: {flag.flag} takes {flag.arity} value(s) in Megatron "
                            f"({flag.where}), the table says {record.arity}")
    print("\n".join(problems) if problems else
          f"all {len(flags)} flags of {source.describe() if source else args.arguments_py} "
          f"are in the table")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
