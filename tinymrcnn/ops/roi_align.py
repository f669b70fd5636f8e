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
Read this file top to bottom:

* :func:`roi_sample_points` (where a box's samples are), :func:`bilinear_reference`
  (the four pixels one sample reads), :func:`roi_align_reference` and
  :func:`roi_align_backward_reference`: the definition in slow, readable
  NumPy, following docs/semantics.md ("RoIAlign") line by line. ``tinymrcnn.viz.roi`` draws exactly
  these points.
* :func:`roi_align`, :func:`roi_align_backward`: the same signatures and
  results, fast: they check their arguments and call the active kernels
  (``tinymrcnn/kernels/cpu/roi_align.py``, one parallel Numba loop; or the
  numba.cuda kernels). The tests hold them to the references.
  :func:`roi_align_levels` and its backward do the same over the maps of an
  FPN pyramid in one pass (the multi-scale pooler), and
  :func:`roi_feature_maps` lays a pyramid out for the kernels once, for the
  box and the mask pooler to share.

Backward convention (every functional op): ``roi_align_backward(dy, *the
forward's arguments*)`` returns the gradient of the feature map.

Layout of the arguments (as torchvision.ops.roi_align)
-------------------------------------------------------
x: (N, C, H, W) float32 or float64, finite.
rois: (K, 5) [batch_index, x1, y1, x2, y2] in input-image pixels; the box is
multiplied by ``spatial_scale`` (1 / the map's stride) to land on the map.
Boxes may lie partly or wholly outside the map, or have zero size; their
coordinates must be finite, and the batch index an integer in [0, N).
Coordinates are computed in float64 for both dtypes; a float32 map is
interpolated and summed in float32.
"""

from __future__ import annotations

import math

import numpy as np

from ..checks import check_feature_map, check_float_array, check_roi_args, check_rois, pair
from ..kernels import active_backend


# ----------------------------------------------------------------------------
# The definition, in readable NumPy (docs/semantics.md, "RoIAlign", line by line)
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
    offset = 0.5 if aligned else 0.0  # offset = 0.5 if aligned else 0
    start_w, start_h = x1 * spatial_scale - offset, y1 * spatial_scale - offset
    end_w, end_h = x2 * spatial_scale - offset, y2 * spatial_scale - offset
    roi_w, roi_h = end_w - start_w, end_h - start_h
    if not aligned:  # clamped to >= 1 (NaN stays NaN)
        roi_w = 1.0 if roi_w < 1.0 else roi_w
        roi_h = 1.0 if roi_h < 1.0 else roi_h
    bin_h, bin_w = roi_h / ph_, roi_w / pw_  # bin = roi / pooled

    def grid(roi, pooled):  # sampling_ratio, or adaptive
        if sampling_ratio > 0:
            return sampling_ratio
        g = roi / pooled
        return math.ceil(g) if 0.0 < g < 2.0**31 else 0  # NaN, empty or absurd box: no samples

    grid_h, grid_w = grid(roi_h, ph_), grid(roi_w, pw_)
    count = max(grid_h * grid_w, 1)
    # y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h; likewise x
    ys = np.array(
        [[start_h + p * bin_h + (i + 0.5) * bin_h / grid_h for i in range(grid_h)] for p in range(ph_)]
    ).reshape(ph_, grid_h)
    xs = np.array(
        [[start_w + p * bin_w + (i + 0.5) * bin_w / grid_w for i in range(grid_w)] for p in range(pw_)]
    ).reshape(pw_, grid_w)
    return ys, xs, count
    # --- end exercise ---


def bilinear_reference(y, x, height, width):
    """The four (row, col, weight) taps of a sample at (y, x); [] outside the map."""
    # --- exercise: roi_align_forward ---
    if not (-1.0 <= y <= height and -1.0 <= x <= width):  # out of range or NaN: contributes 0
        return []
    y, x = max(y, 0.0), max(x, 0.0)  # clamp y, x <= 0 to 0
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
    return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx), (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]
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


def roi_align_reference(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, mode="avg"):
    """RoIAlign, readable: x (N, C, H, W), rois (K, 5) -> (K, C, ph, pw); arguments as :func:`roi_align`."""
    ph_, pw_ = check_roi_args(output_size, sampling_ratio, mode, spatial_scale)
    check_float_array(x, "x", ndim=4)
    r = check_rois(rois, x.shape[0])
    # --- exercise: roi_align_forward ---
    out = np.zeros((len(r), x.shape[1], ph_, pw_), x.dtype)
    for k, roi in enumerate(r):
        feat = x[int(roi[0])]  # (C, H, W)
        ys, xs, count = roi_sample_points(roi[1:], (ph_, pw_), spatial_scale, sampling_ratio, aligned)
        for ph in range(ph_):
            for pw in range(pw_):
                values, _ = _bin_samples(feat, ys[ph], xs[pw])  # (S, C)
                if len(values) == 0:
                    continue  # empty grid: 0
                if mode == "avg":
                    out[k, :, ph, pw] = values.sum(axis=0) / count  # sum / count
                else:
                    out[k, :, ph, pw] = values.max(axis=0)
    return out
    # --- end exercise ---


def roi_align_backward_reference(
    dy, x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, mode="avg"
):
    """RoIAlign's gradient, readable: dy (K, C, ph, pw) -> dx (N, C, H, W); arguments as
    :func:`roi_align_backward`. avg reads only x's shape; max reads x to find each bin's winner."""
    check_float_array(x, "x", ndim=4)
    N, C, H, W = x.shape
    _check_grad(
        dy, len(rois) if isinstance(rois, np.ndarray) else 0, C, output_size, sampling_ratio, mode, spatial_scale
    )
    r = check_rois(rois, N)
    # --- exercise: roi_align_backward ---
    dx = np.zeros((N, C, H, W), dy.dtype)
    chans = np.arange(C)
    for k, roi in enumerate(r):
        b = int(roi[0])
        ys, xs, count = roi_sample_points(roi[1:], dy.shape[2:], spatial_scale, sampling_ratio, aligned)
        for ph in range(dy.shape[2]):
            for pw in range(dy.shape[3]):
                g = dy[k, :, ph, pw]  # (C,)
                if mode == "avg":
                    for y in ys[ph]:
                        for xx in xs[pw]:
                            for ty, tx, w in bilinear_reference(y, xx, H, W):
                                dx[b, :, ty, tx] += g * w / count  # d out / d tap = w / count
                    continue
                values, taps = _bin_samples(x[b], ys[ph], xs[pw])  # (S, C)
                if len(taps) == 0:
                    continue
                win = values.argmax(axis=0)  # (C,) first maximum
                for c, s in zip(chans, win):
                    for ty, tx, w in taps[s]:
                        dx[b, c, ty, tx] += g[c] * w  # only the winner's taps
    return dx
    # --- end exercise ---


# ----------------------------------------------------------------------------
# The fast op: checks, then the active kernels (tinymrcnn.kernels: the Numba
# CPU kernels of kernels/cpu/roi_align.py, or numba.cuda ones)
# ----------------------------------------------------------------------------
def roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, mode="avg"):
    """Pool a (ph, pw) grid of bilinearly sampled features for each RoI.

    Args:
        x: (N, C, H, W) float32/float64 feature map.
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
    return roi_align_levels([x], rois, _one_level(rois), [spatial_scale], output_size, sampling_ratio, aligned, mode)


def roi_align_backward(dy, x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, mode="avg"):
    """Gradient of :func:`roi_align` with respect to its feature map x.

    avg: dx[b, :, tap] += dy[k, :, ph, pw] * w_tap / count for the four taps of
    every sample of every bin (only x's shape is read). max: dy goes to the
    four taps of the bin's winning sample only (first maximum), found in x.
    No gradient flows to the boxes. Derivation: docs/derivations/roi_align.md.

    Args:
        dy: (K, C, ph, pw) gradient of the output.
        x, rois, output_size, spatial_scale, sampling_ratio, aligned, mode:
            the forward's arguments.

    Returns:
        dx: (N, C, H, W), dy's dtype.
    """
    return roi_align_levels_backward(
        dy, [x], rois, _one_level(rois), [spatial_scale], output_size, sampling_ratio, aligned, mode
    )[0]


class FeatureMaps(tuple):
    """Feature maps checked and laid out for the active RoI kernels (see :func:`roi_feature_maps`)."""


def roi_feature_maps(features) -> FeatureMaps:
    """Check a list of (N, C, H_l, W_l) maps and lay them out for the RoI kernels, once.

    The CPU kernels gather along channels and read a channels-last copy of
    each map; the GPU kernels read a device copy. The box and the mask
    pooler both pool from the same pyramid, so the model makes this once per
    pass and hands it to both. :func:`roi_align_levels` accepts either.
    """
    if isinstance(features, FeatureMaps):
        return features
    features = list(features)
    if not features:
        raise ValueError("features is empty")
    for i, f in enumerate(features):
        check_feature_map(f, f"features[{i}]")
    n, c = features[0].shape[:2]
    if any(tuple(f.shape[:2]) != (n, c) or f.dtype != features[0].dtype for f in features):
        raise ValueError(
            f"feature maps disagree on N, C or dtype: {[(tuple(f.shape), str(f.dtype)) for f in features]}"
        )
    return FeatureMaps(active_backend().roi_maps(features))


def roi_align_levels(features, rois, levels, scales, output_size, sampling_ratio=-1, aligned=False, mode="avg"):
    """RoIAlign of RoIs spread over several maps (an FPN pyramid), in one pass.

    RoI k is pooled from ``features[levels[k]]`` with ``scales[levels[k]]``;
    the result is in RoI order. :func:`roi_align` is the one-map case.

    Args:
        features: L maps, each (N, C, H_l, W_l), one N, C and dtype; or
            :func:`roi_feature_maps` of them.
        rois: (K, 5) [batch_index, x1, y1, x2, y2].
        levels: (K,) ints in [0, L).
        scales: L spatial scales.
        output_size, sampling_ratio, aligned, mode: as :func:`roi_align`.

    Returns:
        (K, C, ph, pw), the maps' dtype.
    """
    maps = roi_feature_maps(features)
    ph, pw, r, lv = _check_levels(maps, rois, levels, scales, output_size, sampling_ratio, mode)
    return active_backend().roi_align_levels(
        list(maps), r, lv, list(scales), (ph, pw), int(sampling_ratio), bool(aligned), mode == "max"
    )


def roi_align_levels_backward(
    dy, features, rois, levels, scales, output_size, sampling_ratio=-1, aligned=False, mode="avg"
):
    """Gradient of :func:`roi_align_levels`: one (N, C, H_l, W_l) array per map (zeros
    for a map no RoI was pooled from). Arguments: dy, then the forward's."""
    maps = roi_feature_maps(features)
    ph, pw, r, lv = _check_levels(maps, rois, levels, scales, output_size, sampling_ratio, mode)
    _check_grad(dy, len(r), maps[0].shape[1], (ph, pw), sampling_ratio, mode, scales[0])
    if dy.dtype != maps[0].dtype:
        raise ValueError(f"dtype mismatch (x: {maps[0].dtype}, dy: {dy.dtype})")
    return active_backend().roi_align_levels_backward(
        np.ascontiguousarray(dy), list(maps), r, lv, list(scales), int(sampling_ratio), bool(aligned), mode == "max"
    )


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------
def _one_level(rois):
    return np.zeros(len(rois) if isinstance(rois, np.ndarray) and rois.ndim == 2 else 0, np.int64)


def _check_levels(maps, rois, levels, scales, output_size, sampling_ratio, mode):
    """-> (ph, pw, rois as float64, levels as int64), or ValueError."""
    if len(scales) != len(maps):
        raise ValueError(f"{len(scales)} scales for {len(maps)} feature maps")
    for sc in scales:
        ph, pw = check_roi_args(output_size, sampling_ratio, mode, sc)
    r = check_rois(rois, maps[0].shape[0])
    lv = np.asarray(levels)
    k = len(r)
    if lv.shape != (k,) or (k and not np.issubdtype(lv.dtype, np.integer)):
        raise ValueError(f"levels must be {k} integers (one per RoI), got shape {lv.shape}")
    if k and (lv.min() < 0 or lv.max() >= len(maps)):
        raise ValueError(f"levels must index the {len(maps)} feature maps, got values in [{lv.min()}, {lv.max()}]")
    return ph, pw, r, np.ascontiguousarray(lv, dtype=np.int64)


def _check_grad(dy, k, c, output_size, sampling_ratio, mode, spatial_scale):
    check_float_array(dy, "dy", ndim=4)
    ph, pw = check_roi_args(output_size, sampling_ratio, mode, spatial_scale)
    if dy.shape != (k, c, ph, pw):
        raise ValueError(f"dy has shape {dy.shape}, expected (K, C, ph, pw) = {(k, c, ph, pw)}")
