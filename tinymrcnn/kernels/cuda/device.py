"""Lazy access to numba.cuda: the one door between tinymrcnn and the GPU.

Nothing on tinymrcnn's CPU path imports numba.cuda. Every import below sits
inside a function, so ``import tinymrcnn`` costs no CUDA driver probe and works
on machines with no GPU and no ``numba-cuda`` package.

Where numba.cuda comes from
---------------------------
* ``pip install "tinymrcnn[cuda]"`` installs the ``numba-cuda`` package, the
  NVIDIA-maintained CUDA target. It takes over the name ``numba.cuda``
  (``numba.cuda.implementation == "NVIDIA"``).
* Without it, Numba's own, deprecated, built-in target answers to the same
  name (``implementation == "Built-in"``). The kernels use only API the two
  share, so either works; numba-cuda is the supported one.
* With ``NUMBA_ENABLE_CUDASIM=1`` set *before numba is first imported*, both
  replace the GPU by the CUDA simulator, which runs each thread as a Python
  thread. It counts as available here: that is how the tests run the
  kernels on machines without a GPU.

Two differences between the targets matter to this file:
* Device arrays of the simulator (``FakeCUDAArray``) do not carry
  ``__cuda_array_interface__``; real ones and the simulator's both set
  ``__cuda_ndarray__``, which :func:`is_cuda_array` also accepts.
* Recent numba-cuda releases mark ``to_device``/``device_array`` deprecated
  (in favour of CuPy) with a ``DeprecatedDeviceArrayApiWarning``; we keep
  using them (they still work, and CuPy would be one more dependency) and
  silence only that warning.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import warnings

import numpy as np

INSTALL_HINT = 'pip install "tinymrcnn[cuda]"'


def _import_numba_cuda():
    """numba.cuda, or a RuntimeError saying how to get it."""
    try:
        return importlib.import_module("numba.cuda")
    except ImportError as e:  # no numba-cuda and a numba without a CUDA target
        raise RuntimeError(
            f"the GPU path needs numba.cuda, which could not be imported ({e}). Install the CUDA extra: {INSTALL_HINT}"
        ) from None


def is_simulator() -> bool:
    """True when numba.cuda is the CUDA simulator (False without numba.cuda)."""
    try:
        _import_numba_cuda()
    except RuntimeError:
        return False
    try:
        from numba.cuda.core import config  # numba-cuda keeps its own copy
    except ImportError:
        from numba.core import config  # Numba's built-in target
    return bool(config.ENABLE_CUDASIM)


def require_cuda():
    """Return the numba.cuda module, ready to launch kernels.

    Raises one RuntimeError that names the problem and the fix when
    numba.cuda cannot be imported or when it finds no usable GPU and driver
    (the simulator counts as usable).
    """
    cuda = _import_numba_cuda()
    if is_simulator():
        return cuda
    try:
        ok = bool(cuda.is_available())
    except Exception as e:  # a broken driver install can raise here
        ok, why = False, str(e)
    else:
        why = ""
    if not ok:
        if not why:
            try:  # numba.cuda keeps the driver's initialisation error
                why = str(cuda.cuda_error() or "").strip()
            except Exception:
                why = ""
        why = " ".join(why.split()) or "numba.cuda.is_available() is False"
        raise RuntimeError(
            "the GPU path was asked for, but no usable NVIDIA GPU and CUDA driver "
            f"were found ({why}). Run on a machine with an NVIDIA GPU and driver "
            f"and the CUDA extra ({INSTALL_HINT}), or use the CPU path "
            "(NumPy arrays, the default)."
        )
    if not _nvvm_available():
        raise RuntimeError(
            "numba.cuda found a GPU but not libNVVM, the CUDA toolkit's compiler that turns "
            f"the kernels into GPU code. The CUDA extra brings it as wheels ({INSTALL_HINT}, "
            "which installs numba-cuda[cu12]; for a CUDA 13 driver: pip install "
            '"numba-cuda[cu13]"), or install a CUDA toolkit and point CUDA_HOME at it.'
        )
    problem = _numpy_support_problem()
    if problem:
        raise RuntimeError(
            f"numba.cuda cannot compile kernels with NumPy {np.__version__} ({problem}). "
            'Install a NumPy it supports: pip install "numpy<2.5" (the CUDA extra asks for it).'
        )
    _quiet_occupancy_warnings()
    return cuda


@functools.lru_cache(maxsize=1)
def _numpy_support_problem() -> str:
    """Why numba.cuda's NumPy support fails to load, or "" (asked once per process).

    numba-cuda loads it at the first kernel compile; a NumPy newer than it
    knows can break that (numba-cuda 0.30.4 with NumPy 2.5: "module 'numpy'
    has no attribute 'row_stack'"), deep inside the compiler. Loading it here
    turns that into require_cuda's one message.
    """
    try:
        importlib.import_module("numba.cuda.np.npyimpl")
    except ImportError:  # Numba's built-in target, or another layout: let the compiler report it
        return ""
    except AttributeError as e:
        return str(e)
    return ""


def _quiet_occupancy_warnings() -> None:
    """Turn off numba.cuda's low-occupancy warning, unless the environment sets it.

    The model launches small grids by design (a 2 x 2 pyramid level, 12
    RoIs of one image), and the warning comes once per launch: hundreds a
    training step. NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=1 brings it back.
    """
    if "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS" in os.environ:
        return
    for name in ("numba.cuda.core.config", "numba.core.config"):  # numba-cuda's copy, Numba's own
        config = sys.modules.get(name)
        if config is not None and hasattr(config, "CUDA_LOW_OCCUPANCY_WARNINGS"):
            config.CUDA_LOW_OCCUPANCY_WARNINGS = 0


@functools.lru_cache(maxsize=1)
def _nvvm_available() -> bool:
    """True when numba.cuda can load libNVVM (asked once per process; the simulator needs none).

    Without it the first kernel launch would fail deep inside numba's compiler
    (NvvmSupportError); checking here turns that into require_cuda's one message.
    """
    try:
        from numba.cuda.cudadrv import nvvm
    except ImportError:  # a layout we do not know: let the launch report it
        return True
    try:
        return bool(nvvm.is_available())
    except Exception:
        return False


def cuda_available() -> bool:
    """True when :func:`require_cuda` would succeed (the simulator included)."""
    try:
        require_cuda()
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def _device_array_api():
    """Silence numba-cuda's deprecation of its device-array API, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(to_device|device_array).* deprecated")
        yield


def is_cuda_array(obj) -> bool:
    """True for a GPU array (numba, CuPy, torch CUDA tensor, simulator array).

    Looks at attributes only, so it never imports numba.cuda: the CPU path
    calls it on every NumPy array to pick a kernel.
    """
    if isinstance(obj, np.ndarray):
        return False
    return hasattr(obj, "__cuda_array_interface__") or bool(getattr(obj, "__cuda_ndarray__", False))


def to_device(a):
    """Copy a NumPy array to the GPU (C-contiguous); a GPU array is returned as is.

    Arrays of other libraries with ``__cuda_array_interface__`` (CuPy, torch)
    are wrapped without a copy.
    """
    cuda = require_cuda()
    if is_cuda_array(a):
        if getattr(a, "__cuda_ndarray__", False):
            return a
        return cuda.as_cuda_array(a)
    with _device_array_api():
        return cuda.to_device(np.ascontiguousarray(a))


def to_host(d) -> np.ndarray:
    """Copy a GPU array back to a NumPy array (a NumPy array is returned as is)."""
    if isinstance(d, np.ndarray):
        return d
    return d.copy_to_host()


def empty(shape, dtype=np.float32):
    """An uninitialised C-contiguous GPU array, like ``np.empty``."""
    cuda = require_cuda()
    with _device_array_api():
        return cuda.device_array(shape, dtype=dtype)
