"""The docs stay true to the code: the flag reference is what the parser
generates, and every relative link in README.md and docs/ leads somewhere."""
import importlib.util
import re
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
    """Every flag with help (ours and the aliases); the Megatron-LM flags that
    are only ignored or refused are not listed, but the table that holds them is named."""
    import argparse

    from megatron_sr.config import build_parser

    reference = (ROOT / "docs" / "FLAGS.md").read_text()
    listed = 0
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help") and action.help is not argparse.SUPPRESS:
                assert f"`{flag}`" in reference, flag
                listed += 1
    assert listed > 100
    assert "megatron_sr/config/megatron_flags.csv" in reference
    assert "`--use-flash-attn`" not in reference


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -> '-'."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in headings}


def test_relative_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
