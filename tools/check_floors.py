"""Runs a smoke subset of the tests on the oldest torch and Triton that setup.py allows.

    python3 tools/check_floors.py                 # build or reuse the venv, run the subset
    python3 tools/check_floors.py --print-floors  # the floors read from setup.py
    VENV=/path python3 tools/check_floors.py -x   # extra arguments go to pytest

The floors are read from setup.py's install_requires (`torch>=A`,
`triton>=B`), so the versions checked are the ones users are promised.
`torch==A` and `triton==B` come from PyPI into their own virtualenv (VENV,
default ~/.cache/megatron_sr/floor-venv, kept between runs and rebuilt when
setup.py changes); PyPI's Linux torch is the CUDA build (several GB with its
NVIDIA libraries, once), which runs on the CPU as well. megatron_sr is
installed from this checkout (editable) with its requirements and pytest; no
test extras. The subset covers the model (SDPA, autocast), the precision
kernels (torch and Triton in interpreter mode, and the PTX of every kernel
compiled by this Triton for sm_90 with the launch options), the training
loop, torch_dist checkpoints and the flags. Exit status: pytest's, or 1 when
the venv's versions are not the floors. The suite runs it
(tests/test_version_floors.py, a slow test), so CI does.
"""
from __future__ import annotations

import ast
import hashlib
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE_TESTS = ["tests/test_gpt_model.py", "tests/test_precision_rounding.py", "tests/test_precision_adamw.py",
               "tests/test_training.py", "tests/test_checkpoint_torch_dist.py", "tests/test_arguments.py",
               "tests/test_version_floors.py"]
# Every test of it, the slow ones included: the PTX of each kernel as this Triton compiles it.
PTX_TESTS = ["tests/test_precision_ptx.py"]


def floors(setup_py: Path = ROOT / "setup.py") -> dict[str, str]:
    """{"torch": "A", "triton": "B"}: the `>=` bounds of install_requires in
    `setup_py`. Raises ValueError naming the file when one is missing."""
    tree = ast.parse(setup_py.read_text(encoding="utf-8"))
    requirements = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            requirements = [ast.literal_eval(item) for item in node.value.elts]
    found = {}
    for requirement in requirements:
        match = re.match(r"(torch|triton)\s*>=\s*([0-9][0-9.]*)", requirement)
        if match:
            found[match.group(1)] = match.group(2)
    missing = {"torch", "triton"} - set(found)
    if missing:
        raise ValueError(f"{setup_py}: install_requires has no '>=' floor for {', '.join(sorted(missing))}")
    return found


def _venv_python(root: Path, pins: dict[str, str]) -> Path:
    """The venv's python with torch and triton at `pins` and this checkout
    installed; (re)installs when the stamp (pins, setup.py) differs."""
    folder = Path(os.environ.get("VENV") or Path.home() / ".cache" / "megatron_sr" / "floor-venv")
    python = folder / "bin" / "python"
    if not python.exists():
        venv.create(folder, with_pip=True)
    stamp = folder / ".megatron_sr-floors"
    wanted = f"{root} {pins} {hashlib.sha256((root / 'setup.py').read_bytes()).hexdigest()}"
    if not stamp.exists() or stamp.read_text() != wanted:
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + [f"{name}=={version}" for name, version in sorted(pins.items())], check=True)
        subprocess.run(pip + ["-e", str(root), "pytest>=7", "pytest-timeout"], check=True)
        stamp.write_text(wanted)
    return python


def main(argv: list[str]) -> int:
    pins = floors()
    if argv[:1] == ["--print-floors"]:
        print(" ".join(f"{name}=={version}" for name, version in sorted(pins.items())))
        return 0
    python = _venv_python(ROOT, pins)
    installed = subprocess.run(
        [str(python), "-c", "import torch, triton; print(torch.__version__.split('+')[0], triton.__version__)"],
        check=True, capture_output=True, text=True).stdout.split()
    for (name, version), got in zip(sorted(pins.items()), installed):
        if got.split(".")[:2] != version.split(".")[:2]:
            print(f"check_floors: {python} has {name} {got}, not setup.py's floor {version}", file=sys.stderr)
            return 1
    print(f"check_floors: torch {installed[0]}, triton {installed[1]} (setup.py's floors)", flush=True)
    subprocess.run([str(python), str(ROOT / "tools" / "prepare_sample_corpus.py"), "--gpt2-files"],
                   check=True, stdout=subprocess.DEVNULL)
    for tests, marks in ((SMOKE_TESTS, ["-m", "not slow"]), (PTX_TESTS, [])):
        result = subprocess.run([str(python), "-m", "pytest", "-q", *marks, *tests, *argv], cwd=ROOT)
        if result.returncode != 0:
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
