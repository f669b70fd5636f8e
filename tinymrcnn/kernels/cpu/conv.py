"""The fast CPU convolution: shifted-window GEMMs in BLAS, data movement in Numba.

(With 16..128 channels the three passes run as direct dot products instead:
``kernels/cpu/conv_direct.py``; the rule is at DIRECT_MIN_CHANNELS below.)

Readable reference: ``tinymrcnn/ops/conv.py`` (``conv2d_reference`` & co.);
derivation: ``docs/derivations/conv.md``. The public functions are
``tinymrcnn.ops.conv2d`` etc., which validate their input and call these.

The idea (one picture, then every pass is a handful of GEMMs)
-------------------------------------------------------------
Pad every input channel and lay the N images of a channel end to end in one
row: ``xpad`` is (C, N*P) with P = Hp*Wp. An output pixel (n, oh, ow) gets the
*column* ``m = n*P + oh*Wp + ow`` of a "wide" output (O, M). For stride 1,
kernel tap (i, j) reads input column ``m + i*Wp + j`` for every m: the same
matrix ``xpad`` shifted by ``shift_ij = i*Wp + j``. So

    y_wide = sum over taps (i, j) of  W[:, :, i, j] (O, C)  @  xpad[:, shift_ij : shift_ij + M]

and ``xpad[:, shift:shift+M]`` is a plain view (rows N*P apart) that BLAS
reads in place. That is im2col without building the im2col matrix: the nine
taps of a 3x3 kernel are nine GEMMs that accumulate into one output
(``beta = 1``). The price: the columns that fall in the padding (ow >= Wo, or
between images) are computed and thrown away (6% at 64x64 with padding 1).

Stride s > 1 is turned into stride 1 by splitting the padded input into s*s
*phases* (even/odd rows and columns for s = 2): tap (i, j) only ever reads
phase (i % s, j % s), at offset (i // s, j // s) inside it, with stride 1.

The backward passes are the same windows used the other way round:

    dW[:, :, i, j] = dy_wide (O, M) @ xpad[:, shift_ij : shift_ij + M]^T
    dxpad[:, shift_ij : shift_ij + M] += W[:, :, i, j]^T (C, O) @ dy_wide   (for every tap)

where ``dy_wide`` holds zeros in the thrown-away columns, so they add nothing.
When the kernel equals the stride and there is no padding (a 1x1
convolution, the mask head's 2x2 / stride 2 deconvolution), the windows do not
overlap: every input pixel belongs to at most one window. Then one image is
one GEMM against its (C*kh*kw, Ho*Wo) block matrix, which ``gather_blocks``
copies out (no copy at all for 1x1: each image's (C, H*W) block is already
it), and whose adjoint ``scatter_blocks`` puts back: no wide layout, no
padding columns, no shifted windows. With very few input channels
(the 3-channel stem), a GEMM per tap would have an inner dimension of 3 and
re-read the whole output for every tap, so there the windows of all taps are
copied into one im2col chunk (``copy_windows``; its adjoint ``add_windows`` is
col2im) and multiplied in one GEMM.

What Numba does: the O(input + output) copies between (N, C, H, W) and the
wide layout (``pad_phases``, ``gather_output``, ``scatter_wide``,
``gather_phases``, and ``copy_windows``/``add_windows`` for few channels).
They are serial: on the benchmark shapes they take ~5% (256 channels) to ~20%
(32 channels) of a forward+backward, and a parallel Numba region next to
OpenBLAS's threads made both slower (up to 2x measured: each pool's threads
spin for a while after their work and steal the other's cores on a 2-core box).
What BLAS does: every multiply-add (``tinymrcnn/kernels/cpu/blas.py``).
(The direct path of ``conv_direct.py`` uses no BLAS, for the same reason: its
kernels are parallel Numba loops, and BLAS's threads would fight them.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from . import conv_direct
from .blas import gemm

# Wide buffers are processed in column chunks of about this many bytes per
# output row block, so that one chunk of the accumulated output stays in cache
# while all the taps add into it.
CHUNK_BYTES = 8 << 20
# With fewer input channels than this (the 3-channel stem), one GEMM per tap
# has a tiny inner dimension K = C and is bound by re-reading the output for
# every tap; then the taps' windows are copied into one im2col chunk
# (K = C*kh*kw) and multiplied at once.
IM2COL_MAX_CHANNELS = 16
# Non-overlapping windows (kernel == stride, no padding) run per image on the
# block matrix when the output maps have at least this many pixels (fewer: the
# batched wide layout gives BLAS one big product instead of N tiny ones).
DISJOINT_MIN_PIXELS = 64
# All three passes run in ``conv_direct.py`` (blocked dot products, Numba,
# no BLAS) when both channel counts lie in [DIRECT_MIN_CHANNELS,
# DIRECT_MAX_CHANNELS] and the windows overlap (not ``disjoint``). There a GEMM
# per tap has an inner dimension of only C = 16..128, too short for BLAS.
# Measured (2-core AMD EPYC shared with other jobs, so medians of interleaved
# runs; float32, 3x3 pad 1; ms, GEMM path / direct path):
#   (8, 32, 64, 64) -> 32      forward 161 / 59,  input grad 82 / 69
#   (2, 64, 128, 128) -> 64    forward 593 / 155, input grad 512 / 124
#   (2, 128, 64, 64) -> 128    forward 233 / 111, input grad 226 / 107
#   (1, 256, 64, 64) -> 256    forward 459 / 339, input grad 384 / 367
#   (32, 64, 14, 14) -> 64     forward 477 / 74,  input grad 461 / 79   (mask head)
# and forward+backward (8, 32, 64, 64) -> 32: 113 ms with the weight gradient
# in Numba, 1027 ms with it in BLAS next to Numba's threads (torch: 168 ms).
# On an idle machine the GEMM path at 256 channels runs near BLAS's peak (the
# long inner dimension), so 256 stays there; 16 and fewer channels are the
# stem, where im2col chunks do better.
DIRECT_MIN_CHANNELS = 16
DIRECT_MAX_CHANNELS = 128


@dataclass(frozen=True)
class Geometry:
    """Sizes of one convolution and of its wide layout.

    Input (N, C, H, W), weight (O, C, kh, kw), stride (sh, sw), padding
    (ph, pw), output (N, O, Ho, Wo). Phase images are (Hq, Wq), P = Hq*Wq
    columns per image; M = number of wide columns that hold an output pixel
    (up to the last valid one); taps[t] = (phase row, phase col, shift) of
    tap t = i*kw + j.
    """

    N: int
    C: int
    H: int
    W: int
    O: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    Ho: int
    Wo: int
    Hq: int
    Wq: int
    P: int
    M: int
    taps: np.ndarray

    @property
    def phases(self) -> tuple[int, int]:
        return min(self.sh, self.kh), min(self.sw, self.kw)

    @property
    def im2col(self) -> bool:
        """Few input channels: copy the taps into one (kh*kw*C, chunk) matrix."""
        return self.C < IM2COL_MAX_CHANNELS and len(self.taps) > 1

    @property
    def disjoint(self) -> bool:
        """Kernel == stride, no padding, big enough maps: one GEMM per image on its blocks."""
        return (
            self.kh == self.sh
            and self.kw == self.sw
            and self.ph == self.pw == 0
            and self.Ho * self.Wo >= DISJOINT_MIN_PIXELS
        )

    @property
    def direct(self) -> bool:
        """Small channel counts: the forward runs in conv_direct (one dot product per output)."""
        return (
            not self.disjoint
            and DIRECT_MIN_CHANNELS <= min(self.C, self.O)
            and max(self.C, self.O) <= DIRECT_MAX_CHANNELS
        )

    @property
    def pointwise(self) -> bool:
        """1x1 with stride 1: an image's (C, H*W) block matrix is the image itself."""
        return self.kh == self.kw == self.sh == self.sw == 1


