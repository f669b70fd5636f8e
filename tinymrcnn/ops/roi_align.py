"""RoIAlign (Mask R-CNN, He et al. 2017, section 3): forward and backward.

RoIAlign cuts a fixed-size (ph, pw) feature grid out of a feature map for
each region of interest *without rounding anything*: the RoI is split into
ph x pw equal bins, each bin is sampled at grid_h x grid_w regularly spaced
points, each point is read by bilinear interpolation from its four nearest
pixels, and the samples of a bin are averaged (``mode="avg"``, torchvision and
detectron2) or maxed (``mode="max"``, which the paper allows). The exact rules,
edge cases included, are docs/semantics.md#roialign; the derivation of the backward
pass is docs/derivations/roi_align.md.

Functions
---------
* :func:`roi_align`, :func:`roi_align_backward`: the public ops (``tinymrcnn.ops``), on
  the Numba CPU kernels of ``tinymrcnn.kernels.cpu.roi_align``;
  :func:`roi_align_levels` and its backward: the same over several maps (an
  FPN pyramid) in one pass, for the multi-scale pooler.
* :func:`channels_last` / :class:`ChannelsLast`: the kernels gather along
  channels, so they read an (N, H, W, C) copy of the map. ``roi_align`` makes
  that copy itself when given an (N, C, H, W) array; convert a pyramid level
  once with ``channels_last(p)`` and pass the result to every call that pools
  from it (the box and the mask pooler) to pay for the transpose once.
* :func:`roi_align_reference`, :func:`roi_align_backward_reference`: slow,
  readable NumPy that follows docs/semantics.md#roialign line by line; the tests hold the
  kernels to them.
* :func:`roi_sample_points`, :func:`bilinear_reference`: the geometry of the
  reference, also used by ``tinymrcnn.viz.roi`` to draw exactly the points
  the code samples.

Layout of the arguments (as torchvision.ops.roi_align)
-------------------------------------------------------
x: (N, C, H, W) float32 or float64, finite.
rois: (K, 5) [batch_index, x1, y1, x2, y2] in input-image pixels; the box is
multiplied by ``spatial_scale`` (1 / the map's stride) to land on the map.
Coordinates may be NaN or lie outside the map; the batch index must be an
integer in [0, N).
Coordinates are computed in float64 for both dtypes; a float32 map is
interpolated and summed in float32.
"""
from __future__ import annotations

import math

import numpy as np

from ..checks import check_float_array, pair

MODES = ("avg", "max")


# ----------------------------------------------------------------------------
# Channels-last feature maps
# ----------------------------------------------------------------------------
class ChannelsLast:
    """A feature map stored (N, H, W, C), made once by :func:`channels_last`.

    ``shape`` still reads (N, C, H, W), the shape of the map it stands for,
    so code that asks a map for its size works with either. Its values were
    checked to be finite when it was made.
    """

    __slots__ = ("data",)

    def __init__(self, data: np.ndarray):
        self.data = data                                  # (N, H, W, C)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, h, w, c = self.data.shape
        return n, c, h, w

    @property
    def dtype(self):
        return self.data.dtype

    def numpy(self) -> np.ndarray:
        """Back to an (N, C, H, W) array (a copy)."""
        return np.ascontiguousarray(self.data.transpose(0, 3, 1, 2))

    def __repr__(self) -> str:
        return f"ChannelsLast(shape(NCHW)={self.shape}, dtype={self.dtype})"


def channels_last(x, name: str = "x") -> ChannelsLast:
    """(N, C, H, W) array -> :class:`ChannelsLast`, checking it on the way.

    A non-finite map raises ValueError. A ChannelsLast is returned as it is.
    The copy costs about as much as one RoIAlign forward of 512 RoIs on an
    800x800 image's pyramid (benchmarks/bench_roi.py): make it once per level.
    """
    if isinstance(x, ChannelsLast):
        return x
    check_float_array(x, name, ndim=4)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name} must have a non-empty spatial size, got shape {x.shape}")
    return ChannelsLast(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))


