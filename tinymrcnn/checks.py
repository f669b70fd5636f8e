"""Input validation shared by every op, layer and model entry point.

Bad input must fail early with a message that names the problem, never
deep inside a Numba kernel. Each helper raises ValueError (TypeError for
non-arrays) and returns the array unchanged on success.
"""
from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.float32, np.float64)


def check_float_array(x, name: str, ndim: int | None = None, finite: bool = True) -> np.ndarray:
    """``x`` must be a float32/float64 ndarray of rank ``ndim`` with finite values."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    if finite and x.size and not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")
    return x


def check_same_dtype(*named: tuple[str, np.ndarray]) -> None:
    """All arrays share one dtype (mixing float32 and float64 would compile kernels twice)."""
    dtypes = {a.dtype for _, a in named if a is not None}
    if len(dtypes) > 1:
        desc = ", ".join(f"{n}: {a.dtype}" for n, a in named if a is not None)
        raise ValueError(f"dtype mismatch ({desc}); cast all inputs to one float dtype")


def pair(v, name: str = "value") -> tuple[int, int]:
    """An int or a pair of ints -> (a, b)."""
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    try:
        a, b = v
        return int(a), int(b)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
