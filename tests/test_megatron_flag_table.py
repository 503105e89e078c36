"""The Megatron-LM flag table (megatron_sr/config/megatron_flags.csv): its schema,
that its decisions agree with megatron_sr's parser today, that no flag in it
reaches argparse's "unrecognized arguments" (each does what its row decides),
that the flags issue 33 names are in it with the decisions the issue asks for,
and that
tools/megatron_flag_table.py finds the flags a Megatron-LM parser has and the
table lacks.

With MEGATRON_LM_DIR set to a Megatron-LM git directory (or checkout) the table
is also checked against core_v0.16.1 and main themselves."""
import argparse
import collections
import importlib.util
import os
import sys
import textwrap
import warnings

import pytest

from megatron_sr.config import build_parser, job_config_from_args
from megatron_sr.config.arguments import CONFIGS
from megatron_sr.config.flags import add_flags
from test_arguments import argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str, path: str):
    # By path: megatron_sr/config/ holds no __init__.py on this branch, and tools/ is no package.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


flag_table = _load("megatron_flag_table",
                   os.path.join(ROOT, "megatron_sr", "config", "megatron_flag_table.py"))
tool = _load("megatron_flag_table_tool", os.path.join(ROOT, "tools", "megatron_flag_table.py"))

TABLE = flag_table.load_table()
BY_FLAG = {record.flag: record for record in TABLE}

# Issue 33: flags that change what runs and must be implemented, not only accepted.
MUST_IMPLEMENT = (
    "--train-data-path", "--valid-data-path", "--test-data-path", "--use-checkpoint-args",
    "--no-save-optim", "--no-save-rng", "--skip-train", "--log-params-norm",
    "--log-num-zeros-in-grad", "--log-memory-to-tensorboard",
    "--log-validation-ppl-to-tensorboard", "--log-progress", "--dataloader-type",
    "--no-check-for-nan-in-loss-and-grad", "--add-qkv-bias", "--squared-relu",
    "--tokenizer-type=Llama2Tokenizer", "--tokenizer-type=Llama3Tokenizer",
    "--normalization=rmsnorm", "--normalization=layernorm")
# Issue 33: flags the public launch scripts use most, and renamed or removed ones.
SCRIPT_FLAGS = (
    "--use-flash-attn", "--transformer-impl", "--optimizer", "--no-masked-softmax-fusion",
    "--data-impl", "--use-rotary-position-embeddings", "--attention-softmax-in-fp32",
    "--no-query-key-layer-scaling", "--checkpoint-activations", "--tensorboard-queue-size",
    "--DDP-impl", "--no-position-embedding", "--no-rope-fusion",
    "--no-async-tensor-model-parallel-allreduce", "--wandb-entity", "--deterministic-mode",
    "--fp16", "--fp8-format", "--num-experts", "--use-torch-fsdp2", "--use-megatron-fsdp")
FORK_FLAGS = ("--deepspeed", "--zero-stage", "--num-key-value-heads")


def _our_flags() -> dict[str, argparse.Action]:
    """The flags the config fields declare (the parser before the table completes it)."""
    return {name: action for name, (action, _) in add_flags(argparse.ArgumentParser(),
                                                             CONFIGS)[1].items()}


def test_counts_per_decision():
    counts = collections.Counter(record.decision for record in TABLE)
    print(dict(counts))
    assert set(counts) <= set(flag_table.DECISIONS)
    # `implement` marks a known gap: none is left
    assert set(flag_table.DECISIONS) - {"implement"} <= set(counts), "every decision is used"
    flags = [record for record in TABLE if record.value is None]
    # core 0.16.1 and main together have 928 option strings (help aside)
    assert sum(record.source in ("0.16+main", "0.16", "main") for record in flags) >= 928
    assert sum(counts.values()) == len(TABLE)


def test_issue_flags_have_the_decisions_it_asks_for():
    for flag in MUST_IMPLEMENT:
        assert flag in BY_FLAG, f"{flag} is not in the table"
        assert BY_FLAG[flag].decision == "implemented", \
            f"{flag} must be implemented, the table says {BY_FLAG[flag].decision}"
    for flag in SCRIPT_FLAGS:
        assert flag in BY_FLAG, f"{flag} is not in the table"
    for flag in ("--fp16", "--fp8-format", "--num-experts", "--use-torch-fsdp2"):
        assert BY_FLAG[flag].decision == "refused", flag
    for flag in FORK_FLAGS:
        assert BY_FLAG[flag].decision == "refused" and \
            "Megatron-DeepSpeed" in BY_FLAG[flag].message, flag
    assert "--num-query-groups" in BY_FLAG["--num-key-value-heads"].message