# ----------------------------------------------------------------------------
# Input checks shared by roi_align and roi_pool
# ----------------------------------------------------------------------------
def check_rois(rois, num_images: int, name: str = "rois") -> np.ndarray:
    """(K, 5) [batch_index, x1, y1, x2, y2] -> float64 C-contiguous copy.

    Raises ValueError for a wrong shape or a batch index that is not an
    integer in [0, num_images). Box coordinates may be anything (NaN
    included): the kernels define what a degenerate box gives.
    """
    if not isinstance(rois, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(rois).__name__}")
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"{name} must have shape (K, 5) [batch_index, x1, y1, x2, y2], "
                         f"got {rois.shape}")
    if not (np.issubdtype(rois.dtype, np.floating) or np.issubdtype(rois.dtype, np.integer)):
        raise ValueError(f"{name} must be a float or integer array, got {rois.dtype}")
    r = np.ascontiguousarray(rois, dtype=np.float64)
    b = r[:, 0]
    bad = ~((b >= 0) & (b < num_images) & (b == np.floor(b)))       # NaN fails too
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{i}, 0] = {rois[i, 0]!r} is not a batch index in "
                         f"[0, {num_images}) ({int(bad.sum())} bad row(s))")
    return r


def _check_args(output_size, sampling_ratio, mode, spatial_scale):
    ph, pw = pair(output_size, "output_size")
    if ph < 1 or pw < 1:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(sampling_ratio, (int, np.integer)):
        raise ValueError(f"sampling_ratio must be an int (<= 0: adaptive), got {sampling_ratio!r}")
    if not (np.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(f"spatial_scale must be a positive number, got {spatial_scale!r}")
    return ph, pw


def _check_shape4(shape, name="input_shape"):
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"{name} must be (N, C, H, W), got {shape!r}") from None
    if len(shape) != 4 or min(shape) < 0 or shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"{name} must be (N, C, H, W) with H, W >= 1, got {shape!r}")
    return shape


# ----------------------------------------------------------------------------
# The public ops (Numba CPU kernels)
# ----------------------------------------------------------------------------
def roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False,
              mode="avg"):
    """Pool a (ph, pw) grid of bilinearly sampled features for each RoI.

    Args:
        x: (N, C, H, W) float32/float64 feature map, or a :class:`ChannelsLast`
            made from one (skips the transpose; see :func:`channels_last`).
        rois: (K, 5) [batch_index, x1, y1, x2, y2], input-image pixels.
        output_size: int or (ph, pw).
        spatial_scale: map cells per input pixel (1/stride; 2^-k for FPN level k).
        sampling_ratio: sampling points per bin side; <= 0: adaptive,
            ceil(roi_size / output_size) per RoI.
        aligned: False: torchvision's legacy mapping (pixel i at coordinate i,
            RoIs at least 1x1); True: half-pixel offset (detectron2).
        mode: "avg" (the paper's and torchvision's) or "max".

    Returns:
        (K, C, ph, pw), x's dtype.
    """
    levels = np.zeros(len(rois) if isinstance(rois, np.ndarray) and rois.ndim == 2 else 0, np.int64)
    return roi_align_levels([x], rois, levels, [spatial_scale], output_size, sampling_ratio,
                            aligned, mode)


