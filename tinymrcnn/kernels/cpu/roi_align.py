"""Numba CPU kernels for RoIAlign (docs/semantics.md#roialign), forward and backward.

The readable reference lives in ``tinymrcnn/ops/roi_align.py``; these kernels
compute the same numbers and are tested against it.

Layout: channels last
---------------------
The hot loop of RoIAlign is a gather: every sampling point reads four feature
vectors (its bilinear taps) and adds them with four weights. The weights depend
only on the RoI and the bin, never on the channel, so the natural inner loop
runs over channels. With the feature map stored (N, H, W, C) ("NHWC",
channels last), the C values of one tap are contiguous and that loop is a
vectorised multiply-add over one cache-friendly row; in PyTorch's (N, C, H, W)
each channel of a tap sits in a different plane and every read is a cache miss.
On the development machine the NHWC gather was about 8x faster, so:

* the forward kernel reads an NHWC map (``channels_last``
  converts a map once, with NumPy's transpose copy, so the box and the mask
  pooler can share one conversion) and writes PyTorch's (K, C, ph, pw);
* the backward accumulates NHWC in small per-task buffers and writes the
  (N, C, H, W) gradient the layers upstream expect.

Shared per-sample math
----------------------
:func:`roi_geometry` (where a RoI's bins and sampling grid are),
:func:`sample_coordinate`, :func:`linear_taps` (one axis of bilinear
interpolation) and :func:`bilinear_taps` (the four pixels one sample reads,
with their weights) hold all the index arithmetic. The CPU kernels call them;
the numba.cuda kernels compile the very same Python functions (``.py_func``)
as device functions. :func:`bin_axis_weights` uses the separability of
bilinear weights to gather each distinct pixel of a bin once (avg mode).

Parallelism
-----------
* forward: ``prange`` over RoIs; each RoI writes only its own output slice.
* backward: ``prange`` over horizontal stripes of the map. Several RoIs (and
  the taps of neighbouring samples) add into the same pixel, so splitting the
  work by RoI would race; each stripe task owns its rows and adds only the
  contributions that land in them, so no two threads write one element.
"""

from __future__ import annotations

import math

import numpy as np
from numba import get_num_threads, get_thread_id, njit, prange


class ChannelsLast:
    """A feature map stored (N, H, W, C), made once by :func:`channels_last`.

    The kernels below gather along channels, so they read this layout.
    ``shape`` still reads (N, C, H, W), the shape of the map it stands for.
    """

    __slots__ = ("data",)

    def __init__(self, data: np.ndarray):
        self.data = data  # (N, H, W, C)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, h, w, c = self.data.shape
        return n, c, h, w

    @property
    def dtype(self):
        return self.data.dtype

    def __repr__(self) -> str:
        return f"ChannelsLast(shape(NCHW)={self.shape}, dtype={self.dtype})"


def channels_last(x) -> ChannelsLast:
    """(N, C, H, W) array -> :class:`ChannelsLast` (returned as it is if it already is one).

    The copy costs about as much as one RoIAlign forward of 512 RoIs on an
    800x800 image's pyramid (benchmarks/bench_roi.py): make it once per level.
    """
    if isinstance(x, ChannelsLast):
        return x
    return ChannelsLast(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))


