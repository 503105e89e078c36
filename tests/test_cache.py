"""The cache folder (`megatron_sr.cache`) and who depends on it: the precision
seam takes its kernel cache from there, not from the data package."""
import os
import subprocess
import sys

from megatron_sr import cache
from megatron_sr.data import sample_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cache_root_is_the_environment_variable_else_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "c"))
    assert cache.cache_root() == str(tmp_path / "c")
    monkeypatch.delenv(cache.CACHE_ENV)
    assert cache.cache_root() == os.path.join(REPO, ".cache")
    assert sample_files.cache_root is cache.cache_root


def test_the_native_kernel_does_not_import_the_data_package(tmp_path):
    code = ("import sys, megatron_sr.precision.native as native; native.library_path(); "
            "print(sorted(m for m in sys.modules if m.startswith('megatron_sr.data')))")
    env = {**os.environ, cache.CACHE_ENV: str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert out.strip() == "[]"