def roi_align_backward(dy, rois, input_shape, spatial_scale=1.0, sampling_ratio=-1, aligned=False,
                       mode="avg", x=None):
    """Gradient of :func:`roi_align` with respect to its feature map.

    avg: dx[b, :, tap] += dy[k, :, ph, pw] * w_tap / count for the four taps of
    every sample of every bin. max: dy goes to the four taps of the bin's
    winning sample only (first maximum), so ``x`` is needed to find it.
    No gradient flows to the boxes. Derivation: docs/derivations/roi_align.md.

    Args:
        dy: (K, C, ph, pw) gradient of the output.
        rois, spatial_scale, sampling_ratio, aligned, mode: as in the forward.
        input_shape: (N, C, H, W) of the forward's x.
        x: the forward's x (array or ChannelsLast); required for mode="max".

    Returns:
        dx: (N, C, H, W), dy's dtype.
    """
    levels = np.zeros(len(rois) if isinstance(rois, np.ndarray) and rois.ndim == 2 else 0, np.int64)
    return roi_align_levels_backward(dy, rois, levels, [spatial_scale], [input_shape],
                                     sampling_ratio, aligned, mode,
                                     None if x is None else [x])[0]


def _check_levels(levels, k, n_maps):
    lv = np.asarray(levels)
    if lv.shape != (k,) or (k and not np.issubdtype(lv.dtype, np.integer)):
        raise ValueError(f"levels must be {k} integers (one per RoI), got shape {lv.shape}")
    if k and (lv.min() < 0 or lv.max() >= n_maps):
        raise ValueError(f"levels must index the {n_maps} feature maps, got values in "
                         f"[{lv.min()}, {lv.max()}]")
    return np.ascontiguousarray(lv, dtype=np.int64)


def roi_align_levels(features, rois, levels, scales, output_size, sampling_ratio=-1, aligned=False,
                     mode="avg"):
    """RoIAlign of RoIs spread over several maps (an FPN pyramid), in one parallel pass.

    RoI k is pooled from ``features[levels[k]]`` with ``scales[levels[k]]``;
    the result is in RoI order. :func:`roi_align` is the one-map case; the
    multi-scale pooler (``tinymrcnn.model.poolers``) calls this directly, so
    one parallel loop covers every RoI and each writes its own output row.

    Args:
        features: list of L maps, each (N, C, H_l, W_l) or :class:`ChannelsLast`;
            one N, C and dtype.
        rois: (K, 5) [batch_index, x1, y1, x2, y2].
        levels: (K,) ints in [0, L).
        scales: L spatial scales.
        output_size, sampling_ratio, aligned, mode: as :func:`roi_align`.

    Returns:
        (K, C, ph, pw), the maps' dtype.
    """
    from ..kernels.cpu.roi_align import roi_align_forward_nhwc
    maps = [channels_last(f, f"features[{i}]") for i, f in enumerate(features)]
    if not maps:
        raise ValueError("features is empty")
    if len(scales) != len(maps):
        raise ValueError(f"{len(scales)} scales for {len(maps)} feature maps")
    for sc in scales:
        ph, pw = _check_args(output_size, sampling_ratio, mode, sc)
    n, c = maps[0].shape[:2]
    if any(m.shape[:2] != (n, c) or m.dtype != maps[0].dtype for m in maps):
        raise ValueError("feature maps disagree on N, C or dtype: "
                         f"{[(m.shape, str(m.dtype)) for m in maps]}")
    r = check_rois(rois, n)
    lv = _check_levels(levels, len(r), len(maps))
    return roi_align_forward_nhwc(tuple(m.data for m in maps), lv, np.asarray(scales, np.float64),
                                  r, ph, pw, int(sampling_ratio), bool(aligned), mode == "max")


