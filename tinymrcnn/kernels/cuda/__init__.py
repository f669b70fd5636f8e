"""numba.cuda kernels. Imported lazily: nothing here is loaded unless the GPU path is asked for."""
