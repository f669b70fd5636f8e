"""The kernels behind ``tinymrcnn.ops``, and the one place that picks CPU or GPU.

    tinymrcnn.ops.conv2d(x, w, ...)        checks its arguments, then calls
      -> tinymrcnn.kernels.active_backend().conv2d(...)
           cpu/backend.py   Numba loops + BLAS      (the default)
           cuda/backend.py  numba.cuda kernels      (after set_device("cuda"))

The model and its layers never ask which device they run on: they call the
ops, and the ops call whichever backend is active. ``tinymrcnn.runtime``
sets it from ``MaskRCNNConfig.device`` for training, evaluation and the
benchmarks. Both backends have the same functions, take NumPy arrays and
return NumPy arrays.
"""

from __future__ import annotations

import importlib

DEVICES = ("cpu", "cuda")
_device = "cpu"


def set_device(device: str) -> None:
    """Make the ops run on ``device`` ("cpu" or "cuda") from now on.

    "cuda" checks once that numba.cuda and a GPU (or the simulator) are
    usable, and raises one RuntimeError that says why not otherwise.
    """
    global _device
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda":
        from .cuda.device import require_cuda

        try:
            require_cuda()
        except RuntimeError as e:
            raise RuntimeError(
                f"device 'cuda': {e} The CPU path is device='cpu' (the MaskRCNNConfig field, or --device cpu)."
            ) from None
    _device = device


def get_device() -> str:
    return _device


def active_backend():
    """The active backend module: ``kernels.cpu.backend`` or ``kernels.cuda.backend``."""
    return importlib.import_module(f"{__name__}.{_device}.backend")
