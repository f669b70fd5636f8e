"""Instance masks in COCO's three spellings: bitmaps, polygons and RLE.

Written from scratch; ``pycocotools.mask`` is only the reference the tests
compare against.

Conventions (the same as COCO's):
    * a mask is an (H, W) array, nonzero = inside; pixel (row r, column c)
      covers the square [c, c + 1] x [r, r + 1] in continuous coordinates,
      so its centre is (c + 0.5, r + 0.5);
    * a polygon is a flat list [x0, y0, x1, y1, ...] in those coordinates;
      an object may have several polygons (its mask is their union);
    * RLE ("run-length encoding") reads the mask in column-major (Fortran)
      order and stores the lengths of alternating runs, starting with a run
      of zeros (which may be empty): {"size": [H, W], "counts": [...]}.
      COCO's *compressed* RLE packs those counts into an ASCII string.

Polygons are rasterised by testing pixel centres (even-odd rule). Points
outside the image are fine: only pixels inside the image are tested, so a
polygon is clipped to the image. pycocotools rasterises on a 5x finer grid
instead, so the two can disagree on pixels whose centre lies within about
0.2 px of an edge; on polygons with integer, axis-aligned edges they agree.
"""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------- RLE


def rle_encode(mask: np.ndarray) -> dict:
    """(H, W) mask -> uncompressed RLE {"size": [H, W], "counts": [int, ...]}."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects an (H, W) mask, got shape {mask.shape}")
    h, w = mask.shape
    flat = mask.ravel(order="F") != 0  # column-major, as COCO
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # first index of each new run
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts  # runs start with zeros
    return {"size": [int(h), int(w)], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict) -> np.ndarray:
    """RLE (compressed or not) -> (H, W) uint8 mask."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = rle_string_to_counts(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and counts.min() < 0:
        raise ValueError("RLE counts must be non-negative")
    if int(counts.sum()) != h * w:
        raise ValueError(f"RLE counts add up to {int(counts.sum())}, but size {h}x{w} needs {h * w}")
    values = np.arange(counts.size) % 2  # 0, 1, 0, 1, ...
    flat = np.repeat(values.astype(np.uint8), counts)
    return np.ascontiguousarray(flat.reshape(w, h).T)  # undo column-major order


def rle_counts_to_string(counts) -> str:
    """COCO's compressed counts: a LEB128-like code, 5 data bits per character.

    From the fourth count on, each count is stored as the difference to the
    count two places back (a run of ones minus the previous run of ones, ...),
    which is usually small. Each value is written 5 bits at a time, low bits
    first; bit 0x20 says "more characters follow", bit 0x10 of the last one is
    the sign; 48 is added to land in printable ASCII.
    """
    out = []
    counts = [int(c) for c in counts]
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as C's long
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_string_to_counts(s) -> list[int]:
    """Inverse of :func:`rle_counts_to_string`."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("truncated compressed RLE string")
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)  # sign-extend
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_compress(rle: dict) -> dict:
    """Uncompressed RLE -> compressed RLE (counts as a string), as pycocotools writes it."""
    counts = rle["counts"]
    if not isinstance(counts, str):
        counts = rle_counts_to_string(counts)
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


# ------------------------------------------------------------------- polygons


def polygon_to_mask(polygons, height: int, width: int) -> np.ndarray:
    """Rasterise one object's polygons into an (H, W) uint8 mask.

    polygons: a list of flat [x0, y0, x1, y1, ...] lists (at least 3 points
    each), or one (P, 2) array. A pixel is inside when its centre is inside
    by the even-odd rule; the object's mask is the union of its polygons.
    """
    if isinstance(polygons, np.ndarray) and polygons.ndim == 2:
        polygons = [polygons.ravel()]
    mask = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(xy) < 3:
            raise ValueError(f"a polygon needs at least 3 points, got {len(xy)}")
        mask |= _fill_polygon(xy, height, width)
    return mask.astype(np.uint8)


def _fill_polygon(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Even-odd fill of one closed polygon (P, 2) at pixel centres -> (H, W) bool.

    Scanline idea: on row r (centre y = r + 0.5) every edge that crosses the
    row at x toggles "inside" for all pixel centres to the right of x. We
    mark each toggle in its row at the first column c with c + 0.5 > x and
    take a running parity along the row.
    """
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)  # edge k goes from point k to k + 1
    toggles = np.zeros((height, width + 1), dtype=np.int32)  # column `width` collects off-image toggles
    for ax, ay, bx, by in zip(x0, y0, x1, y1):
        if ay == by:
            continue  # horizontal edges never cross a row centre
        # rows whose centre lies in [min(ay, by), max(ay, by)): half-open, so a
        # vertex shared by two edges is counted once
        r_lo = int(np.ceil(min(ay, by) - 0.5))
        r_hi = int(np.ceil(max(ay, by) - 0.5))  # exclusive
        r_lo, r_hi = max(r_lo, 0), min(r_hi, height)
        if r_lo >= r_hi:
            continue
        yc = np.arange(r_lo, r_hi) + 0.5
        xc = ax + (yc - ay) * (bx - ax) / (by - ay)  # crossing x on each row
        col = np.clip(np.floor(xc + 0.5).astype(np.int64), 0, width)  # first c with c + 0.5 > xc
        np.add.at(toggles, (np.arange(r_lo, r_hi), col), 1)
    return (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)


# -------------------------------------------------------------- helpers


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight (x1, y1, x2, y2) box of an (H, W) mask in continuous coordinates.

    The box runs from the left edge of the leftmost pixel to the right edge
    of the rightmost one (x2 = last column + 1), so its width is the pixel
    extent, as COCO's ``toBbox``. An empty mask gives (0, 0, 0, 0).
    """
    ys = np.flatnonzero(np.asarray(mask).any(axis=1))
    xs = np.flatnonzero(np.asarray(mask).any(axis=0))
    if len(xs) == 0:
        return np.zeros(4, dtype=np.float32)
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=np.float32)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) masks -> (N, 4) float32 tight boxes (see :func:`mask_to_box`)."""
    return np.stack([mask_to_box(m) for m in masks]) if len(masks) else np.zeros((0, 4), np.float32)
