"""Bit-for-bit comparison of float tensors and arrays.

`==` (and so `torch.equal`, `np.array_equal`) calls -0.0 equal to 0.0 and a
NaN unequal to itself; the tests that promise "bit-identical" compare the
bit patterns instead.
"""
import numpy as np
import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(x):
    """The same-size integer view of a floating-point torch tensor or numpy
    array (its bit patterns); integer and bool data are returned unchanged."""
    if isinstance(x, torch.Tensor):
        return x.view(_INT_OF_SIZE[x.element_size()]) if x.is_floating_point() else x
    x = np.asarray(x)
    return x.view(f"i{x.itemsize}") if np.issubdtype(x.dtype, np.floating) else x


def assert_same_bits(a, b, message: str = "") -> None:
    """`a` and `b` have the same dtype, shape and bits (numpy or torch)."""
    assert a.dtype == b.dtype and a.shape == b.shape, \
        f"{message}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
    if isinstance(a, torch.Tensor):
        same = torch.equal(as_bits(a), as_bits(b))
    else:
        same = np.array_equal(as_bits(a), as_bits(b))
    assert same, f"{message}: bits differ"