def test_fork_rows_are_refused_naming_the_fork():
    fork = [record for record in TABLE if record.source == "deepspeed" and record.value is None]
    assert fork
    for record in fork:
        assert record.decision == "refused" and "Megatron-DeepSpeed" in record.message, \
            f"line {record.line}: {record.flag}"


def test_decisions_agree_with_our_parser():
    """implemented: a config field declares the flag (and it takes the value of a
    value row); implement: none does yet, so implementing one fails this test
    until the table says implemented; alias: the target is ours. (build_parser
    refuses a table that disagrees; this names every row that does.)"""
    ours = _our_flags()

    def accepts(option: str, value) -> bool:
        action = ours.get(option)
        if action is None:
            return False
        if value is None or action.choices is None:
            return True
        return (action.type(value) if action.type else value) in action.choices

    wrong = []
    for record in TABLE:
        where = f"line {record.line}: {record.flag}"
        target, _, value = record.target.partition(" ")
        if record.decision == "implemented" and not accepts(record.option, record.value):
            wrong.append(f"{where} is not in our parser")
        elif record.decision == "implement" and accepts(record.option, record.value) \
                and (record.value is None or ours[record.option].choices is not None):
            wrong.append(f"{where} is in our parser now: mark it implemented")
        elif record.decision == "alias" and not accepts(target, value or None):
            wrong.append(f"{where}: target {record.target} is not ours")
        elif record.decision in ("notice", "refused") and record.value is None \
                and record.option in ours:
            wrong.append(f"{where} is ours but marked {record.decision}")
    assert wrong == []


# Values that a flag of arity A takes in the command lines below.
_ARITY_VALUES = {"0": [[]], "?": [[], ["1"]], "*": [[], ["1", "2"]], "+": [["1"], ["1", "2"]]}


def _command_lines(record, parser_actions) -> list[list[str]]:
    """The flag of `record` with a valid value for each of its arities (a value
    row: its value), as words to add to a valid command line."""
    if record.value is not None:
        return [[record.option, record.value]]
    action = parser_actions[record.option]
    if action.choices:
        return [[record.option, str(next(iter(action.choices)))]]
    lines = []
    for arity in record.arities:
        for values in _ARITY_VALUES.get(arity) or [["1"] * int(arity)]:
            lines.append([record.option, *values])
    return lines


def test_no_flag_of_the_table_is_unrecognized(capsys):
    """Every row, given with a valid value for its arity to a valid command line,
    passes argparse (never "unrecognized arguments" or another usage error);
    then the job is what the row decides: notice, a notice naming the flag with
    the row's message; refused, an error naming the flag with the row's message;
    implement, an error saying it is not implemented yet; implemented and alias,
    a job config."""
    parser = build_parser()
    actions = parser._option_string_actions
    wrong = []
    for record in TABLE:
        for words in _command_lines(record, actions):
            where = f"line {record.line}: {' '.join(words)}"
            try:
                args = parser.parse_args(argv(*words))
            except SystemExit:
                wrong.append(f"{where}: argparse: {capsys.readouterr().err.splitlines()[-1]}")
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # --sequence-parallel at TP 1
                    job = job_config_from_args(args, world_size=1)
                outcome = "\n".join(job.notices)
            except ValueError as error:
                outcome = str(error)
            shown = " ".join(words)
            deciding = BY_FLAG.get("=".join(words), record)  # a value with a row of its own
            if deciding.decision == "notice":
                expected = f"[flags] {shown} is accepted and ignored: {deciding.message}"
            elif deciding.decision == "refused":
                completes = deciding.message.startswith(("is ", "are "))
                expected = f"{shown}{' ' if completes else ': '}{deciding.message}"
            elif deciding.decision == "implement":
                expected = f"{shown}: not implemented in megatron_sr yet ({deciding.message})"
            else:
                continue  # implemented / alias: argparse took it; its meaning is tested elsewhere
            if expected not in outcome:
                wrong.append(f"{where}: expected {expected!r}, got {outcome!r}")
    assert wrong == []


def _write(path, text: str) -> str:
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


