"""RoI pooling versus RoIAlign, drawn, with the worked example's numbers
(docs/walkthrough.md#roi-pooling-versus-roialign-the-worked-example).

The example: a 145 x 200 pixel RoI (height 145, width 200:
"145/32 = 4.53 by 200/32 = 6.25" lists height first, and "4 x 6 cells"
and "1 x 2 stride" are rows x columns; the never-pooled *row* confirms it) on
a 16 x 16 feature map of stride 32 (a 512 x 512 image), pooled to 3 x 3.

* RoI pooling quantises twice: the 4.53 x 6.25 projected RoI becomes 4 x 6
  whole cells (the fractional strips are lost), and the 3 x 3 output is
  pooled with a stride of floor(4/3) x floor(6/3) = 1 x 2 cells, so the 4th
  row of the region is never read.
* RoIAlign keeps 4.53 x 6.25, cuts it into 3 x 3 equal bins of
  1.51 x 2.08 cells, and samples each bin at 2 x 2 points by bilinear
  interpolation from the four nearest cell centres.

Conventions of the drawings: the axes are feature-map cell units, x to the
right (columns), y down (rows); cell (r, c) is the square [c, c+1] x [r, r+1]
and its value sits at its centre (c + 0.5, r + 0.5). That is RoIAlign's
``aligned=True`` convention, the one in which the drawn points are exactly
where the code samples; with ``aligned=False`` the code reads pixel i's value
at coordinate i instead of i + 0.5, so its samples land half a cell below and
right of the drawn RoI (torchvision's legacy offset), and the drawing shows
that shift.

The example's numbers (the "thirds" placement of sampling points, and the simple
"floor" quantisation explanations usually draw) come from :func:`blog_roi_numbers`;
the code's own sampling points from ``tinymrcnn.ops.roi_align.roi_sample_points``.
Note that the exact Fast R-CNN kernel (``tinymrcnn.ops.roi_pool``, docs/semantics.md#roi-pooling)
rounds the corners and uses overlapping floor/ceil bins, a refinement of
that picture with the same two quantisations. The simple picture breaks down
when there are more output bins than whole cells (the box head's 7 x 7 on the
example's 4 x 6 cells: bins of floor(4/7) = 0 cells); :func:`draw_roi_pool`
then draws the kernel's own bins (:func:`kernel_roi_numbers`, from
``roi_pool_cells``). Every drawing takes any box, stride, map and output size.
"""

from __future__ import annotations

import math

import numpy as np

from ..ops.roi_align import bilinear_reference, roi_sample_points
from ..ops.roi_pool import roi_pool_cells

# (x1, y1, x2, y2) in image pixels: 200 wide, 145 high, its corner on a cell corner
# (cell (2, 2) of the stride-32 map), as the worked example draws it.
BLOG_BOX = (64.0, 64.0, 264.0, 209.0)
BLOG_STRIDE = 32
BLOG_FEATURE_SIZE = 16
BLOG_OUTPUT = 3

LOST_H = "#2ca02c"  # green: the lost fractional rows
LOST_W = "#1f77b4"  # blue: the lost fractional columns
NEVER = "#87ceeb"  # sky blue: the never-pooled row
QUANT = "#ffdd88"  # the quantised region