def roi_align_levels_backward(dy, rois, levels, scales, input_shapes, sampling_ratio=-1,
                              aligned=False, mode="avg", features=None):
    """Gradient of :func:`roi_align_levels`: one (N, C, H_l, W_l) array per map.

    A map no RoI was pooled from gets zeros. ``features`` (the forward's maps)
    is required for mode="max".
    """
    from ..kernels.cpu.roi_align import roi_align_backward_stripes
    check_float_array(dy, "dy", ndim=4)
    shapes = [_check_shape4(s) for s in input_shapes]
    if len(scales) != len(shapes):
        raise ValueError(f"{len(scales)} scales for {len(shapes)} input shapes")
    for sc in scales:
        ph, pw = _check_args(dy.shape[2:], sampling_ratio, mode, sc)
    N, C = shapes[0][:2]
    if any(s[:2] != (N, C) for s in shapes):
        raise ValueError(f"input shapes disagree on N, C: {shapes}")
    r = check_rois(rois, N)
    if dy.shape != (r.shape[0], C, ph, pw):
        raise ValueError(f"dy has shape {dy.shape}, expected (K, C, ph, pw) = "
                         f"{(r.shape[0], C, ph, pw)}")
    lv = _check_levels(levels, len(r), len(shapes))
    if mode == "max":
        if features is None:
            raise ValueError('mode="max" needs the forward input x to find the winning samples')
        maps = [channels_last(f, f"features[{i}]") for i, f in enumerate(features)]
        for m, s in zip(maps, shapes):
            if m.shape != s:
                raise ValueError(f"x has shape {m.shape}, expected input_shape {s}")
            if m.dtype != dy.dtype:
                raise ValueError(f"dtype mismatch (x: {m.dtype}, dy: {dy.dtype})")
    dy = np.ascontiguousarray(dy)
    grads = []
    for i, (n, c, h, w) in enumerate(shapes):
        index = np.flatnonzero(lv == i)
        if len(index) == 0:
            grads.append(np.zeros((n, c, h, w), dy.dtype))
            continue
        xd = maps[i].data if mode == "max" else np.zeros((1, 1, 1, 1), dy.dtype)  # avg: unused
        # 8-row stripes: one task's (8, W, C) accumulator stays in cache (1.6 MB for W=200, C=256)
        grads.append(roi_align_backward_stripes(dy, r, index, xd, n, h, w, float(scales[i]),
                                                int(sampling_ratio), bool(aligned), mode == "max", 8))
    return grads


# ----------------------------------------------------------------------------
# The readable reference (docs/semantics.md#roialign, line by line)
# ----------------------------------------------------------------------------
def roi_sample_points(box, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """Where RoIAlign samples one box, in feature-map coordinates.

    Args:
        box: (x1, y1, x2, y2) in input pixels.

    Returns:
        (ys, xs, count): ys (ph, grid_h) and xs (pw, grid_w) are the sample
        coordinates of bin row ph / bin column pw (a bin's points are the
        grid ys[ph] x xs[pw]); count divides the average.
    """
    ph_, pw_ = pair(output_size, "output_size")
    x1, y1, x2, y2 = (float(v) for v in box)
    # --- exercise: roi_align_forward ---
    offset = 0.5 if aligned else 0.0                       # offset = 0.5 if aligned else 0
    start_w, start_h = x1 * spatial_scale - offset, y1 * spatial_scale - offset
    end_w, end_h = x2 * spatial_scale - offset, y2 * spatial_scale - offset
    roi_w, roi_h = end_w - start_w, end_h - start_h
    if not aligned:                                        # clamped to >= 1 (NaN stays NaN)
        roi_w = 1.0 if roi_w < 1.0 else roi_w
        roi_h = 1.0 if roi_h < 1.0 else roi_h
    bin_h, bin_w = roi_h / ph_, roi_w / pw_                # bin = roi / pooled

    def grid(roi, pooled):                                 # sampling_ratio, or adaptive
        if sampling_ratio > 0:
            return sampling_ratio
        g = roi / pooled
        return math.ceil(g) if 0.0 < g < 2.0 ** 31 else 0  # NaN, empty or absurd box: no samples

    grid_h, grid_w = grid(roi_h, ph_), grid(roi_w, pw_)
    count = max(grid_h * grid_w, 1)
    # y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h; likewise x
    ys = np.array([[start_h + p * bin_h + (i + 0.5) * bin_h / grid_h for i in range(grid_h)]
                   for p in range(ph_)]).reshape(ph_, grid_h)
    xs = np.array([[start_w + p * bin_w + (i + 0.5) * bin_w / grid_w for i in range(grid_w)]
                   for p in range(pw_)]).reshape(pw_, grid_w)
    return ys, xs, count
    # --- end exercise ---


def bilinear_reference(y, x, height, width):
    """The four (row, col, weight) taps of a sample at (y, x); [] outside the map."""
    # --- exercise: roi_align_forward ---
    if not (-1.0 <= y <= height and -1.0 <= x <= width):   # out of range or NaN: contributes 0
        return []
    y, x = max(y, 0.0), max(x, 0.0)                        # clamp y, x <= 0 to 0
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx),
            (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]
    # --- end exercise ---