@pytest.mark.parametrize("body, error", [
    ("--a,0.16,0,maybe,,x\n", "decision"),
    ("--a,0.16,0,alias,,\n", "target"),
    ("--a,0.16,0,refused,,\n", "message"),
    ("--a,0.16,0,notice,,\n", "message"),
    ("--a,0.16,0,implemented,--b,\n", "target"),
    ("--a,0.16,two,implemented,,\n", "arity"),
    ("--a,0.17,0,implemented,,\n", "source"),
    ("--a,0.16,0,implemented,,\n--a,main,0,implemented,,\n", "already on line"),
    ("--a=x,0.16,1,implemented,,\n", "no row of its own"),
    ("-- a,0.16,0,implemented,,\n", "flag"),
    ("--a,0.16,0,implemented,\n", "fields"),
])
def test_loader_rejects_a_malformed_table(tmp_path, body, error):
    path = _write(tmp_path / "t.csv", "# comment\nflag,source,arity,decision,target,message\n"
                  + body)
    with pytest.raises(flag_table.FlagTableError, match=error):
        flag_table.load_table(path)


def test_loader_reads_a_well_formed_table(tmp_path):
    path = _write(tmp_path / "t.csv", """
        # comment
        flag,source,arity,decision,target,message
        --a,0.16+main,+|*,implemented,,
        --a=x,0.16+main,+|*,refused,,"no x, use y"
        --b,legacy,0,alias,--c 1,
        """)
    records = flag_table.load_table(path)
    assert [(r.flag, r.option, r.value, r.arities) for r in records] == [
        ("--a", "--a", None, ("+", "*")), ("--a=x", "--a", "x", ("+", "*")),
        ("--b", "--b", None, ("0",))]
    assert records[1].message == "no x, use y"


MEGATRON_ARGUMENTS = """
    from megatron.training.config import TrainingConfig

    def _add_args(parser):
        group = parser.add_argument_group("x")
        group.add_argument("--num-layers", type=int)
        group.add_argument("--brand-new-flag", nargs="*")
        group.add_argument("--use-flash-attn", action="store_true")
        group.add_argument("--overlapping", action=argparse.BooleanOptionalAction)
        exclude = ["skipped"]
        factory = ArgumentGroupFactory(TrainingConfig, exclude=exclude)
        factory.build_group(parser, "training")
        return parser
    """
MEGATRON_CONFIG = """
    @dataclass
    class BaseConfig:
        inherited_list: Optional[list[int]] = None

    @dataclass
    class TrainingConfig(BaseConfig):
        on_by_default: bool = True
        off_by_default: bool = False
        maybe: Optional[bool] = None
        skipped: int = 0
        derived: int = field(init=False, default=0)
        renamed: int = field(default=1, metadata={"argparse_meta": {"arg_names": ["--other-name"]}})
        steps: ClassVar[int] = 3
    """


def test_tool_expands_megatron_parser_and_finds_missing_flags(tmp_path, capsys):
    checkout = tmp_path / "Megatron-LM"
    (checkout / "megatron" / "training").mkdir(parents=True)
    _write(checkout / "megatron" / "training" / "arguments.py", MEGATRON_ARGUMENTS)
    _write(checkout / "megatron" / "training" / "training_config.py", MEGATRON_CONFIG)
    found = tool.megatron_flags(tool.MegatronSource(str(checkout)))
    assert {flag: f.arity for flag, f in found.items()} == {
        "--num-layers": "1", "--brand-new-flag": "*", "--use-flash-attn": "0",
        "--overlapping": "0", "--no-overlapping": "0",
        "--inherited-list": "+", "--no-on-by-default": "0", "--disable-on-by-default": "0",
        "--off-by-default": "0", "--no-maybe": "0", "--disable-maybe": "0", "--other-name": "1"}

    assert tool.main(["--megatron", str(checkout)]) == 1
    missing = capsys.readouterr().out
    for flag in ("--brand-new-flag", "--overlapping", "--inherited-list", "--no-maybe",
                 "--other-name"):
        assert f"missing: {flag} " in missing
    for flag in ("--num-layers ", "--use-flash-attn "):
        assert f"missing: {flag}" not in missing


def test_tool_reports_a_changed_arity(tmp_path, capsys):
    arguments = _write(tmp_path / "arguments.py", """
        def add(group):
            group.add_argument("--num-layers", nargs="+")
            group.add_argument("--use-flash-attn", action="store_true")
        """)
    assert tool.main(["--arguments-py", arguments]) == 1
    assert "arity: --num-layers takes + value(s)" in capsys.readouterr().out
    _write(tmp_path / "arguments.py", """
        def add(group):
            group.add_argument("--num-layers", type=int)
        """)
    assert tool.main(["--arguments-py", arguments]) == 0


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_DIR"),
                    reason="set MEGATRON_LM_DIR to a Megatron-LM git directory or checkout")
@pytest.mark.parametrize("ref", ["core_v0.16.1", "main"])
def test_table_covers_megatron_lm(ref, capsys):
    assert tool.main(["--megatron", os.environ["MEGATRON_LM_DIR"], "--ref", ref]) == 0, \
        capsys.readouterr().out