def blog_roi_numbers(box=BLOG_BOX, stride=BLOG_STRIDE, output_size=BLOG_OUTPUT):
    """The worked example's numbers, computed (RoI pooling with "floor" rounding).

    Args:
        box: (x1, y1, x2, y2) in image pixels.
        stride: the feature map's sub-sampling ratio.
        output_size: the pooled size (square).

    Returns:
        dict with
        roi_size: (h, w) in pixels, (145, 200);
        projected: (h, w) in cells, (4.53125, 6.25);
        origin: (row, col) of the cell holding the RoI's top-left corner;
        cells: RoI pooling's first quantisation, floor(projected): (4, 6);
        bin_stride: the second, floor(cells / output): (1, 2);
        pooled: set of (row, col) map cells RoI pooling reads;
        never_read: sorted (row, col) cells of the quantised region it never
            reads (the sky-blue row of the figure);
        lost: (h, w) fractions of a cell dropped by the first quantisation;
        align_bin: (h, w) size of RoIAlign's bins, (1.51, 2.08).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    h, w = y2 - y1, x2 - x1
    ph, pw = h / stride, w / stride
    r0, c0 = int(math.floor(y1 / stride)), int(math.floor(x1 / stride))
    cells = (int(math.floor(ph)), int(math.floor(pw)))
    bin_stride = (cells[0] // output_size, cells[1] // output_size)
    pooled = {
        (r0 + i * bin_stride[0] + a, c0 + j * bin_stride[1] + b)
        for i in range(output_size)
        for j in range(output_size)
        for a in range(bin_stride[0])
        for b in range(bin_stride[1])
    }
    region = {(r0 + a, c0 + b) for a in range(cells[0]) for b in range(cells[1])}
    return {
        "roi_size": (h, w),
        "projected": (ph, pw),
        "origin": (r0, c0),
        "cells": cells,
        "bin_stride": bin_stride,
        "pooled": pooled,
        "never_read": sorted(region - pooled),
        "lost": (ph - cells[0], pw - cells[1]),
        "align_bin": (ph / output_size, pw / output_size),
    }


def blog_sample_points(box=BLOG_BOX, stride=BLOG_STRIDE, output_size=BLOG_OUTPUT, n=2):
    """The "thirds" sampling points: the points dividing each bin into thirds (n = 2).

    Returns:
        (ys, xs): (output, n) arrays in cell units; bin (i, j)'s points are
        the grid ys[i] x xs[j]. The code samples at (k + 0.5) / n of a bin
        instead (``roi_sample_points``): a different point set.
    """
    x1, y1, x2, y2 = (float(v) / stride for v in box)
    bh, bw = (y2 - y1) / output_size, (x2 - x1) / output_size
    frac = np.arange(1, n + 1) / (n + 1)
    ys = y1 + (np.arange(output_size)[:, None] + frac[None, :]) * bh
    xs = x1 + (np.arange(output_size)[:, None] + frac[None, :]) * bw
    return ys, xs


# ----------------------------------------------------------------------------
# Drawing helpers (matplotlib axes; y grows downwards, as image rows)
# ----------------------------------------------------------------------------
def _rect(ax, x, y, w, h, **kw):
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x, y), w, h, **kw))


def draw_feature_grid(ax, size=BLOG_FEATURE_SIZE, view=None):
    """The feature map's cells as a grid; ``view`` = (c0, c1, r0, r1) limits the axes."""
    for i in range(size + 1):
        ax.axhline(i, color="0.82", lw=0.6, zorder=0)
        ax.axvline(i, color="0.82", lw=0.6, zorder=0)
    c0, c1, r0, r1 = view if view is not None else (0, size, 0, size)
    ax.set_xlim(c0, c1)
    ax.set_ylim(r1, r0)  # rows grow downwards
    ax.set_aspect("equal")
    ax.set_xlabel("feature-map column (cells)")
    ax.set_ylabel("row")


def draw_roi(ax, box=BLOG_BOX, stride=BLOG_STRIDE, **kw):
    """The RoI projected onto the map (continuous, unquantised): a red outline."""
    x1, y1, x2, y2 = (float(v) / stride for v in box)
    style = dict(fill=False, ec="crimson", lw=2.2, zorder=5)
    style.update(kw)
    _rect(ax, x1, y1, x2 - x1, y2 - y1, **style)


