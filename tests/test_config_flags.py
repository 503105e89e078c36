"""megatron_sr.config's own contracts: a field declares its flag and range once
(the dataclasses refuse a bad value with the message the parser gives), every
check of the derived values has a case in test_arguments.INVALID, and the
Megatron-LM flag table megatron_flags.csv drives the parser: aliases give their
targets' job, refusals name each flag with its reason, value rows decide single
values, and a table that disagrees with our flags is an error."""
import ast
import dataclasses
import inspect
import re
import textwrap
import warnings

import pytest

from megatron_sr.config import (DataConfig, ModelConfig, OptimizerConfig, ParallelConfig,
                                TrainingConfig, batch_size, build_parser, derived,
                                job_config_from_args)
from megatron_sr.config.arguments import FLAG_DEFAULTS
from megatron_sr.config.megatron_compat import MegatronTable, megatron_table
from megatron_sr.config.megatron_flag_table import load_table
from test_arguments import INVALID, _raising_line, argv, job


def _reached_raises() -> set[tuple[str, int]]:
    reached = set()
    for extra, drop, world_size, _ in INVALID:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError) as err:
                job(*extra, drop=drop, world_size=world_size)
        reached.add(_raising_line(err.value))
    return reached


@pytest.mark.parametrize("module", [derived, batch_size], ids=["derived", "batch_size"])
def test_every_check_of_the_derived_values_has_an_invalid_case(module):
    raises = {node.lineno for node in ast.walk(ast.parse(inspect.getsource(module)))
              if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
              and getattr(node.exc.func, "id", None) == "ValueError"}
    assert raises
    reached = {line for path, line in _reached_raises() if path == module.__file__}
    assert sorted(raises - reached) == [], f"checks of {module.__name__} without an INVALID case"


