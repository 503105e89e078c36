"""The docs stay true to the code: the flag reference is what the parser generates."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_flag_reference_is_current(capsys):
    """`python tools/flag_reference.py --check`, run in this process (the
    tool's import of torch is what a subprocess would spend its time on)."""
    spec = importlib.util.spec_from_file_location("flag_reference", ROOT / "tools" / "flag_reference.py")
    flag_reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flag_reference)
    assert flag_reference.main(["--check"]) == 0, capsys.readouterr().err


def test_flag_reference_lists_every_flag():
    from megatron_sr.arguments import build_parser

    reference = (ROOT / "docs" / "FLAGS.md").read_text()
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}`" in reference, flag
