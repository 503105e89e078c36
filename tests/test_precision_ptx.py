"""The Triton kernels as the CUDA compiler builds them: IEEE fp32, no GPU needed.

Spec (docs/DESIGN.md "Stochastic rounding: the contract", point 1): torch, C and
Triton write the same bits on a GPU too, so no kernel of
`megatron_sr.precision.kernels` may contract a multiply-add into an FMA
(which rounds once where the torch reference rounds twice) or flush
subnormals to zero. The interpreter cannot show this; the PTX can:
`triton.compile` builds each kernel, in every variant the launchers use,
for sm_90 with the options the launchers pass (`kernels.IEEE_OPTIONS`),
and the PTX must hold no `fma.*f32` and no `.ftz` instruction.

The compiler runs in a subprocess (this file run as a script): the test
process imports Triton in interpreter mode, whose kernels cannot be compiled.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

FMA = re.compile(r"\bfma\.[a-z.]*f32\b")
FTZ = re.compile(r"\.ftz\b")


def _variants():
    """(kernel name, label, signature, constexprs) of every compiled variant:
    the AdamW kernel for each strategy row (with and without a gradient
    scale for bf16-sr), the SR cast and the SR add."""
    import torch

    from megatron_sr.precision.adamw_torch import WRITE_STOCHASTIC, write_modes
    from megatron_sr.precision.kernels import BLOCK_SIZE, TABLE_COLUMNS
    from megatron_sr.precision.strategies import get_strategy

    pointer = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}
    rows = [("fp32", None), ("bf16-mixed", None), ("bf16", None), ("bf16-sr", None), ("bf16-sr", "fp32"),
            ("bf16-kahan", None), ("bf16-kahan", "fp32")]
    variants = []
    for name, state_dtype in rows:
        strategy = get_strategy(name, state_dtype)
        modes = write_modes(strategy)
        param = pointer[strategy.param_dtype]
        for grad_scale in ((True, False) if (name, state_dtype) == ("bf16-sr", None) else (True,)):
            signature = {
                "param_ptr": param, "grad_ptr": pointer[strategy.grad_dtype],
                "exp_avg_ptr": pointer[strategy.exp_avg_dtype], "exp_avg_sq_ptr": pointer[strategy.exp_avg_sq_dtype],
                "master_ptr": pointer[strategy.master_dtype] if strategy.master_dtype else param,
                "kahan_ptr": pointer[strategy.kahan_dtype] if strategy.kahan_dtype else param,
                "table_ptr": "*i64", "sr_keys_ptr": "*i64", "grad_scale_ptr": "*fp32" if grad_scale else "*i64",
            }
            for scalar in ("lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "inv_bias_correction1",
                           "inv_bias_correction2", "eps", "decay"):
                signature[scalar] = "fp32"
            signature["num_segments"] = "i32"
            constexprs = dict(PARAM_WRITE=modes[0], EXP_AVG_WRITE=modes[1], EXP_AVG_SQ_WRITE=modes[2],
                              HAS_MASTER=strategy.master_dtype is not None,
                              NEEDS_RANDOM=WRITE_STOCHASTIC in modes, HAS_GRAD_SCALE=grad_scale,
                              COLUMNS=TABLE_COLUMNS, BLOCK=BLOCK_SIZE)
            signature.update({key: "constexpr" for key in constexprs})
            label = f"{name}{'+fp32-state' if state_dtype else ''}{'' if grad_scale else ' no-scale'}"
            variants.append(("_adamw_kernel", label, signature, constexprs))
    variants.append(("_sr_cast_kernel", "sr-cast", dict(x_ptr="*fp32", out_ptr="*bf16", seed="i64", offset="i64",
                                                          n="i32", BLOCK="constexpr"), dict(BLOCK=BLOCK_SIZE)))
    variants.append(("_sr_add_kernel", "sr-add", dict(acc_ptr="*bf16", addend_ptr="*bf16", seed="i64", offset="i64",
                                                        n="i32", BLOCK="constexpr"), dict(BLOCK=BLOCK_SIZE)))
    return variants


def compile_all(options: dict, only: str = "") -> dict:
    """{"kernel label": {"fma": count, "ftz": count}} of the sm_90 PTX of every
    variant (or only the one labelled `only`) compiled with `options`;
    "missing" lists kernels of the module that no variant covers. Needs
    Triton outside interpreter mode."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from megatron_sr.precision import kernels

    counts = {}
    covered = set()
    for kernel_name, label, signature, constexprs in _variants():
        if only and f"{kernel_name} {label}" != only:
            continue
        source = ASTSource(fn=getattr(kernels, kernel_name), signature=signature, constexprs=constexprs)
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 64), options=dict(options)).asm["ptx"]
        counts[f"{kernel_name} {label}"] = {"fma": len(FMA.findall(ptx)), "ftz": len(FTZ.findall(ptx))}
        covered.add(kernel_name)
    launched = {name for name, value in vars(kernels).items()
                if isinstance(value, JITFunction) and name.endswith("_kernel")}
    return {"counts": counts, "missing": sorted(launched - covered)}