@pytest.mark.parametrize("build, message", [
    (lambda: OptimizerConfig(lr=float("nan")), "--lr must be a finite number in [0, inf), got nan"),
    (lambda: TrainingConfig(seed=-1), "--seed must be >= 0, got -1"),
    (lambda: ModelConfig(2, 64, 4, 128, 32, hidden_dropout=1.0),
     "--hidden-dropout must be a finite number in [0, 1), got 1.0"),
    (lambda: ModelConfig(2, 64, 4, 128, 32, layernorm_epsilon=0.0),
     "--norm-epsilon must be a finite number in (0, inf), got 0.0"),
    (lambda: DataConfig(vocab_size=0), "--vocab-size must be >= 1, got 0"),
    (lambda: ParallelConfig(distributed_timeout_minutes=0.0),
     "--distributed-timeout-minutes must be a finite number in (0, inf), got 0.0"),
])
def test_configs_refuse_an_out_of_range_value_as_its_flag_does(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def _job(*extra: str, drop: tuple = (), table=None, world_size: int = 1):
    args = build_parser(megatron_flags=table).parse_args(argv(*extra, drop=drop))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return job_config_from_args(args, world_size, megatron_flags=table)


def _without_notices(job):
    return dataclasses.replace(job, notices=())


# For each alias target of the table: a value and the flags it needs besides.
TARGET_VALUES = {
    "--micro-batch-size": ["2"], "--num-layers": ["2"], "--seq-length": ["64"],
    "--norm-epsilon": ["1e-6"], "--tensor-model-parallel-size": ["2"],
    "--recompute-num-layers": ["2", "--recompute-granularity", "full", "--recompute-method",
                               "uniform"],
    "--save-interval": ["5", "--save", "{tmp}"], "--ckpt-format": ["torch"],
}


def test_aliases_give_the_job_of_their_targets(tmp_path):
    """Every alias of the table: the same JobConfig as the flag it stands for."""
    aliases = [record for record in megatron_table().records if record.decision == "alias"]
    assert len(aliases) >= 17
    for record in aliases:
        target, _, value = record.target.partition(" ")
        if value:  # a switch meaning one value
            alias_words, target_words, extra = [record.flag], [target, value], []
        elif build_parser()._option_string_actions[target].nargs == 0:
            alias_words, target_words, extra = [record.flag], [target], []
        else:
            value, *extra = (word.format(tmp=tmp_path) for word in TARGET_VALUES[target])
            alias_words, target_words = [record.flag, value], [target, value]
        world_size = 2 if target == "--tensor-model-parallel-size" else 1
        expected = _job(*target_words, *extra, drop=(target,), world_size=world_size)
        got = _job(*alias_words, *extra, drop=(target,), world_size=world_size)
        assert _without_notices(got) == _without_notices(expected), record.flag
        assert _without_notices(got) != _without_notices(_job(*extra, world_size=world_size)) \
            or value == str(FLAG_DEFAULTS[target]), f"{record.flag} changes nothing"


def test_a_switch_alias_conflicts_with_another_value_of_its_target():
    assert _job("--use-rotary-position-embeddings").model.position_embedding_type == "rope"
    assert _job().model.position_embedding_type == "learned_absolute"
    with pytest.raises(ValueError, match="--use-rotary-position-embeddings means "
                                         "--position-embedding-type rope, which conflicts with "
                                         "--position-embedding-type learned_absolute"):
        _job("--use-rotary-position-embeddings", "--position-embedding-type", "learned_absolute")
    with pytest.raises(ValueError, match="--recompute-activations means --recompute-granularity "
                                         "selective, which conflicts with "
                                         "--checkpoint-activations"):
        _job("--recompute-activations", "--checkpoint-activations")


def test_refusals_name_every_flag_with_its_reason():
    with pytest.raises(ValueError) as error:
        _job("--fp16", "--use-flash-attn", "--fp8-format", "hybrid", "--fp8-param-gather",
             "--tokenizer-type", "BertWordPieceCase")
    by_flag = {record.flag: record for record in megatron_table().records}
    assert str(error.value).splitlines() == [
        f"--fp16: {by_flag['--fp16'].message}",
        f"--fp8-format hybrid, --fp8-param-gather: {by_flag['--fp8-format'].message}",
        f"--tokenizer-type BertWordPieceCase: "
        f"{by_flag['--tokenizer-type=BertWordPieceCase'].message}"]


def test_values_of_a_flag_are_decided_by_their_rows():
    """A value row of our flag gets past its choices to its row's decision; a
    value row of a flag of the table replaces the flag row's decision."""
    with pytest.raises(ValueError, match="--ckpt-format zarr: this checkpoint format is not "
                                         "written: use torch_dist"):
        _job("--ckpt-format", "zarr")
    with pytest.raises(ValueError, match="--dist-ckpt-format zarr|--ckpt-format zarr"):
        _job("--dist-ckpt-format", "zarr")
    with pytest.raises(SystemExit):  # neither ours nor a row: argparse's invalid choice
        build_parser().parse_args(argv("--ckpt-format", "zip"))
    job = _job("--optimizer", "adam", "--context-parallel-size", "1")
    assert any(notice.startswith("[flags] --optimizer adam is accepted and ignored: Megatron's "
                                 "adam is AdamW") for notice in job.notices)
    assert any("--context-parallel-size 1 is accepted and ignored" in n for n in job.notices)
    with pytest.raises(ValueError, match="--optimizer sgd: only AdamW is implemented"):
        _job("--optimizer", "sgd")
    with pytest.raises(ValueError, match="--context-parallel-size 2: context parallelism is not "
                                         "implemented: use 1"):
        _job("--context-parallel-size", "2")


TABLE_CSV = """
    flag,source,arity,decision,target,message
    --num-layers,0.16+main,1,implemented,,
    --position-embedding-type,0.16+main,1,implemented,,
    --position-embedding-type=none,0.16+main,1,notice,,the default instead
    --position-embedding-type=yarn,0.16+main,1,implement,,a RoPE variant
    --encoder-num-layers,0.16+main,1,alias,--num-layers,
    --high-priority-stream-groups,0.16+main,*|+,notice,,streams are ours
    --lazy-mpu-init,0.16+main,1|0,refused,,"not supported, launch with torchrun"
    --some-gap,0.16+main,2,implement,,a thing to come
    """


def _table(tmp_path, text: str):
    path = tmp_path / "flags.csv"
    path.write_text(textwrap.dedent(text).lstrip())
    return MegatronTable(load_table(str(path)))


def test_a_table_given_as_data_plugs_in(tmp_path):
    table = _table(tmp_path, TABLE_CSV)
    job = _job("--encoder-num-layers", "2", "--position-embedding-type", "none",
               "--high-priority-stream-groups", drop=("--num-layers",), table=table)
    assert job.model.num_layers == 2 and job.model.position_embedding_type == "learned_absolute"
    assert job.notices[:2] == (
        "[flags] --high-priority-stream-groups is accepted and ignored: streams are ours",
        "[flags] --position-embedding-type none is accepted and ignored: the default instead")
    assert "--high-priority-stream-groups a b" in _job(
        "--high-priority-stream-groups", "a", "b", table=table).notices[0]
    for words in (["--lazy-mpu-init"], ["--lazy-mpu-init", "x"]):
        with pytest.raises(ValueError, match=f"^{' '.join(words)}: not supported, launch with"):
            _job(*words, table=table)
    with pytest.raises(ValueError, match=r"^--some-gap 1 2: not implemented in megatron_sr yet "
                                         r"\(a thing to come\)"):
        _job("--some-gap", "1", "2", table=table)
    with pytest.raises(ValueError, match=r"^--position-embedding-type yarn: not implemented in "
                                         r"megatron_sr yet \(a RoPE variant\); give "
                                         r"--position-embedding-type another value$"):
        _job("--position-embedding-type", "yarn", table=table)
    help = build_parser(megatron_flags=table).format_help()
    assert "--lazy-mpu-init" not in help and "--encoder-num-layers" in help
    assert "1 are ignored with a one-line notice" in " ".join(help.split())


@pytest.mark.parametrize("row, error", [
    ("--encoder-seq-length,0.16+main,1,alias,--no-such-flag,", "--no-such-flag is not a "
                                                                "megatron_sr flag"),
    ("--no-such-flag,0.16+main,0,implemented,,", "--no-such-flag is marked implemented, but "
                                                 "megatron_sr has no such flag"),
    ("--num-layers,0.16+main,1,implement,,to come", "--num-layers is a megatron_sr flag, but "
                                                    "the table says implement"),
    ("--ckpt-format,0.16+main,1,implemented,,\n--ckpt-format=zip,0.16+main,1,implemented,,",
     "--ckpt-format=zip is marked implemented, but --ckpt-format does not take zip"),
    ("--ckpt-format,0.16+main,1,implemented,,\n--ckpt-format=torch,0.16+main,1,refused,,no",
     "--ckpt-format takes torch, but the table says refused"),
    ("--use-rotary-position-embeddings,0.16+main,0,alias,--position-embedding-type yarn,",
     "--position-embedding-type does not take yarn"),
    ("--lr,0.16+main,1,alias,--min-lr,", "--lr is a megatron_sr flag, but the table says alias"),
])
def test_a_table_that_disagrees_with_our_flags_is_an_error(tmp_path, row, error):
    table = _table(tmp_path, "flag,source,arity,decision,target,message\n" + row + "\n")
    with pytest.raises(ValueError, match=re.escape(error)):
        build_parser(megatron_flags=table)
