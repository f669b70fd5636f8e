"""numba.cuda kernels for RoIAlign forward and backward (docs/semantics.md#roialign).

Nothing here runs at import: ``numba.cuda`` is imported (through
``device.require_cuda``, which gives one clear error without a GPU), and the
kernels compiled, the first time a host wrapper is called (``_kernels``), so
the CPU path never touches CUDA. Under ``NUMBA_ENABLE_CUDASIM=1`` the same code runs
on Numba's CUDA simulator (how the tests check it without a GPU).

Shared math
-----------
The per-RoI geometry (:func:`roi_geometry`), the sample coordinate and the
bilinear taps are the Python functions behind the CPU kernels'
``@njit`` helpers (``tinymrcnn.kernels.cpu.roi_align``), compiled a second
time as CUDA device functions by :func:`_device`; the index arithmetic exists
once.

Thread / block mapping
----------------------
Both kernels use one thread per *output* element (k, c, ph, pw), numbered in
the C order of the (K, C, PH, PW) output, 256 threads per block (32 on the
simulator, which runs each thread in Python), and a grid-stride loop so any
K fits in a bounded grid. Consecutive threads of a
warp then handle neighbouring bins of one channel of one RoI: they read
neighbouring pixels of the same (N, C, H, W) channel plane, which the
GPU's caches serve well (torchvision's CUDA kernel makes the same choice;
the CPU's channels-last trick does not pay on a GPU, where the warp, not a
SIMD loop, runs across the elements).

* forward: each thread loops over its bin's grid_h x grid_w samples, adds (avg)
  or maxes (max) their bilinear values, writes one output.
* backward: each thread takes dy of its bin and adds dy * w / count (avg) to
  the four taps of every sample, or dy * w to the four taps of the winning
  sample (max, recomputed from x as the forward). Different bins and RoIs
  share taps, so the adds are ``cuda.atomic.add``. The gradient starts as
  zeros, written by a 1-D kernel over the flat array.

Host wrappers (operate on numba device arrays; the ops' device path)
--------------------------------------------------------------------
    roi_align_forward_cuda(x_dev, rois_dev, output_size, spatial_scale=1.0,
                           sampling_ratio=-1, aligned=False, mode="avg") -> (K, C, ph, pw) device array
    roi_align_backward_cuda(dy_dev, rois_dev, input_shape, spatial_scale=1.0,
                            sampling_ratio=-1, aligned=False, mode="avg", x_dev=None) -> (N, C, H, W) device array
"""

from __future__ import annotations

import functools
import types

import numpy as np

from .device import empty, is_simulator, require_cuda, to_device

THREADS_PER_BLOCK = 256
SIMULATOR_THREADS_PER_BLOCK = 32  # the simulator runs each thread in Python: fewer idle ones
MAX_BLOCKS = 65535

# numba.cuda, set by _kernels() on first use. A module global, not a local, because
# the CUDA simulator swaps the ``cuda`` a kernel sees by patching its globals.
cuda = None


def _device(cuda, fn, **replace):
    """Compile the Python source of a CPU ``@njit`` helper as a CUDA device function.

    ``replace`` swaps the helpers ``fn`` itself calls (CPU dispatchers in its
    module's globals) for their device versions.
    """
    py = fn.py_func
    glb = dict(py.__globals__)
    glb.update(replace)
    f = types.FunctionType(py.__code__, glb, py.__name__, py.__defaults__, py.__closure__)
    return cuda.jit(device=True)(f)


