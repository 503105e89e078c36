"""The Megatron-LM flag table (megatron_sr/config/megatron_flags.csv): its schema,
that its decisions agree with megatron_sr's parser today, that the flags issue 33
names are in it with the decisions the issue asks for, and that
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

import pytest

from megatron_sr.config import build_parser

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


def _parser_options() -> dict[str, argparse.Action]:
    return {option: action for action in build_parser()._actions
            for option in action.option_strings}


def test_counts_per_decision():
    counts = collections.Counter(record.decision for record in TABLE)
    print(dict(counts))
    assert set(counts) == set(flag_table.DECISIONS), "every decision is used"
    flags = [record for record in TABLE if record.value is None]
    # core 0.16.1 and main together have 928 option strings (help aside)
    assert sum(record.source in ("0.16+main", "0.16", "main") for record in flags) >= 928
    assert sum(counts.values()) == len(TABLE)


def test_issue_flags_have_the_decisions_it_asks_for():
    for flag in MUST_IMPLEMENT:
        assert flag in BY_FLAG, f"{flag} is not in the table"
        assert BY_FLAG[flag].decision in ("implemented", "implement"), \
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
    """implemented: our parser has the flag (and accepts the value of a value
    row); implement: it does not yet, so implementing one fails this test
    until the table says implemented; alias: the target is ours."""
    options = _parser_options()

    def accepts(option: str, value) -> bool:
        action = options.get(option)
        if action is None:
            return False
        if value is not None and action.type is not None:
            value = action.type(value)  # argparse converts a value before checking its choices
        return value is None or action.choices is None or value in action.choices

    for record in TABLE:
        where = f"line {record.line}: {record.flag}"
        if record.decision == "implemented":
            assert accepts(record.option, record.value), f"{where} is not in our parser"
        elif record.decision == "implement":
            assert not accepts(record.option, record.value), \
                f"{where} is in our parser now: mark it implemented"
        elif record.decision == "alias":
            target, _, value = record.target.partition(" ")
            assert accepts(target, value or None), f"{where}: target {record.target} is not ours"


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