def kernel_roi_numbers(box=BLOG_BOX, stride=BLOG_STRIDE, output_size=BLOG_OUTPUT, feature_size=BLOG_FEATURE_SIZE):
    """What the library's RoI pooling kernel reads, from ``roi_pool_cells``.

    Returns:
        dict with
        bins: output x output nested lists of (h0, h1, w0, w1) half-open cells
            (the kernel's rounded corners, overlapping floor/ceil bins);
        region: (r0, r1, c0, c1) half-open, the cells spanned by the bins;
        pooled: set of (row, col) cells some bin reads;
        never_read: sorted cells of the region that no bin reads (none
            for the kernel, whose bins overlap rather than skip).
    """
    bins = roi_pool_cells(box, output_size, 1.0 / stride, feature_size, feature_size)
    pooled = {(r, c) for row in bins for h0, h1, w0, w1 in row for r in range(h0, h1) for c in range(w0, w1)}
    flat = [b for row in bins for b in row if b[1] > b[0] and b[3] > b[2]]
    if not flat:
        return {"bins": bins, "region": (0, 0, 0, 0), "pooled": pooled, "never_read": []}
    r0, r1 = min(b[0] for b in flat), max(b[1] for b in flat)
    c0, c1 = min(b[2] for b in flat), max(b[3] for b in flat)
    region = {(r, c) for r in range(r0, r1) for c in range(c0, c1)}
    return {"bins": bins, "region": (r0, r1, c0, c1), "pooled": pooled, "never_read": sorted(region - pooled)}


def _lost_strips(ax, roi, region):
    """Shade the parts of the RoI (x1, y1, x2, y2, cells) outside the quantised region (r0, r1, c0, c1)."""
    x1, y1, x2, y2 = roi
    r0, r1, c0, c1 = region
    lost_h = lost_w = 0.0
    for top, bottom in ((y1, min(r0, y2)), (max(r1, y1), y2)):  # rows above and below the region
        if bottom > top:
            _rect(ax, x1, top, x2 - x1, bottom - top, fc=LOST_H, alpha=0.55, ec="none", zorder=2)
            lost_h += bottom - top
    ya, yb = max(y1, r0), min(y2, r1)
    for left, right in ((x1, min(c0, x2)), (max(c1, x1), x2)):  # columns left and right of it
        if right > left and yb > ya:
            _rect(ax, left, ya, right - left, yb - ya, fc=LOST_W, alpha=0.55, ec="none", zorder=2)
            lost_w += right - left
    return lost_h, lost_w


def draw_roi_pool(
    ax,
    box=BLOG_BOX,
    stride=BLOG_STRIDE,
    output_size=BLOG_OUTPUT,
    feature_size=BLOG_FEATURE_SIZE,
    view=None,
    rounding="auto",
):
    """RoI pooling: quantised cells, bins, lost strips, never-read cells.

    rounding: "floor" draws the walkthrough's simple picture (whole cells
    from the RoI's corner, bins of floor(cells / output) cells, from
    :func:`blog_roi_numbers`); "kernel" draws the bins the library's kernel
    really pools (``roi_pool_cells``: rounded corners, overlapping
    floor/ceil bins); "auto" is "floor" unless a floor bin would be
    0 cells wide (more output bins than whole cells, e.g. 7 x 7 on a
    4 x 6 region), then "kernel".

    Returns:
        the rounding drawn, "floor" or "kernel".
    """
    nb = blog_roi_numbers(box, stride, output_size)
    if rounding == "auto":
        rounding = "floor" if min(nb["bin_stride"]) >= 1 else "kernel"
    if rounding not in ("floor", "kernel"):
        raise ValueError(f'rounding must be "auto", "floor" or "kernel", got {rounding!r}')
    ph, pw = nb["projected"]
    roi = tuple(float(v) / stride for v in box)
    draw_feature_grid(ax, feature_size, view)
    if rounding == "floor":
        (r0, c0), (ch, cw), (sh, sw) = nb["origin"], nb["cells"], nb["bin_stride"]
        region = (r0, r0 + ch, c0, c0 + cw)
        never = nb["never_read"]
        bins = [(r0 + i * sh, r0 + (i + 1) * sh, c0 + j * sw, c0 + (j + 1) * sw) for i in range(output_size)
                for j in range(output_size)]  # fmt: skip
        title = f"RoI pooling, floor rounding\n{ph:.2f} x {pw:.2f} -> {ch} x {cw} cells, bins of {sh} x {sw}"
    else:
        kn = kernel_roi_numbers(box, stride, output_size, feature_size)
        region, never = kn["region"], kn["never_read"]
        bins = [b for row in kn["bins"] for b in row]
        ch, cw = region[1] - region[0], region[3] - region[2]
        hs, ws = [b[1] - b[0] for b in bins], [b[3] - b[2] for b in bins]
        sizes = " x ".join(f"{min(v)}" if min(v) == max(v) else f"{min(v)}..{max(v)}" for v in (hs, ws))
        title = f"RoI pooling, the kernel's bins\n{ph:.2f} x {pw:.2f} -> {ch} x {cw} cells, bins of {sizes} (overlap)"
    r0, r1, c0, c1 = region
    _rect(ax, c0, r0, c1 - c0, r1 - r0, fc=QUANT, ec="none", alpha=0.7, zorder=1)
    lost_h, lost_w = _lost_strips(ax, roi, region)  # first quantisation: what the rounding drops
    for r, c in never:  # second: what the bins miss is never read
        _rect(ax, c, r, 1, 1, fc=NEVER, ec="none", zorder=2)
    for h0, h1, w0, w1 in bins:
        _rect(ax, w0, h0, w1 - w0, h1 - h0, fill=False, ec="black", lw=1.6 if rounding == "floor" else 1.0, zorder=4)
    draw_roi(ax, box, stride)
    ax.set_title(title, fontsize=10)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(fc=QUANT, label=f"quantised {ch} x {cw} region"),
            Patch(fc=LOST_H, alpha=0.55, label=f"lost rows ({lost_h:.2f} cell)"),
            Patch(fc=LOST_W, alpha=0.55, label=f"lost columns ({lost_w:.2f} cell)"),
            Patch(fc=NEVER, label=f"never pooled ({len(never)} cells)"),
            Patch(fill=False, ec="black", label=f"{output_size}x{output_size} bins"),
            Patch(fill=False, ec="crimson", label="the RoI"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=2,
        fontsize=7,
    )
    return rounding


