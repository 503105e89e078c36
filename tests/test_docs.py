"""The docs stay true to the code: the flag reference is what the parser generates."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_flag_reference_is_current():
    result = subprocess.run([sys.executable, "tools/flag_reference.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_flag_reference_lists_every_flag():
    from megatron_sr.arguments import build_parser

    reference = (ROOT / "docs" / "FLAGS.md").read_text()
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}`" in reference, flag
