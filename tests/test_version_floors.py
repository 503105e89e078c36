"""setup.py's torch and Triton floors are the versions that are checked.

`tools/check_floors.py` reads the floors from setup.py and runs a smoke
subset of this suite, this file included, on exactly those versions; the
slow test here runs it, so the suite (and CI, which runs the suite) proves
the floors, and the other tests keep the floors, the kernels' own import
check and the running versions in step. Why the floors are where they are: setup.py and
`megatron_sr.precision.kernels.TRITON_FLOOR`.
"""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _check_floors():
    spec = importlib.util.spec_from_file_location("check_floors", ROOT / "tools" / "check_floors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def test_the_triton_floor_is_the_kernels_import_check():
    from megatron_sr.precision import kernels

    assert _release(_check_floors().floors()["triton"]) == kernels.TRITON_FLOOR


def test_this_suite_runs_at_or_above_the_floors():
    import torch
    import triton

    floors = _check_floors().floors()
    assert _release(torch.__version__) >= _release(floors["torch"])
    assert _release(triton.__version__) >= _release(floors["triton"])


def test_a_setup_py_without_a_floor_is_named(tmp_path):
    setup_py = tmp_path / "setup.py"
    setup_py.write_text('setup(install_requires=["torch>=2.10", "numpy"])\n')
    with pytest.raises(ValueError, match=f"{setup_py}: install_requires has no '>=' floor for triton"):
        _check_floors().floors(setup_py)


@pytest.mark.slow
@pytest.mark.timeout(3000)  # a fresh machine installs the floor venv first (~13 min, once)
def test_the_smoke_subset_passes_on_the_floor_versions():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "tools" / "check_floors.py")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "(setup.py's floors)" in result.stdout