def draw_roi_align(
    ax,
    box=BLOG_BOX,
    stride=BLOG_STRIDE,
    output_size=BLOG_OUTPUT,
    feature_size=BLOG_FEATURE_SIZE,
    placement="implementation",
    sampling_ratio=2,
    aligned=True,
    view=None,
):
    """RoIAlign's bins and sampling points.

    placement: "thirds" (points dividing a bin into thirds) or
    "implementation" (the code's: (i + 0.5) / grid of a bin, from
    ``roi_sample_points`` with ``aligned``).

    Returns:
        (ys, xs) the plotted sample coordinates in drawing units.
    """
    draw_feature_grid(ax, feature_size, view)
    x1, y1, x2, y2 = (float(v) / stride for v in box)
    bh, bw = (y2 - y1) / output_size, (x2 - x1) / output_size
    for i in range(output_size):
        for j in range(output_size):
            _rect(ax, x1 + j * bw, y1 + i * bh, bw, bh, fill=False, ec="black", lw=1.2, zorder=4)
    draw_roi(ax, box, stride)
    if placement == "thirds":
        ys, xs = blog_sample_points(box, stride, output_size, sampling_ratio)
        title = "RoIAlign, points at bin thirds"
        color = "darkorange"
    elif placement == "implementation":
        ys, xs, _ = roi_sample_points(box, output_size, 1.0 / stride, sampling_ratio, aligned)
        ys, xs = ys + 0.5, xs + 0.5  # pixel index i is drawn at i + 0.5
        title = f"RoIAlign, the code's points ((i+0.5)/{sampling_ratio}, aligned={aligned})"
        color = "purple"
    else:
        raise ValueError(f'placement must be "thirds" or "implementation", got {placement!r}')
    yy, xx = np.meshgrid(ys.ravel(), xs.ravel(), indexing="ij")
    ax.scatter(xx.ravel(), yy.ravel(), s=14, color=color, zorder=6)
    ax.set_title(title + f"\nbins {bh:.2f} x {bw:.2f} cells, no rounding", fontsize=10)
    return ys, xs


