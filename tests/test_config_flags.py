"""megatron_sr.config's own contracts: a field declares its flag and range once
(the dataclasses refuse a bad value with the message the parser gives), every
check of the derived values has a case in test_arguments.INVALID, and the
Megatron-LM flag table takes rows as data (name, decision, takes_value,
target, message)."""
import ast
import inspect
import re
import warnings

import pytest

from megatron_sr.config import (DataConfig, ModelConfig, OptimizerConfig, ParallelConfig,
                                TrainingConfig, batch_size, build_parser, derived,
                                job_config_from_args)
from megatron_sr.config.megatron_compat import MEGATRON_FLAGS, MegatronFlag
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


# Rows as a data table of Megatron-LM's flags writes them.
ROWS = [
    {"name": "--encoder-num-layers", "decision": "alias", "takes_value": True,
     "alias_of": "--num-layers", "message": ""},
    {"name": "--use-rotary-position-embeddings", "decision": "alias", "takes_value": False,
     "target": "--position-embedding-type rope", "message": ""},
    {"name": "--no-bias-dropout-fusion", "decision": "notice", "takes_value": False,
     "target": None, "message": "dropout and the bias add are separate ops"},
    {"name": "--fp8-wgrad", "decision": "refused", "takes_value": False, "target": None,
     "message": "FP8 training is not supported"},
    {"name": "--num-layers", "decision": "implemented", "takes_value": True, "target": None,
     "message": ""},
    {"name": "--validation-set-names", "decision": "notice", "takes_value": True, "nargs": "+",
     "message": "one validation set, named by --valid-data-path"},
]
TABLE = MEGATRON_FLAGS + tuple(MegatronFlag.from_row(row) for row in ROWS)


def _job(*extra: str, drop: tuple = ()):
    args = build_parser(megatron_flags=TABLE).parse_args(argv(*extra, drop=drop))
    return job_config_from_args(args, 1, megatron_flags=TABLE)


def test_flag_table_rows_given_as_data_plug_in():
    assert _job("--encoder-num-layers", "2", drop=("--num-layers",)).model.num_layers == 2
    assert _job("--use-rotary-position-embeddings").model.position_embedding_type == "rope"
    assert _job().model.position_embedding_type == "learned_absolute"
    with pytest.raises(ValueError, match="--use-rotary-position-embeddings means "
                                         "--position-embedding-type rope, which conflicts with "
                                         "--position-embedding-type learned_absolute"):
        _job("--use-rotary-position-embeddings", "--position-embedding-type", "learned_absolute")
    assert any("--no-bias-dropout-fusion is accepted and ignored: dropout and the bias" in notice
               for notice in _job("--no-bias-dropout-fusion").notices)
    assert any("--validation-set-names a b is accepted and ignored: one validation set" in notice
               for notice in _job("--validation-set-names", "a", "b").notices)
    with pytest.raises(ValueError, match="--fp8-wgrad: FP8 training is not supported"):
        _job("--fp8-wgrad")


@pytest.mark.parametrize("row", [
    {"name": "--encoder-seq-length", "decision": "alias", "target": "--no-such-flag"},
    {"name": "--no-such-flag", "decision": "implemented"},
])
def test_a_row_naming_a_flag_megatron_sr_lacks_is_an_error(row):
    with pytest.raises(ValueError, match="--no-such-flag"):
        build_parser(megatron_flags=(MegatronFlag.from_row(row),))


def test_a_row_with_an_unknown_decision_column_or_no_message_is_an_error():
    with pytest.raises(ValueError, match="decision 'maybe'"):
        MegatronFlag("--x", "maybe")
    with pytest.raises(ValueError, match="a refused needs its message"):
        MegatronFlag("--x", "refused")
    with pytest.raises(ValueError, match="unknown column.*alias_to"):
        MegatronFlag.from_row({"name": "--x", "decision": "alias", "alias_to": "--lr"})