@njit(cache=True)
def roi_geometry(x1, y1, x2, y2, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    """Where one RoI's bins and sampling points lie (docs/semantics.md#roialign, "Geometry").

    Args:
        x1, y1, x2, y2: the box in input-image pixels (may be NaN).
        spatial_scale: feature-map cells per input pixel (1 / stride).
        pooled_h, pooled_w: output size.
        sampling_ratio: points per bin side; <= 0 means adaptive,
            ceil(roi_size / pooled_size).
        aligned: shift by half a pixel (pixel centres at +0.5).

    Returns:
        (start_h, start_w, bin_h, bin_w, grid_h, grid_w, count): the RoI's
        top-left corner and bin size in feature-map coordinates, the sampling
        grid per bin, and the divisor of the average, max(grid_h * grid_w, 1).
        A grid that is not a finite positive number (NaN box, zero-size or
        inverted box in adaptive mode) is 0: the bin samples nothing.
    """
    offset = 0.5 if aligned else 0.0
    start_w = x1 * spatial_scale - offset
    start_h = y1 * spatial_scale - offset
    roi_w = x2 * spatial_scale - offset - start_w
    roi_h = y2 * spatial_scale - offset - start_h
    if not aligned:
        # Legacy behaviour: force malformed RoIs to be 1x1 (as C++ std::max, NaN stays NaN).
        if roi_w < 1.0:
            roi_w = 1.0
        if roi_h < 1.0:
            roi_h = 1.0
    bin_h = roi_h / pooled_h
    bin_w = roi_w / pooled_w
    if sampling_ratio > 0:
        grid_h = sampling_ratio
        grid_w = sampling_ratio
    else:
        gh = roi_h / pooled_h
        gw = roi_w / pooled_w
        grid_h = int(math.ceil(gh)) if gh > 0.0 and gh < 2.0**31 else 0  # False for NaN
        grid_w = int(math.ceil(gw)) if gw > 0.0 and gw < 2.0**31 else 0
    count = max(grid_h * grid_w, 1)
    return start_h, start_w, bin_h, bin_w, grid_h, grid_w, count


@njit(cache=True)
def sample_coordinate(start, p, bin_size, i, grid):
    """Coordinate of sampling point ``i`` of bin ``p`` along one axis: the centres of
    ``grid`` equal sub-cells, start + p * bin + (i + 0.5) * bin / grid."""
    return start + p * bin_size + (i + 0.5) * bin_size / grid


@njit(cache=True)
def linear_taps(v, size):
    """One axis of bilinear interpolation (y; x is the same), docs/semantics.md#roialign.

    Returns:
        (valid, low, high, w_low, w_high): the coordinate ``v`` reads pixels
        ``low`` and ``high`` with weights 1 - l and l. ``valid`` is False for
        v < -1 or v > size and for NaN (every comparison with NaN is False).
    """
    if not (v >= -1.0 and v <= size):
        return False, 0, 0, 0.0, 0.0
    if v <= 0.0:
        v = 0.0
    low = int(v)
    if low >= size - 1:
        low = size - 1
        high = size - 1
        v = float(low)
    else:
        high = low + 1
    frac = v - low
    return True, low, high, 1.0 - frac, frac


@njit(cache=True)
def bilinear_taps(y, x, height, width):
    """The four pixels a sample at (y, x) reads, and their weights.

    Bilinear interpolation is separable: the weights are products of the two
    axes' linear weights, and a sample out of range on either axis
    contributes 0 (but still counts in the average).

    Returns:
        (valid, y_low, x_low, y_high, x_high, w1, w2, w3, w4): the value is
        w1 f[y_low, x_low] + w2 f[y_low, x_high] + w3 f[y_high, x_low]
        + w4 f[y_high, x_high]; all weights 0 when not valid.
    """
    vy, y_low, y_high, hy, ly = linear_taps(y, height)
    vx, x_low, x_high, hx, lx = linear_taps(x, width)
    if not (vy and vx):
        return False, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0
    return True, y_low, x_low, y_high, x_high, hy * hx, hy * lx, ly * hx, ly * lx


@njit(cache=True)
def bin_axis_weights(start, p, bin_size, grid, size, idx, wts):
    """Pixels along one axis that bin ``p`` reads, each with its summed weight.

    The samples of a bin form a grid_h x grid_w product grid and bilinear
    weights are products, so the average over the bin is
        sum_r sum_c  A_y[r] A_x[c] f[r, c] / count,
    with A_y[r] the sum over the bin's sample rows of their linear weights on
    pixel row r (likewise A_x). Neighbouring samples can share pixel rows,
    and this reads each distinct row once: with 2x2 samples, 16 channel
    vectors per bin (4 samples x 4 taps) shrink to 9 or fewer when the bin
    is at most 2 cells on a side; larger bins can still read 16
    (docs/derivations/roi_align.md).

    Args:
        idx, wts: output buffers of length >= 2 * grid (int64, float64).

    Returns:
        n: how many (idx[i], wts[i]) pairs were filled, distinct pixels.
    """
    n = 0
    for i in range(grid):
        valid, low, high, w_low, w_high = linear_taps(sample_coordinate(start, p, bin_size, i, grid), size)
        if not valid:
            continue
        for pix, wt in ((low, w_low), (high, w_high)):
            j = n - 1
            while j >= 0 and idx[j] != pix:  # coordinates increase with i: a repeat is recent
                j -= 1
            if j >= 0:
                wts[j] += wt
            else:
                idx[n] = pix
                wts[n] = wt
                n += 1
    return n


def roi_align_forward_nhwc(maps, levels, scales, rois, pooled_h, pooled_w, sampling_ratio, aligned, use_max):
    """RoIAlign forward on channels-last maps, several maps (an FPN pyramid) in one pass.

    Args:
        maps: tuple of (N, H_l, W_l, C) float32/float64 C-contiguous arrays,
            one dtype; a single map is a 1-tuple.
        levels: (K,) int64, the map each RoI is pooled from (index into maps).
        scales: (L,) float64, each map's spatial_scale.
        rois: (K, 5) float64 [batch_index, x1, y1, x2, y2]; batch indices
            already validated (integers in [0, N)).
        use_max: False: average of the samples (torchvision); True: their maximum.

    Returns:
        (K, C, pooled_h, pooled_w) in RoI order, the maps' dtype (PyTorch
        layout, as the heads want). One parallel loop over all RoIs, whatever
        their level, balances the threads better than a loop per level.
    """
    # Large arrays are allocated here, by NumPy, not inside the kernel: NumPy asks
    # Linux for transparent huge pages, Numba's allocator does not, and faulting in
    # 25 MB of 4 KB pages cost more than the whole gather on the development machine.
    K, C = rois.shape[0], maps[0].shape[3]
    out = np.zeros((K, C, pooled_h * pooled_w), dtype=maps[0].dtype)
    _forward_kernel(tuple(maps), levels, scales, rois, pooled_h, pooled_w, sampling_ratio, aligned, use_max, out)
    return out.reshape(K, C, pooled_h, pooled_w)


@njit(parallel=True, cache=True)
def _forward_kernel(maps, levels, scales, rois, pooled_h, pooled_w, sampling_ratio, aligned, use_max, out):
    """Fills out (K, C, pooled_h * pooled_w), zeros on entry; see roi_align_forward_nhwc."""
    for k in prange(rois.shape[0]):
        lvl = levels[k]
        _pool_roi(
            maps[lvl][int(rois[k, 0])],
            rois[k],
            scales[lvl],
            pooled_h,
            pooled_w,
            sampling_ratio,
            aligned,
            use_max,
            out[k],
        )


@njit(cache=True)
def _pool_roi(feat, roi, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, use_max, out):
    """One RoI: feat (H, W, C) its image's map, out (C, pooled_h * pooled_w)."""
    H, W, C = feat.shape
    n_bins = pooled_h * pooled_w
    start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = roi_geometry(
        roi[1], roi[2], roi[3], roi[4], spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned
    )
    if grid_h * grid_w == 0:
        return  # no sampling point: the output stays 0
    acc = np.zeros((n_bins, C), dtype=feat.dtype)  # this RoI's bins, channels last
    if use_max:
        _max_bins(acc, feat, start_h, start_w, bin_h, bin_w, grid_h, grid_w, pooled_h, pooled_w)
    else:
        pix = feat.reshape(H * W, C)  # one row of C values per pixel
        wt = np.empty(1, dtype=feat.dtype)  # a weight in x's dtype: float32 SIMD stays float32
        rows = np.empty(2 * grid_h, dtype=np.int64)
        row_w = np.empty(2 * grid_h, dtype=np.float64)
        cols = np.empty((pooled_w, 2 * grid_w), dtype=np.int64)
        col_w = np.empty((pooled_w, 2 * grid_w), dtype=np.float64)
        n_cols = np.empty(pooled_w, dtype=np.int64)
        for pw in range(pooled_w):
            n_cols[pw] = bin_axis_weights(start_w, pw, bin_w, grid_w, W, cols[pw], col_w[pw])
        for ph in range(pooled_h):
            n_rows = bin_axis_weights(start_h, ph, bin_h, grid_h, H, rows, row_w)
            for pw in range(pooled_w):
                a = acc[ph * pooled_w + pw]
                # sum over the bin's distinct pixels of A_y[r] A_x[c] f[r, c], / count
                for i in range(n_rows):
                    base = rows[i] * W
                    for j in range(n_cols[pw]):
                        wt[0] = row_w[i] * col_w[pw, j] / count
                        f = pix[base + cols[pw, j]]  # (C,) contiguous: the channel gather
                        for c in range(C):
                            a[c] += wt[0] * f[c]
    for c in range(C):  # (bins, C) -> (C, bins), in cache
        for i in range(n_bins):
            out[c, i] = acc[i, c]


@njit(cache=True)
def _max_bins(acc, feat, start_h, start_w, bin_h, bin_w, grid_h, grid_w, pooled_h, pooled_w):
    """acc[bin] = max over the bin's samples of their interpolated values (mode="max").

    feat: (H, W, C) one image; acc: (pooled_h * pooled_w, C). A sample out of
    range has the value 0, a candidate like any other.
    """
    H, W, _ = feat.shape
    for ph in range(pooled_h):
        for pw in range(pooled_w):
            a = acc[ph * pooled_w + pw]
            a[:] = -np.inf
            for iy in range(grid_h):
                yy = sample_coordinate(start_h, ph, bin_h, iy, grid_h)
                for ix in range(grid_w):
                    xx = sample_coordinate(start_w, pw, bin_w, ix, grid_w)
                    valid, y0, x0, y1, x1, w1, w2, w3, w4 = bilinear_taps(yy, xx, H, W)
                    if valid:
                        _max_sample(a, feat[y0, x0], feat[y0, x1], feat[y1, x0], feat[y1, x1], w1, w2, w3, w4)
                    else:
                        for c in range(a.shape[0]):
                            if a[c] < 0.0:
                                a[c] = 0.0


@njit(cache=True)
def _max_sample(acc, f1, f2, f3, f4, w1, w2, w3, w4):
    """acc = max(acc, w1 f1 + w2 f2 + w3 f3 + w4 f4), channel by channel."""
    w = np.empty(4, dtype=acc.dtype)
    w[0] = w1
    w[1] = w2
    w[2] = w3
    w[3] = w4
    for c in range(acc.shape[0]):
        v = w[0] * f1[c] + w[1] * f2[c] + w[2] * f3[c] + w[3] * f4[c]
        if v > acc[c]:
            acc[c] = v


def roi_align_backward_stripes(
    dy, rois, index, x, batch, height, width, spatial_scale, sampling_ratio, aligned, use_max, stripe=8
):
    """RoIAlign backward of the RoIs ``index`` of one map: dx (N, C, H, W) from dy (K, C, PH, PW).

    avg: every output gradient, times weight / count, is added to the four taps
    of every sample of its bin (gathered per distinct pixel, as the forward).
    max: only the taps of the bin's winning sample (first maximum in row-major
    sample order) receive dy * weight, channel by channel.

    Race-free parallelism: the map is cut into horizontal stripes of
    ``stripe`` rows, one task per (image, stripe). A task visits every RoI
    that touches its rows and adds only the contributions that land in them,
    so no two tasks write the same pixel. It accumulates channels last in a
    small (stripe, W, C) buffer (contiguous C-wide vector adds, as the
    forward's gather) and finally writes that buffer, transposed, into its
    rows of the (N, C, H, W) result: the layout change is done once, in
    parallel, in cache.

    Args:
        dy: (K, C, PH, PW) gradient of the output.
        rois: (K, 5) float64, validated.
        index: (K_l,) int64, the RoIs (rows of dy and rois) pooled from this
            map; the others are skipped (the FPN pooler's other levels).
        x: (N, H, W, C) the forward input, needed by max (any array for avg).
        batch, height, width: N, H, W of the input.
        stripe: rows per task.

    Returns:
        dx: (N, C, H, W), dy's dtype.
    """
    K, C, PH, PW = dy.shape
    # NumPy allocates the large arrays (huge pages; see roi_align_forward_nhwc)
    dyt = np.empty((len(index), PH * PW, C), dtype=dy.dtype)  # dy[index] channels last
    # one (stripe, W, C) accumulator per thread, reused by all the tasks a thread runs
    scratch = np.empty((get_num_threads(), stripe, width, C), dtype=dy.dtype)
    dx = np.empty((batch, C, height, width), dtype=dy.dtype)
    _backward_kernel(dy, rois, index, x, spatial_scale, sampling_ratio, aligned, use_max, dyt, scratch, dx)
    return dx


@njit(parallel=True, cache=True)
def _backward_kernel(dy, rois, index, x, spatial_scale, sampling_ratio, aligned, use_max, dyt, scratch, dx):
    """Fills dx (N, C, H, W); see roi_align_backward_stripes. RoI j of this map is index[j]."""
    _, C, PH, PW = dy.shape
    K = index.shape[0]
    batch, _, height, width = dx.shape
    stripe = scratch.shape[1]
    n_bins = PH * PW
    dy3 = dy.reshape(dy.shape[0], C, n_bins)
    # the rows each RoI's samples read: [row_lo, row_hi], empty when row_lo > row_hi
    row_lo = np.empty(K, dtype=np.int64)
    row_hi = np.empty(K, dtype=np.int64)
    for j in prange(K):
        k = index[j]
        for c in range(C):  # dy channels last, so each bin's gradient is one contiguous vector
            for i in range(n_bins):
                dyt[j, i, c] = dy3[k, c, i]
        start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = roi_geometry(
            rois[k, 1], rois[k, 2], rois[k, 3], rois[k, 4], spatial_scale, PH, PW, sampling_ratio, aligned
        )
        lo = height
        hi = -1
        if grid_w > 0:
            for ph in range(PH):
                for iy in range(grid_h):
                    valid, low, high, w_low, w_high = linear_taps(
                        sample_coordinate(start_h, ph, bin_h, iy, grid_h), height
                    )
                    if valid:
                        lo = min(lo, low)
                        hi = max(hi, high)
        row_lo[j] = lo
        row_hi[j] = hi

    n_stripes = (height + stripe - 1) // stripe
    for t in prange(batch * n_stripes):
        b = t // n_stripes
        r0 = (t % n_stripes) * stripe
        r1 = min(height, r0 + stripe)
        buf = scratch[get_thread_id(), : r1 - r0]  # this task's rows, channels last
        buf[:] = 0.0
        wt = np.empty(1, dtype=dy.dtype)
        for j in range(K):
            k = index[j]
            if int(rois[k, 0]) != b or row_hi[j] < r0 or row_lo[j] >= r1:
                continue  # the RoI reads none of these rows
            start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = roi_geometry(
                rois[k, 1], rois[k, 2], rois[k, 3], rois[k, 4], spatial_scale, PH, PW, sampling_ratio, aligned
            )
            if use_max:
                _max_backward_rows(buf, r0, x[b], dyt[j], start_h, start_w, bin_h, bin_w, grid_h, grid_w, PH, PW)
                continue
            rows = np.empty(2 * grid_h, dtype=np.int64)
            row_w = np.empty(2 * grid_h, dtype=np.float64)
            cols = np.empty(2 * grid_w, dtype=np.int64)
            col_w = np.empty(2 * grid_w, dtype=np.float64)
            for ph in range(PH):
                n_rows = bin_axis_weights(start_h, ph, bin_h, grid_h, height, rows, row_w)
                for pw in range(PW):
                    n_cols = 0
                    g = dyt[j, ph * PW + pw]  # (C,)
                    for i in range(n_rows):
                        r = rows[i]
                        if r < r0 or r >= r1:
                            continue
                        if n_cols == 0:
                            n_cols = bin_axis_weights(start_w, pw, bin_w, grid_w, width, cols, col_w)
                        for q in range(n_cols):
                            # d out[bin] / d f[r, c] = A_y[r] A_x[c] / count
                            wt[0] = row_w[i] * col_w[q] / count
                            d = buf[r - r0, cols[q]]
                            for c in range(C):
                                d[c] += wt[0] * g[c]
        for r in range(r1 - r0):  # (rows, W, C) -> (C, rows, W)
            for w in range(width):
                for c in range(C):
                    dx[b, c, r0 + r, w] = buf[r, w, c]


@njit(cache=True)
def _max_backward_rows(buf, r0, feat, g, start_h, start_w, bin_h, bin_w, grid_h, grid_w, pooled_h, pooled_w):
    """mode="max" backward of one RoI, restricted to rows [r0, r0 + len(buf)).

    For every bin, recompute the samples' values (as the forward), find each
    channel's first maximum, and add g * weight to that sample's taps that
    fall in these rows.

    Args:
        buf: (rows, W, C) gradient accumulator of the stripe.
        feat: (H, W, C) the forward input of the RoI's image.
        g: (pooled_h * pooled_w, C) the RoI's output gradient, channels last.
    """
    H, W, C = feat.shape
    r1 = r0 + buf.shape[0]
    n_s = grid_h * grid_w
    best = np.empty(C, dtype=buf.dtype)
    best_s = np.zeros(C, dtype=np.int64)
    v = np.empty(C, dtype=buf.dtype)
    for ph in range(pooled_h):
        for pw in range(pooled_w):
            touches = False
            for s in range(n_s):  # does any sample of the bin read these rows?
                valid, y0, x0, y1, x1, w1, w2, w3, w4 = bilinear_taps(
                    sample_coordinate(start_h, ph, bin_h, s // grid_w, grid_h),
                    sample_coordinate(start_w, pw, bin_w, s % grid_w, grid_w),
                    H,
                    W,
                )
                if valid and y1 >= r0 and y0 < r1:
                    touches = True
            if not touches:
                continue
            for s in range(n_s):
                valid, y0, x0, y1, x1, w1, w2, w3, w4 = bilinear_taps(
                    sample_coordinate(start_h, ph, bin_h, s // grid_w, grid_h),
                    sample_coordinate(start_w, pw, bin_w, s % grid_w, grid_w),
                    H,
                    W,
                )
                # v = this sample's values, exactly as the forward computes them
                v[:] = -np.inf if valid else 0.0
                if valid:
                    _max_sample(v, feat[y0, x0], feat[y0, x1], feat[y1, x0], feat[y1, x1], w1, w2, w3, w4)
                for c in range(C):
                    if s == 0 or v[c] > best[c]:
                        best[c] = v[c]
                        best_s[c] = s
            gb = g[ph * pooled_w + pw]
            for c in range(C):
                s = best_s[c]
                valid, y0, x0, y1, x1, w1, w2, w3, w4 = bilinear_taps(
                    sample_coordinate(start_h, ph, bin_h, s // grid_w, grid_h),
                    sample_coordinate(start_w, pw, bin_w, s % grid_w, grid_w),
                    H,
                    W,
                )
                if not valid:
                    continue
                if y0 >= r0 and y0 < r1:
                    buf[y0 - r0, x0, c] += w1 * gb[c]
                    buf[y0 - r0, x1, c] += w2 * gb[c]
                if y1 >= r0 and y1 < r1:
                    buf[y1 - r0, x0, c] += w3 * gb[c]
                    buf[y1 - r0, x1, c] += w4 * gb[c]
