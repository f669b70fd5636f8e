"""Numba kernels behind tinymrcnn.ops: cpu/ (numba.njit) and cuda/ (numba.cuda)."""
