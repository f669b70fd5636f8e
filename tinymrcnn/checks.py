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


# ----------------------------------------------------------------------------
# RoI pooling arguments (shared by roi_align, roi_pool and their kernels)
# ----------------------------------------------------------------------------
ROI_MODES = ("avg", "max")


def check_rois(rois, num_images: int, name: str = "rois") -> np.ndarray:
    """(K, 5) [batch_index, x1, y1, x2, y2] -> float64 C-contiguous copy.

    Raises ValueError for a wrong shape, a batch index that is not an
    integer in [0, num_images), or a NaN/inf box coordinate (a box that
    lies outside the map, or has zero size, is fine: the kernels define
    what it gives).
    """
    if not isinstance(rois, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(rois).__name__}")
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"{name} must have shape (K, 5) [batch_index, x1, y1, x2, y2], got {rois.shape}")
    if not (np.issubdtype(rois.dtype, np.floating) or np.issubdtype(rois.dtype, np.integer)):
        raise ValueError(f"{name} must be a float or integer array, got {rois.dtype}")
    r = np.ascontiguousarray(rois, dtype=np.float64)
    b = r[:, 0]
    bad = ~((b >= 0) & (b < num_images) & (b == np.floor(b)))  # NaN fails too
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name}[{i}, 0] = {rois[i, 0]!r} is not a batch index in [0, {num_images}) ({int(bad.sum())} bad row(s))"
        )
    finite = np.isfinite(r[:, 1:]).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{name} contains {int((~finite).sum())} non-finite value(s) (NaN or inf): row {i} = {rois[i].tolist()}"
        )
    return r


def check_roi_args(output_size, sampling_ratio, mode, spatial_scale) -> tuple[int, int]:
    """RoIAlign / RoI pooling settings; returns (ph, pw)."""
    ph, pw = pair(output_size, "output_size")
    if ph < 1 or pw < 1:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    if mode not in ROI_MODES:
        raise ValueError(f"mode must be one of {ROI_MODES}, got {mode!r}")
    if not isinstance(sampling_ratio, (int, np.integer)):
        raise ValueError(f"sampling_ratio must be an int (<= 0: adaptive), got {sampling_ratio!r}")
    if not (np.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(f"spatial_scale must be a positive number, got {spatial_scale!r}")
    return ph, pw


def check_feature_map(x, name: str = "x"):
    """An (N, C, H, W) float map with H, W >= 1 (or an object with its ``shape`` and ``dtype``,
    such as a kernel's own layout of one, which was checked when it was made)."""
    if isinstance(x, np.ndarray):
        check_float_array(x, name, ndim=4)
    shape = tuple(x.shape)
    if len(shape) != 4 or shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"{name} must be (N, C, H, W) with H, W >= 1, got shape {shape}")
    return x
