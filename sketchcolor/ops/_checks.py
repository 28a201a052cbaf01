"""Argument checks shared by the public ops: each failure names the argument."""
from __future__ import annotations

import math
import numbers

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# The kernels take scale and margin as float32.
FLOAT32_MAX = torch.finfo(torch.float32).max


def type_name(value) -> str:
    """A value's type for messages: "int", or "numpy.bool" where a bare "bool" would mislead."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_tensor(name: str, t, ranks: tuple[int, ...], dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(t)}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.is_nested:
        # A nested tensor of strided layout has no shape to check.
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor")
    if t.dim() not in ranks:
        raise ValueError(f"{name} must have rank {' or '.join(map(str, ranks))}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """dtype and device of ``t`` agree with ``ref``."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must be on one device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_dim(name: str, size: int, expected: int, what: str) -> None:
    if size != expected:
        raise ValueError(f"{name}: {what} must be {expected}, got {size}")


def check_index_values(name: str, index: torch.Tensor, num_keys: int) -> None:
    """The int64 ``index`` holds key indices or -1 for none: values in [-1, num_keys)."""
    if index.numel() == 0:
        return
    expected = f"{name} values must be in [-1, M) = [-1, {num_keys})"
    if torch.compiler.is_compiling() or (index.is_cuda and torch.cuda.is_current_stream_capturing()):
        # No host copy here: a traced graph cannot branch on the values, and a copy would end a
        # CUDA graph capture. The check runs on the device; on a GPU a bad index fails the next
        # synchronizing call (a device-side assert), on the CPU it raises at once.
        lowest, highest = torch.aminmax(index)
        torch._assert_async((lowest >= -1) & (highest < num_keys), expected)
        return
    if index.device.type == "meta" or is_fake(index):
        return  # shape propagation: there are no values to check
    lowest, highest = (int(v) for v in torch.aminmax(index))
    if lowest < -1 or highest >= num_keys:
        raise ValueError(f"{expected}, got values in [{lowest}, {highest}]")


def check_number(name: str, value) -> float:
    """``value`` as a float: a finite real number within float32's range. Python and NumPy numbers
    pass; bools, strings and tensors do not (a tensor's gradient would be dropped). Under
    torch.compile a float that changes between calls arrives symbolic; the check then guards the
    compiled graph."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type_name(value)}")
    value = float(value)
    # Comparisons rather than math.isfinite, which a symbolic float does not take: NaN fails the
    # first, infinities the second.
    if not (value == value and abs(value) <= FLOAT32_MAX):
        raise ValueError(f"{name} must be finite and within float32's range (|{name}| <= {FLOAT32_MAX:.4g}), got {value!r}")
    return value


def resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return check_number("scale", scale)