def _bin_samples(feat, ys, xs):
    """Values (S, C) and taps of the S = len(ys) * len(xs) samples of one bin (row-major)."""
    C, H, W = feat.shape
    values, taps = [], []
    for y in ys:
        for x in xs:
            t = bilinear_reference(y, x, H, W)
            v = np.zeros(C, feat.dtype)
            for yy, xx, w in t:
                v = v + w * feat[:, yy, xx]
            values.append(v)
            taps.append(t)
    return np.array(values, dtype=feat.dtype).reshape(len(taps), C), taps


def roi_align_reference(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False,
                        mode="avg"):
    """Readable RoIAlign: same signature and result as :func:`roi_align` (x an array)."""
    ph_, pw_ = _check_args(output_size, sampling_ratio, mode, spatial_scale)
    check_float_array(x, "x", ndim=4)
    r = check_rois(rois, x.shape[0])
    # --- exercise: roi_align_forward ---
    out = np.zeros((len(r), x.shape[1], ph_, pw_), x.dtype)
    for k, roi in enumerate(r):
        feat = x[int(roi[0])]                                            # (C, H, W)
        ys, xs, count = roi_sample_points(roi[1:], (ph_, pw_), spatial_scale, sampling_ratio, aligned)
        for ph in range(ph_):
            for pw in range(pw_):
                values, _ = _bin_samples(feat, ys[ph], xs[pw])           # (S, C)
                if len(values) == 0:
                    continue                                             # empty grid: 0
                if mode == "avg":
                    out[k, :, ph, pw] = values.sum(axis=0) / count       # sum / count
                else:
                    out[k, :, ph, pw] = values.max(axis=0)
    return out
    # --- end exercise ---


def roi_align_backward_reference(dy, rois, input_shape, spatial_scale=1.0, sampling_ratio=-1,
                                 aligned=False, mode="avg", x=None):
    """Readable RoIAlign backward: same signature and result as :func:`roi_align_backward`."""
    N, C, H, W = _check_shape4(input_shape)
    _check_args(dy.shape[2:], sampling_ratio, mode, spatial_scale)
    r = check_rois(rois, N)
    if mode == "max" and x is None:
        raise ValueError('mode="max" needs the forward input x to find the winning samples')
    # --- exercise: roi_align_backward ---
    dx = np.zeros((N, C, H, W), dy.dtype)
    chans = np.arange(C)
    for k, roi in enumerate(r):
        b = int(roi[0])
        ys, xs, count = roi_sample_points(roi[1:], dy.shape[2:], spatial_scale, sampling_ratio, aligned)
        for ph in range(dy.shape[2]):
            for pw in range(dy.shape[3]):
                g = dy[k, :, ph, pw]                                     # (C,)
                if mode == "avg":
                    for y in ys[ph]:
                        for xx in xs[pw]:
                            for ty, tx, w in bilinear_reference(y, xx, H, W):
                                dx[b, :, ty, tx] += g * w / count        # d out / d tap = w / count
                    continue
                values, taps = _bin_samples(x[b], ys[ph], xs[pw])        # (S, C)
                if len(taps) == 0:
                    continue
                win = values.argmax(axis=0)                              # (C,) first maximum
                for c, s in zip(chans, win):
                    for ty, tx, w in taps[s]:
                        dx[b, c, ty, tx] += g[c] * w                     # only the winner's taps
    return dx
    # --- end exercise ---