def draw_bilinear_taps(ax, y, x, feature_size=BLOG_FEATURE_SIZE, values=None):
    """One sampling point, its four taps (cell centres) and their bilinear weights.

    Args:
        y, x: the point in drawing units (cell edges at integers).
        values: optional (H, W) map to annotate the taps with.

    Returns:
        the taps [(row, col, weight)] as ``bilinear_reference`` computes them.
    """
    taps = bilinear_reference(y - 0.5, x - 0.5, feature_size, feature_size)  # centres at i + 0.5
    rows = [t[0] for t in taps]
    cols = [t[1] for t in taps]
    view = (min(cols) - 0.5, max(cols) + 1.5, min(rows) - 0.5, max(rows) + 1.5)
    draw_feature_grid(ax, feature_size, view)
    for r, c, w in taps:
        ax.plot([c + 0.5, x], [r + 0.5, y], color="0.5", lw=1, ls="--", zorder=3)
        ax.scatter([c + 0.5], [r + 0.5], s=60, color="teal", zorder=5)
        label = f"w = {w:.3f}"
        if values is not None:
            label += f"\nf = {values[r, c]:.2f}"
        ax.annotate(
            label,
            (c + 0.5, r + 0.5),
            textcoords="offset points",
            xytext=(0, -22),
            ha="center",
            fontsize=8,
            color="teal",
        )
    # the fractional offsets that make the weights (w of the far-right-bottom tap = ly lx)
    ly, lx = (y - 0.5) - taps[0][0], (x - 0.5) - taps[0][1]
    ax.scatter([x], [y], s=70, color="purple", marker="*", zorder=6)
    ax.set_title(
        f"one point's 4 taps: ly = {ly:.2f}, lx = {lx:.2f}\nw = (1-ly)(1-lx), (1-ly)lx, ly(1-lx), ly lx", fontsize=10
    )
    return taps


def roi_pool_vs_align_figure(
    box=BLOG_BOX,
    stride=BLOG_STRIDE,
    output_size=BLOG_OUTPUT,
    feature_size=BLOG_FEATURE_SIZE,
    sampling_ratio=2,
    aligned=True,
    rounding="auto",
):
    """The four panels: RoI pooling (``rounding`` as in :func:`draw_roi_pool`);
    RoIAlign with the "thirds" and the code's points; one point's bilinear
    taps. Any box, stride, map and output size. Returns a matplotlib Figure (no pyplot)."""
    from matplotlib.figure import Figure

    nb = blog_roi_numbers(box, stride, output_size)
    x1, y1, x2, y2 = (float(v) / stride for v in box)
    kr0, kr1, kc0, kc1 = kernel_roi_numbers(box, stride, output_size, feature_size)["region"]
    view = (  # the RoI and every cell the kernel reads, one cell of margin
        min(math.floor(x1), kc0) - 1,
        max(math.ceil(x2), kc1) + 1,
        min(math.floor(y1), kr0) - 1,
        max(math.ceil(y2), kr1) + 1,
    )
    fig = Figure(figsize=(15, 5.0))
    axes = fig.subplots(1, 4)
    draw_roi_pool(axes[0], box, stride, output_size, feature_size, view, rounding)
    draw_roi_align(axes[1], box, stride, output_size, feature_size, "thirds", sampling_ratio, view=view)
    ys, xs = draw_roi_align(
        axes[2], box, stride, output_size, feature_size, "implementation", sampling_ratio, aligned, view
    )
    py, px = float(ys[output_size // 2, 0]), float(xs[output_size // 2, 0])  # the centre bin's first point
    axes[2].scatter([px], [py], s=110, marker="*", color="purple", zorder=7)
    axes[2].annotate("see right", (px, py), textcoords="offset points", xytext=(-14, 9), fontsize=7)
    draw_bilinear_taps(axes[3], py, px, feature_size)
    fig.suptitle(
        f"RoI {nb['roi_size'][0]:.0f} x {nb['roi_size'][1]:.0f} px (h x w), stride {stride}: "
        f"{nb['projected'][0]:.2f} x {nb['projected'][1]:.2f} cells on a "
        f"{feature_size} x {feature_size} map, {output_size} x {output_size} output",
        fontsize=11,
    )
    fig.tight_layout()
    return fig
