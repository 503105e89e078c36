"""Reading Megatron-LM's pickles without running code they carry.

Megatron-LM writes `torch.save` pickles: the legacy format's
`mp_rank_*/model_optim_rng.pt` and torch_dist's `common.pt`. Besides tensors
and plain containers they hold the run's `args` (an `argparse.Namespace`
whose values include Megatron's enums, e.g. `AttnBackend.auto`, and
`signal.Signals`), torch dtypes, and numpy arrays in the RNG state.

`read_megatron_pickle` first lists the globals the pickle names (without
running it, `named_globals`) and
refuses the file, naming it and the class, unless every one is allowed:

- `argparse.Namespace`, `signal.Signals`, torch dtypes (torch's own list);
- numpy's array and dtype reconstruction (RNG states);
- an enum of a `megatron.*.enums` module: read by name into a plain string
  `"AttnBackend.auto"` (the value's number when the member is not known here)
  by a stand-in; megatron is never imported.

Then torch's weights_only unpickler loads it with exactly those globals
allowed, so no other callable can run even in a crafted file.
"""
from __future__ import annotations

import argparse
import io
import signal
import zipfile

import numpy as np
import torch

# Members of Megatron's enums that appear in its args (megatron-core 0.16), by value.
_ENUM_MEMBERS = {
    "AttnBackend": {1: "flash", 2: "fused", 3: "unfused", 4: "local", 5: "auto"},
    "ModelType": {1: "encoder_or_decoder"},
    "AttnMaskType": {1: "padding", 2: "causal", 3: "no_mask", 4: "padding_causal",
                     5: "arbitrary", 6: "causal_bottom_right"},
}


def _numpy_globals() -> dict[str, object]:
    allowed: dict[str, object] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") \
        else np.core.multiarray._reconstruct
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2 and 1 files
        allowed[f"{module}._reconstruct"] = reconstruct
        allowed[f"{module}.scalar"] = scalar
    return allowed


def _dtype_classes() -> list[type]:
    """numpy's per-dtype classes: BUILD of a dtype checks its type is allowed."""
    return [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFD"]


ALLOWED = {"argparse.Namespace": argparse.Namespace, "signal.Signals": signal.Signals,
           **_numpy_globals()}


class _EnumByName:
    """Stands in for a Megatron enum class: calling it with a member's value
    (what unpickling an enum does) gives the plain string "Class.member"."""

    def __init__(self, class_name: str):
        self.class_name = class_name

    def __call__(self, value):
        member = _ENUM_MEMBERS.get(self.class_name, {}).get(value)
        return f"{self.class_name}.{member}" if member else f"{self.class_name}({value!r})"


def _is_megatron_enum(qualified_name: str) -> bool:
    module, _, _ = qualified_name.rpartition(".")
    return module.startswith("megatron.") and module.endswith(".enums")


def named_globals(path: str) -> list[str]:
    """Every global the torch.save file at `path` names that torch's
    weights_only unpickler does not allow by default, found without running
    the pickle. Independent of what other code registered with
    `torch.serialization.add_safe_globals` (megatron-core registers its
    enums and Namespace when imported). ValueError naming `path` when it is
    not a torch.save zip file."""
    from torch import _weights_only_unpickler

    try:
        with zipfile.ZipFile(path) as archive:
            records = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(records) != 1:
                raise ValueError("no single data.pkl record")
            found = _weights_only_unpickler.get_globals_in_pkl(
                io.BytesIO(archive.read(records[0])))
    except (OSError, ValueError, RuntimeError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a readable torch.save file "
                         f"({type(exc).__name__}: {str(exc)[:160]})") from None
    return sorted(set(found) - set(_weights_only_unpickler._get_allowed_globals()))


def read_megatron_pickle(path: str) -> dict:
    """The dict Megatron-LM saved at `path` (tensors on the CPU), loaded
    without running foreign code (module docstring). ValueError naming `path`
    when it names a class outside the allowlist, is not a torch.save file, or
    does not hold a dict."""
    names = named_globals(path)
    allowed: list = []
    for name in names:
        if name in ALLOWED:
            allowed.append((ALLOWED[name], name))
        elif _is_megatron_enum(name):
            allowed.append((_EnumByName(name.rpartition(".")[2]), name))
        else:
            raise ValueError(f"{path} names the class {name}, which a Megatron-LM checkpoint "
                             f"does not hold: refused without running it (a foreign or "
                             f"crafted file)")
    allowed += _dtype_classes()
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure of a malformed file
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise ValueError(f"{path} could not be read as a Megatron-LM checkpoint "
                         f"({type(exc).__name__}: {lines[0][:200] if lines else ''})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a Megatron-LM "
                         f"checkpoint's dict")
    return state