@functools.lru_cache(maxsize=None)
def _kernels(dtype: str):
    """Import numba.cuda and build the kernels for one float dtype (once per process).

    Geometry and weights are float64, as on the CPU; ``cast`` brings the
    weights to the map's dtype so a float32 map is interpolated and summed in
    float32 (fast on every GPU, and the CPU kernel's arithmetic).
    """
    global cuda
    cuda = require_cuda()
    cast = np.dtype(dtype).type  # np.float32 or np.float64

    from ..cpu import roi_align as cpu

    geometry = _device(cuda, cpu.roi_geometry)
    coord = _device(cuda, cpu.sample_coordinate)
    linear = _device(cuda, cpu.linear_taps)
    bilinear = _device(cuda, cpu.bilinear_taps, linear_taps=linear)

    @cuda.jit(device=True)
    def sample_value(x, b, c, yy, xx, H, W):
        """Bilinear value of channel c at (yy, xx); 0 outside the map. Weights in x's dtype."""
        valid, y0, x0, y1, x1, w1, w2, w3, w4 = bilinear(yy, xx, H, W)
        if not valid:
            return cast(0.0)
        return (
            cast(w1) * x[b, c, y0, x0]
            + cast(w2) * x[b, c, y0, x1]
            + cast(w3) * x[b, c, y1, x0]
            + cast(w4) * x[b, c, y1, x1]
        )

    @cuda.jit
    def forward(x, rois, spatial_scale, sampling_ratio, aligned, use_max, out):
        K, C, PH, PW = out.shape
        H = x.shape[2]
        W = x.shape[3]
        for i in range(cuda.grid(1), K * C * PH * PW, cuda.gridsize(1)):  # grid-stride loop
            pw = i % PW
            ph = (i // PW) % PH
            c = (i // (PW * PH)) % C
            k = i // (PW * PH * C)
            b = int(rois[k, 0])
            start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = geometry(
                rois[k, 1], rois[k, 2], rois[k, 3], rois[k, 4], spatial_scale, PH, PW, sampling_ratio, aligned
            )
            acc = cast(0.0)
            for iy in range(grid_h):
                yy = coord(start_h, ph, bin_h, iy, grid_h)
                for ix in range(grid_w):
                    v = sample_value(x, b, c, yy, coord(start_w, pw, bin_w, ix, grid_w), H, W)
                    if not use_max:
                        acc += v
                    elif (iy == 0 and ix == 0) or v > acc:
                        acc = v
            if not use_max:
                acc /= cast(count)
            out[k, c, ph, pw] = acc

    @cuda.jit
    def backward(dy, rois, x, spatial_scale, sampling_ratio, aligned, use_max, dx):
        K, C, PH, PW = dy.shape
        H = dx.shape[2]
        W = dx.shape[3]
        for i in range(cuda.grid(1), K * C * PH * PW, cuda.gridsize(1)):
            pw = i % PW
            ph = (i // PW) % PH
            c = (i // (PW * PH)) % C
            k = i // (PW * PH * C)
            b = int(rois[k, 0])
            start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = geometry(
                rois[k, 1], rois[k, 2], rois[k, 3], rois[k, 4], spatial_scale, PH, PW, sampling_ratio, aligned
            )
            g = dy[k, c, ph, pw] * 1.0  # float64, as the weights
            s_lo = 0
            s_hi = grid_h * grid_w
            if use_max:  # find the winning sample; only its taps get gradient
                best = cast(0.0)
                for s in range(grid_h * grid_w):
                    v = sample_value(
                        x,
                        b,
                        c,
                        coord(start_h, ph, bin_h, s // grid_w, grid_h),
                        coord(start_w, pw, bin_w, s % grid_w, grid_w),
                        H,
                        W,
                    )
                    if s == 0 or v > best:
                        best = v
                        s_lo = s
                s_hi = min(s_lo + 1, grid_h * grid_w)
            else:
                g = g / count
            for s in range(s_lo, s_hi):
                valid, y0, x0, y1, x1, w1, w2, w3, w4 = bilinear(
                    coord(start_h, ph, bin_h, s // grid_w, grid_h), coord(start_w, pw, bin_w, s % grid_w, grid_w), H, W
                )
                if valid:
                    cuda.atomic.add(dx, (b, c, y0, x0), cast(g * w1))
                    cuda.atomic.add(dx, (b, c, y0, x1), cast(g * w2))
                    cuda.atomic.add(dx, (b, c, y1, x0), cast(g * w3))
                    cuda.atomic.add(dx, (b, c, y1, x1), cast(g * w4))

    @cuda.jit
    def fill_zero(flat):
        for i in range(cuda.grid(1), flat.size, cuda.gridsize(1)):
            flat[i] = 0

    return cuda, forward, backward, fill_zero


def _launch(n):
    """(blocks, threads) for n elements, grid-stride beyond MAX_BLOCKS blocks."""
    threads = SIMULATOR_THREADS_PER_BLOCK if is_simulator() else THREADS_PER_BLOCK
    blocks = max(1, min(MAX_BLOCKS, (n + threads - 1) // threads))
    return blocks, threads


def _rois_device(rois, num_images):
    """NumPy rois are checked (tinymrcnn.checks.check_rois) and copied; device rois are trusted."""
    if isinstance(rois, np.ndarray):
        from ...checks import check_rois

        return to_device(check_rois(rois, num_images))
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must have shape (K, 5), got {rois.shape}")
    return rois


def _check(output_size, mode, shape):
    from ...checks import pair

    ph, pw = pair(output_size, "output_size")
    if ph < 1 or pw < 1:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    if mode not in ("avg", "max"):
        raise ValueError(f'mode must be "avg" or "max", got {mode!r}')
    if len(shape) != 4 or shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"feature map must be (N, C, H, W) with H, W >= 1, got {tuple(shape)}")
    return ph, pw


def roi_align_forward_cuda(
    x_dev, rois_dev, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, mode="avg"
):
    """RoIAlign forward on the GPU.

    Args:
        x_dev: (N, C, H, W) float32/float64 numba device array (finite; not checked here).
        rois_dev: (K, 5) device array of already validated RoIs, or a NumPy
            array (validated, then copied).
        output_size, spatial_scale, sampling_ratio, aligned, mode: as
            ``tinymrcnn.ops.roi_align``.

    Returns:
        (K, C, ph, pw) device array of x's dtype.
    """
    _, forward, _, _ = _kernels(np.dtype(x_dev.dtype).name)
    ph, pw = _check(output_size, mode, x_dev.shape)
    rois_dev = _rois_device(rois_dev, x_dev.shape[0])
    K, C = rois_dev.shape[0], x_dev.shape[1]
    out = empty((K, C, ph, pw), x_dev.dtype)
    n = K * C * ph * pw
    if n:
        forward[_launch(n)](
            x_dev, rois_dev, float(spatial_scale), int(sampling_ratio), bool(aligned), mode == "max", out
        )
    return out


def roi_align_backward_cuda(
    dy_dev, rois_dev, input_shape, spatial_scale=1.0, sampling_ratio=-1, aligned=False, mode="avg", x_dev=None
):
    """RoIAlign backward on the GPU (atomic adds into dx).

    Args:
        dy_dev: (K, C, ph, pw) device array, the output gradient.
        rois_dev: as in :func:`roi_align_forward_cuda`.
        input_shape: (N, C, H, W).
        x_dev: the forward's input, required for mode="max".

    Returns:
        (N, C, H, W) device array of dy's dtype.
    """
    _, _, backward, fill_zero = _kernels(np.dtype(dy_dev.dtype).name)
    shape = tuple(int(s) for s in input_shape)
    _check(dy_dev.shape[2:], mode, shape)
    rois_dev = _rois_device(rois_dev, shape[0])
    if mode == "max":
        if x_dev is None:
            raise ValueError('mode="max" needs x_dev, the forward input')
        if tuple(x_dev.shape) != shape:
            raise ValueError(f"x_dev has shape {tuple(x_dev.shape)}, expected {shape}")
    else:
        x_dev = dy_dev  # unused by the avg path; any array of the dtype
    if tuple(dy_dev.shape[:2]) != (rois_dev.shape[0], shape[1]):
        raise ValueError(
            f"dy has shape {tuple(dy_dev.shape)}, expected (K, C, ph, pw) with K = {rois_dev.shape[0]}, C = {shape[1]}"
        )
    dx = empty(shape, dy_dev.dtype)
    if dx.size:
        fill_zero[_launch(dx.size)](dx.reshape(dx.size))  # flat: no index arithmetic per element
    if dy_dev.size:
        backward[_launch(dy_dev.size)](
            dy_dev, rois_dev, x_dev, float(spatial_scale), int(sampling_ratio), bool(aligned), mode == "max", dx
        )
    return dx
