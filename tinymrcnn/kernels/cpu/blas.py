"""Direct BLAS ``gemm`` calls for the convolution kernels.

Why not ``numpy.matmul``
------------------------
The convolution (``tinymrcnn/kernels/cpu/conv.py``) multiplies the weights by
*shifted windows* of one padded input buffer: row ``c`` of the right-hand
matrix starts ``shift`` elements into channel ``c``'s row, and the rows are a
fixed stride apart. BLAS takes such a matrix as it is (a leading dimension
``ld`` larger than the row length), and ``gemm`` can add into its output
(``beta = 1``), so the nine taps of a 3x3 kernel are nine ``gemm`` calls
accumulating into one output with no copy at all. ``numpy.matmul`` can neither
accumulate nor always avoid copying such views, so we call BLAS ourselves,
through the function pointers SciPy exports in ``scipy.linalg.cython_blas``.

Which BLAS
----------
SciPy's OpenBLAS (not NumPy's copy; both are OpenBLAS builds). Its speed is
set by the kernels OpenBLAS picks for the CPU; the environment variable
``OPENBLAS_CORETYPE`` overrides that choice. (On the development machine, an
AMD Zen 5 with 2 cores, the environment pins ``OPENBLAS_CORETYPE=Haswell``:
AVX2 kernels, ~240 GFLOP/s float32; OpenBLAS left to itself picks its
AVX-512 "SkylakeX" kernels there, ~420 GFLOP/s. We leave the variable alone.)
"""

from __future__ import annotations

import ctypes

import numpy as np


def _gemm_pointer(capi, name: str):
    capsule = capi[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
    get_ptr.restype, get_ptr.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    addr = get_ptr(capsule, get_name(capsule))
    vp = ctypes.c_void_p
    # Fortran gemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc): all by pointer.
    return ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp)(addr)


_BLAS = None


def _blas():
    global _BLAS
    if _BLAS is None:
        from scipy.linalg import cython_blas

        capi = cython_blas.__pyx_capi__
        _BLAS = {
            np.dtype(np.float32): (_gemm_pointer(capi, "sgemm"), ctypes.c_float),
            np.dtype(np.float64): (_gemm_pointer(capi, "dgemm"), ctypes.c_double),
        }
    return _BLAS


def _ld(a: np.ndarray, name: str) -> int:
    """Leading dimension of a row-major 2-D view (rows any stride apart, unit stride along a row)."""
    if a.ndim != 2:
        raise ValueError(f"gemm: {name} must be 2-D, got shape {a.shape}")
    rows, cols = a.shape
    if (cols > 1 and a.strides[1] != a.itemsize) or (rows > 1 and a.strides[0] % a.itemsize):
        raise ValueError(f"gemm: {name} must be a 2-D view with contiguous rows, strides {a.strides}")
    return max(a.strides[0] // a.itemsize if rows > 1 else cols, cols, 1)


def gemm(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    *,
    trans_a: bool = False,
    trans_b: bool = False,
    alpha: float = 1.0,
    beta: float = 0.0,
) -> np.ndarray:
    """``c = alpha * op(a) @ op(b) + beta * c`` in place, row-major, op = transpose if asked.

    ``a``, ``b``, ``c`` are 2-D views of one dtype (float32 or float64) whose
    rows are contiguous but may lie any stride apart (``c`` must not overlap
    ``a`` or ``b``). With ``beta = 0`` the old contents of ``c`` are ignored.
    Returns ``c``.
    """
    fn, scalar = _blas()[c.dtype]
    if a.dtype != c.dtype or b.dtype != c.dtype:
        raise ValueError(f"gemm: dtypes differ ({a.dtype}, {b.dtype}, {c.dtype})")
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    am, ak = (a.shape[1], a.shape[0]) if trans_a else a.shape
    bk, bn = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if (am, ak, bk, bn) != (m, k, k, n):
        raise ValueError(
            f"gemm: shapes {a.shape}{'^T' if trans_a else ''} @ "
            f"{b.shape}{'^T' if trans_b else ''} -> {c.shape} do not match"
        )
    if m == 0 or n == 0:
        return c
    if k == 0:
        c *= beta
        return c
    lda, ldb, ldc = _ld(a, "a"), _ld(b, "b"), _ld(c, "c")
    if max(m, n, k, lda, ldb, ldc) >= 2**31:
        raise ValueError("gemm: a dimension exceeds the 32-bit BLAS interface")
    i = ctypes.c_int
    # Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    fn(
        b"T" if trans_b else b"N",
        b"T" if trans_a else b"N",
        ctypes.byref(i(n)),
        ctypes.byref(i(m)),
        ctypes.byref(i(k)),
        ctypes.byref(scalar(alpha)),
        ctypes.c_void_p(b.ctypes.data),
        ctypes.byref(i(ldb)),
        ctypes.c_void_p(a.ctypes.data),
        ctypes.byref(i(lda)),
        ctypes.byref(scalar(beta)),
        ctypes.c_void_p(c.ctypes.data),
        ctypes.byref(i(ldc)),
    )
    return c