def _compiler_available() -> bool:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def ptx_report() -> dict:
    """This file run as a script in a Triton process outside interpreter mode:
    "ieee", every variant with `kernels.IEEE_OPTIONS`; "default", the bf16-sr
    AdamW kernel with Triton's default options."""
    if not _compiler_available():
        pytest.skip("needs Triton's NVIDIA backend")
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("TRITON_INTERPRET", "TRITON_FORCE_DISABLE_FP_FUSION")}
    # Triton 3.9's default (fusion on) stated explicitly: the launch options must override it.
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment["PYTHONPATH"] = os.pathsep.join([root, environment.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, os.path.abspath(__file__)], env=environment,
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"compiling the kernels failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_kernel_compiles_to_ptx_without_fma_or_ftz(ptx_report):
    report = ptx_report["ieee"]
    assert report["missing"] == []
    assert len(report["counts"]) == 10
    bad = {label: count for label, count in report["counts"].items() if count["fma"] or count["ftz"]}
    assert bad == {}


@pytest.mark.slow
def test_the_check_sees_fma_when_fusion_is_on(ptx_report):
    """Triton's default contracts the AdamW arithmetic into FMAs: the check above can fail."""
    assert ptx_report["default"]["counts"]["_adamw_kernel bf16-sr"]["fma"] > 0


def _record_launches(monkeypatch) -> list[tuple[str, dict]]:
    """(kernel name, keyword arguments) of one launch of each launcher of
    `kernels` (the kernels replaced by a recorder: nothing runs)."""
    import torch

    from megatron_sr.precision import kernels

    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, kwargs))

    for name in ("_adamw_kernel", "_sr_cast_kernel", "_sr_add_kernel"):
        monkeypatch.setattr(kernels, name, Recorder(name))
    x = torch.zeros(10)
    kernels.sr_cast(x, x.bfloat16(), seed=1, offset=0)
    kernels.sr_add(x.bfloat16(), x.bfloat16(), seed=1, offset=0)
    table = torch.tensor([[0, 10, 0, 0, 1], [10, 0, 0, 1, 0]])
    kernels.adamw_step(x, x, x, x, None, None, [0.0] * 9, table, torch.zeros(1, dtype=torch.int64), None, 1,
                       param_write=0, exp_avg_write=0, exp_avg_sq_write=0)
    return launches


def test_launchers_pass_the_ieee_options(monkeypatch):
    launches = _record_launches(monkeypatch)
    assert [name for name, _ in launches] == ["_sr_cast_kernel", "_sr_add_kernel", "_adamw_kernel"]
    for _, kwargs in launches:
        assert kwargs["enable_fp_fusion"] is False and kwargs["enable_reflect_ftz"] is False


def test_every_launch_option_is_a_cuda_option_of_the_installed_triton(monkeypatch):
    """A keyword of a launch that is no parameter of the kernel is a compile
    option. A launch raises KeyError on one that the installed Triton's CUDA
    backend lacks (Triton 3.4 and 3.5 on `enable_reflect_ftz`), while
    `triton.compile`, which the PTX tests use, drops it silently: so each
    must be a field of this Triton's `CUDAOptions`."""
    if not _compiler_available():
        pytest.skip("needs Triton's NVIDIA backend")
    from triton.backends.nvidia.compiler import CUDAOptions

    from megatron_sr.precision import kernels

    parameters = {name: set(getattr(kernels, name).arg_names)
                  for name in ("_adamw_kernel", "_sr_cast_kernel", "_sr_add_kernel")}
    options = {key for name, kwargs in _record_launches(monkeypatch) for key in kwargs
               if key not in parameters[name]}
    assert options == set(kernels.IEEE_OPTIONS)
    assert sorted(options - set(CUDAOptions.__dataclass_fields__)) == []


if __name__ == "__main__":
    from megatron_sr.precision.kernels import IEEE_OPTIONS

    print(json.dumps({"ieee": compile_all(IEEE_OPTIONS), "default": compile_all({}, only="_adamw_kernel bf16-sr")}))