def geometry(x_shape, w_shape, stride, padding) -> Geometry:
    """The Geometry of conv2d(x, w) for x (N, C, H, W), w (O, C, kh, kw); sizes already checked."""
    N, C, H, W = (int(v) for v in x_shape)
    O, _, kh, kw = (int(v) for v in w_shape)
    sh, sw = stride
    ph, pw = padding
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    Hq, Wq = -(-(H + 2 * ph) // sh), -(-(W + 2 * pw) // sw)
    P = Hq * Wq
    M = (N - 1) * P + (Ho - 1) * Wq + Wo
    taps = np.array(
        [[i % sh, j % sw, (i // sh) * Wq + j // sw] for i in range(kh) for j in range(kw)], dtype=np.int64
    ).reshape(-1, 3)
    return Geometry(N, C, H, W, O, kh, kw, sh, sw, ph, pw, Ho, Wo, Hq, Wq, P, M, taps)


# ---------------------------------------------------------------------------
# Numba: between (N, C, H, W) and the wide layout
# ---------------------------------------------------------------------------
@njit(cache=True)
def pad_phases(x, sh, sw, ph, pw, Hq, Wq, out):
    """x (N, C, H, W) -> out (nph, npw, C, N*Hq*Wq), zero padded and split in phases.

    out[a, b, c, n*P + u*Wq + v] = x[n, c, u*sh + a - ph, v*sw + b - pw] (0 outside x).
    """
    N, C, H, W = x.shape
    nph, npw = out.shape[0], out.shape[1]
    P = Hq * Wq
    for a in range(nph):
        for b in range(npw):
            # columns v whose input column v*sw + b - pw lies inside [0, W)
            vlo = max(0, (pw - b + sw - 1) // sw)
            vhi = min(Wq, (W - 1 + pw - b) // sw + 1)
            vlo = min(vlo, vhi)
            off = b - pw
            for c in range(C):
                row = out[a, b, c]
                for n in range(N):
                    for u in range(Hq):
                        h = u * sh + a - ph
                        base = n * P + u * Wq
                        if h < 0 or h >= H:
                            row[base : base + Wq] = 0
                            continue
                        src = x[n, c, h]
                        row[base : base + vlo] = 0
                        if sw == 1:
                            for v in range(vlo, vhi):  # contiguous: vectorises
                                row[base + v] = src[v + off]
                        else:
                            for v in range(vlo, vhi):
                                row[base + v] = src[v * sw + off]
                        row[base + vhi : base + Wq] = 0


@njit(cache=True)
def gather_output(yw, bias, Ho, Wo, Wq, P, y):
    """Wide (O, M) -> y (N, O, Ho, Wo) = yw[o, n*P + oh*Wq + ow] + bias[o]."""
    N, O = y.shape[0], y.shape[1]
    for n in range(N):
        for o in range(O):
            bo = bias[o]
            for oh in range(Ho):
                src = yw[o, n * P + oh * Wq : n * P + oh * Wq + Wo]
                dst = y[n, o, oh]
                for ow in range(Wo):
                    dst[ow] = src[ow] + bo


@njit(cache=True)
def scatter_wide(dy, Wq, P, dyw):
    """dy (N, O, Ho, Wo) -> wide (O, M) with zeros in the columns that hold no pixel."""
    N, O, Ho, Wo = dy.shape
    for o in range(O):
        row = dyw[o]
        row[:] = 0
        for n in range(N):
            for oh in range(Ho):
                base = n * P + oh * Wq
                src = dy[n, o, oh]
                for ow in range(Wo):
                    row[base + ow] = src[ow]


@njit(cache=True)
def gather_phases(xph, sh, sw, ph, pw, Hq, Wq, bias, out):
    """Phases (nph, npw, C, N*P) -> out (N, C, H, W), the inverse of pad_phases, plus bias[c].

    Pixels of phases that no tap reads (nph < sh) are 0 (+ bias).
    """
    N, C, H, W = out.shape
    nph, npw = xph.shape[0], xph.shape[1]
    P = Hq * Wq
    for n in range(N):
        for c in range(C):
            bc = bias[c]
            for h in range(H):
                a, u = (h + ph) % sh, (h + ph) // sh
                dst = out[n, c, h]
                if a >= nph:
                    dst[:] = bc
                    continue
                base = n * P + u * Wq
                if sw == 1:
                    src = xph[a, 0, c]
                    for w in range(W):  # contiguous: vectorises
                        dst[w] = src[base + w + pw] + bc
                else:
                    for w in range(W):
                        b = (w + pw) % sw
                        if b < npw:
                            dst[w] = xph[a, b, c, base + (w + pw) // sw] + bc
                        else:
                            dst[w] = bc


@njit(cache=True)
def copy_windows(xph, taps, m0, cols):
    """cols[t*C + c, :] = xph[a_t, b_t, c, shift_t + m0 : ... + cols.shape[1]] (im2col of one chunk)."""
    C = xph.shape[2]
    Mc = cols.shape[1]
    for t in range(taps.shape[0]):
        a, b, start = taps[t, 0], taps[t, 1], taps[t, 2] + m0
        for c in range(C):
            src = xph[a, b, c]
            dst = cols[t * C + c]
            for m in range(Mc):
                dst[m] = src[start + m]


@njit(cache=True)
def add_windows(cols, taps, m0, xph):
    """The adjoint of copy_windows (col2im): xph[a_t, b_t, c, shift_t + m0 + m] += cols[t*C + c, m]."""
    C = xph.shape[2]
    Mc = cols.shape[1]
    for t in range(taps.shape[0]):
        a, b, start = taps[t, 0], taps[t, 1], taps[t, 2] + m0
        for c in range(C):
            src = cols[t * C + c]
            dst = xph[a, b, c]
            for m in range(Mc):
                dst[start + m] += src[m]


@njit(cache=True)
def gather_blocks(x, kh, kw, Ho, Wo, out):
    """x (N, C, H, W) -> out (N, C*kh*kw, Ho*Wo), the windows of a kernel == stride conv.

    out[n, (c*kh + i)*kw + j, oh*Wo + ow] = x[n, c, oh*kh + i, ow*kw + j]; rows
    and columns of x past the last whole window are not read.
    """
    N, C = x.shape[0], x.shape[1]
    for n in range(N):
        for c in range(C):
            for i in range(kh):
                for j in range(kw):
                    dst = out[n, (c * kh + i) * kw + j]
                    for oh in range(Ho):
                        src = x[n, c, oh * kh + i]
                        for ow in range(Wo):
                            dst[oh * Wo + ow] = src[ow * kw + j]


@njit(cache=True)
def scatter_blocks(z, kh, kw, Ho, Wo, bias, out):
    """The adjoint of gather_blocks: z (N, C*kh*kw, Ho*Wo) -> out (N, C, H, W), plus bias[c].

    Windows do not overlap, so every pixel of out receives one entry of z, or
    none (the rows and columns past the last whole window: 0 + bias).
    """
    N, C, H, W = out.shape
    for n in range(N):
        for c in range(C):
            out[n, c] = bias[c]
            for i in range(kh):
                for j in range(kw):
                    src = z[n, (c * kh + i) * kw + j]
                    for oh in range(Ho):
                        dst = out[n, c, oh * kh + i]
                        for ow in range(Wo):
                            dst[ow * kw + j] = src[oh * Wo + ow] + bias[c]


# ---------------------------------------------------------------------------
# BLAS: the products, tap by tap, chunk by chunk
# ---------------------------------------------------------------------------
def _chunks(g: Geometry, itemsize: int):
    """Column ranges [m0, m1) of the wide layout, about CHUNK_BYTES per operand each."""
    rows = max(g.O, g.C * len(g.taps) if g.im2col else g.C)
    step = max(1024, CHUNK_BYTES // (rows * itemsize))
    return [(m0, min(g.M, m0 + step)) for m0 in range(0, g.M, step)]


def tap_weights(w: np.ndarray) -> np.ndarray:
    """(O, C, kh, kw) -> (O, kh*kw*C): columns t*C .. t*C+C-1 are tap t = i*kw + j."""
    O, C, kh, kw = w.shape
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(O, kh * kw * C)


def wide_buffer(lead: tuple, ncols: int, dtype, zero: bool = False) -> np.ndarray:
    """An array of shape lead + (ncols,) whose rows are a cache-friendly stride apart.

    Rows of a wide buffer are N*P columns long, and N*P is often a power of two
    (64 RoIs x 16x16 phases = 16384). BLAS then walks memory in steps that all
    map to the same few cache sets while it packs a matrix, and a GEMM slows
    down up to 10x (measured: 137 ms instead of ~10 ms for a 64x64x16384
    product). Padding each row to an odd multiple of 64 bytes breaks that
    pattern; the slack columns are never read.
    """
    per_line = 64 // np.dtype(dtype).itemsize
    lines = -(-ncols // per_line)
    if lines % 2 == 0:
        lines += 1
    full = (np.zeros if zero else np.empty)(tuple(lead) + (lines * per_line,), dtype=dtype)
    return full[..., :ncols]


def wide_forward(xph: np.ndarray, wt: np.ndarray, g: Geometry) -> np.ndarray:
    """y_wide (O, M) = sum_t W_t (O, C) @ window_t (C, M)."""
    C = g.C
    yw = wide_buffer((g.O,), g.M, xph.dtype)
    for m0, m1 in _chunks(g, xph.itemsize):
        if g.im2col:
            cols = np.empty((len(g.taps) * C, m1 - m0), dtype=xph.dtype)
            copy_windows(xph, g.taps, m0, cols)
            gemm(wt, cols, yw[:, m0:m1])
            continue
        for t, (a, b, shift) in enumerate(g.taps):
            gemm(
                wt[:, t * C : (t + 1) * C],
                xph[a, b, :, shift + m0 : shift + m1],
                yw[:, m0:m1],
                beta=0.0 if t == 0 else 1.0,
            )
    return yw


def wide_input_grad(dyw: np.ndarray, wt: np.ndarray, g: Geometry) -> np.ndarray:
    """dx_phases (nph, npw, C, N*P): window_t += W_t^T (C, O) @ dy_wide, for every tap t."""
    C = g.C
    nph, npw = g.phases
    dxph = wide_buffer((nph, npw, C), g.N * g.P, dyw.dtype, zero=True)
    for m0, m1 in _chunks(g, dyw.itemsize):
        if g.im2col:
            cols = np.empty((len(g.taps) * C, m1 - m0), dtype=dyw.dtype)
            gemm(wt, dyw[:, m0:m1], cols, trans_a=True)
            add_windows(cols, g.taps, m0, dxph)
            continue
        for t, (a, b, shift) in enumerate(g.taps):
            gemm(
                wt[:, t * C : (t + 1) * C],
                dyw[:, m0:m1],
                dxph[a, b, :, shift + m0 : shift + m1],
                trans_a=True,
                beta=1.0,
            )
    return dxph


def wide_weight_grad(dyw: np.ndarray, xph: np.ndarray, g: Geometry) -> np.ndarray:
    """dW_t (O, C) = dy_wide (O, M) @ window_t^T (M, C); returned as (O, C, kh, kw)."""
    C = g.C
    dwt = np.empty((g.O, len(g.taps) * C), dtype=dyw.dtype)
    for k, (m0, m1) in enumerate(_chunks(g, dyw.itemsize)):
        beta = 0.0 if k == 0 else 1.0
        if g.im2col:
            cols = np.empty((len(g.taps) * C, m1 - m0), dtype=xph.dtype)
            copy_windows(xph, g.taps, m0, cols)
            gemm(dyw[:, m0:m1], cols, dwt, trans_b=True, beta=beta)
            continue
        for t, (a, b, shift) in enumerate(g.taps):
            gemm(
                dyw[:, m0:m1],
                xph[a, b, :, shift + m0 : shift + m1],
                dwt[:, t * C : (t + 1) * C],
                trans_b=True,
                beta=beta,
            )
    return dwt.reshape(g.O, g.kh, g.kw, C).transpose(0, 3, 1, 2).copy()


def _phases_of(x: np.ndarray, g: Geometry) -> np.ndarray:
    nph, npw = g.phases
    xph = wide_buffer((nph, npw, g.C), g.N * g.P, x.dtype)
    pad_phases(x, g.sh, g.sw, g.ph, g.pw, g.Hq, g.Wq, xph)
    return xph


def _blocks_of(x: np.ndarray, g: Geometry) -> np.ndarray:
    """(N, C*kh*kw, Ho*Wo) block matrices of a disjoint conv (a view of x for 1x1)."""
    if g.pointwise:
        return x.reshape(g.N, g.C, g.H * g.W)
    blocks = np.empty((g.N, g.C * g.kh * g.kw, g.Ho * g.Wo), dtype=x.dtype)
    gather_blocks(x, g.kh, g.kw, g.Ho, g.Wo, blocks)
    return blocks


def wide_of(dy: np.ndarray, g: Geometry) -> np.ndarray | None:
    """dy (N, O, Ho, Wo) in the wide layout (O, M), or None where a conv does not use it."""
    if g.disjoint or g.direct:
        return None
    dyw = wide_buffer((g.O,), g.M, dy.dtype)
    scatter_wide(dy, g.Wq, g.P, dyw)
    return dyw


def _bias_or_zeros(bias, n: int, dtype) -> np.ndarray:
    return np.zeros(n, dtype=dtype) if bias is None else bias


# ---------------------------------------------------------------------------
# The three passes of a convolution, named by their conv2d roles.
# conv_transpose2d uses the same three with the roles swapped (ops/conv.py).
# ---------------------------------------------------------------------------
def conv_output(x, w, bias, g: Geometry) -> np.ndarray:
    """y (N, O, Ho, Wo) = conv2d(x, w) + bias[o]."""
    b = _bias_or_zeros(bias, g.O, x.dtype)
    if g.direct:  # y[n, o, r, q] = dot(window, w[o]) + b[o]
        return conv_direct.forward(x, w, b, (g.sh, g.sw), (g.ph, g.pw))
    y = np.empty((g.N, g.O, g.Ho, g.Wo), dtype=x.dtype)
    if g.disjoint:  # y[n] = W (O, C*kh*kw) @ blocks[n]
        w2, blocks = w.reshape(g.O, -1), _blocks_of(x, g)
        for n in range(g.N):
            yn = y[n].reshape(g.O, -1)
            yn[...] = b[:, None]
            gemm(w2, blocks[n], yn, beta=1.0)
        return y
    yw = wide_forward(_phases_of(x, g), tap_weights(w), g)
    gather_output(yw, b, g.Ho, g.Wo, g.Wq, g.P, y)
    return y


def conv_input_grad(dy, w, g: Geometry, bias=None, dyw=None) -> np.ndarray:
    """dx (N, C, H, W) of conv2d for upstream dy (N, O, Ho, Wo), plus bias[c] if given.

    (The bias is for conv_transpose2d, whose output is exactly this dx.)
    dyw: dy in the wide layout if the caller has it (``wide_of``), else made here.
    """
    b = _bias_or_zeros(bias, g.C, dy.dtype)
    dx = np.empty((g.N, g.C, g.H, g.W), dtype=dy.dtype)
    if g.disjoint:  # dblocks[n] = W^T @ dy[n], scattered back
        w2 = w.reshape(g.O, -1)
        if g.pointwise:  # the blocks are dx itself
            for n in range(g.N):
                dxn = dx[n].reshape(g.C, -1)
                dxn[...] = b[:, None]
                gemm(w2, dy[n].reshape(g.O, -1), dxn, trans_a=True, beta=1.0)
            return dx
        dblocks = np.empty((g.N, w2.shape[1], g.Ho * g.Wo), dtype=dy.dtype)
        for n in range(g.N):
            gemm(w2, dy[n].reshape(g.O, -1), dblocks[n], trans_a=True)
        scatter_blocks(dblocks, g.kh, g.kw, g.Ho, g.Wo, b, dx)
        return dx
    if g.direct:  # dy correlated with the flipped kernel
        return conv_direct.input_grad(dy, w, b, (g.H, g.W), (g.sh, g.sw), (g.ph, g.pw))
    dxph = wide_input_grad(wide_of(dy, g) if dyw is None else dyw, tap_weights(w), g)
    gather_phases(dxph, g.sh, g.sw, g.ph, g.pw, g.Hq, g.Wq, b, dx)
    return dx


def conv_gradients(dy, x, w, g: Geometry, need_input_grad=True):
    """(dx or None, dW) of conv2d: the two passes share their layout of dy."""
    if g.direct:  # both from the stacked windows of dy
        if need_input_grad:
            return conv_direct.backward(dy, x, w, (g.sh, g.sw), (g.ph, g.pw))
        return None, conv_weight_grad(dy, x, g)
    dyw = wide_of(dy, g)  # None where the pass does not use it
    dx = conv_input_grad(dy, w, g, dyw=dyw) if need_input_grad else None
    return dx, conv_weight_grad(dy, x, g, dyw=dyw)


def conv_weight_grad(dy, x, g: Geometry, dyw=None) -> np.ndarray:
    """dW (O, C, kh, kw) of conv2d for upstream dy (N, O, Ho, Wo) and input x (N, C, H, W).

    dyw: as for :func:`conv_input_grad` (a backward computing both makes it once).
    """
    if g.direct:  # windows summed in Numba, no BLAS
        return conv_direct.weight_grad(dy, x, (g.kh, g.kw), (g.sh, g.sw), (g.ph, g.pw))
    if g.disjoint:  # dW = sum_n dy[n] @ blocks[n]^T
        dw = np.zeros((g.O, g.C * g.kh * g.kw), dtype=x.dtype)
        blocks = _blocks_of(x, g)
        for n in range(g.N):
            gemm(dy[n].reshape(g.O, -1), blocks[n], dw, trans_b=True, beta=1.0)
        return dw.reshape(g.O, g.C, g.kh, g.kw)
    return wide_weight_grad(wide_of(dy, g) if dyw is None else dyw, _phases_of(x, g), g)
