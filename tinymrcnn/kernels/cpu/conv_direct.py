"""Direct convolution for small channel counts: one dot product per output, in Numba.

Readable reference: ``tinymrcnn/ops/conv.py`` (``conv2d_reference``); the
GEMM path and the rule that picks between the two: ``kernels/cpu/conv.py``.

Why another algorithm
---------------------
The GEMM path multiplies a (O, C) weight matrix per kernel tap into the
shifted input. With C = 16..128 input channels that is a GEMM with an inner
dimension of 16..128, too short for BLAS to reach its speed (it re-reads and
re-writes the output for every tap). Here every output value is instead
computed in one go, as one long dot product, and written once.

The layout: stacked rows, channels last
---------------------------------------
For output row r, the window of output pixel q covers kh input rows
(r*sh + i - ph, i < kh) and kw input columns (q*sw + j - pw, j < kw), all C
channels. ``channels_last`` and ``stack_rows`` copy the input (N, C, H, W) into

    xs[n, r, v, i, c] = x[n, c, r*sh + i - ph, v - pw]      (0 outside x)

i.e. for every output row, the kh input rows it reads, interleaved column by
column, channels last. Then the whole window of pixel q is *one contiguous
run* of L = kw*kh*C numbers, starting at column v = q*sw:

    window(n, r, q) = xs[n, r].ravel()[q*sw*kh*C : q*sw*kh*C + L]

and with the weights laid out the same way, wk[o] = w[o, :, :, :] as
(kw, kh, C) flattened (``stacked_weights``), an output is a dot product of
two contiguous vectors:

    y[n, o, r, q] = bias[o] + dot(window(n, r, q), wk[o])

The copy costs kh times the input (3x for 3x3), once per pass.

The blocking: 3 pixels x 3 output channels in registers
-------------------------------------------------------
``correlate`` computes a block of PIXELS = 3 neighbouring output pixels times
OUTPUTS = 3 output channels at once: 9 dot products that share their loads
(each input number is used 3 times, each weight 3 times: 6 loads for 9
multiply-adds). The 9 running sums are 9 scalar variables; the compiler
vectorises the loop over the L inputs (fastmath allows reordering the sums),
so each sum lives in one SIMD register (8 float32 lanes on AVX2) and is summed
across lanes once at the end. A local array of accumulators would be simpler
to write but is kept in memory, not in registers (measured 5-20x slower).
9 sums and the 6 loaded vectors take 15 of the 16 SIMD registers of AVX2;
bigger blocks (3 x 4, 2 x 6) spill and measured 5-45% slower. The weight rows
are padded to a multiple of 3 (33 rows for 32 channels: 3% of the work is
thrown away), and the measured gain is bigger than that: against a 2 x 4
block (8 sums, 6 loads), 1.20x on (8, 32, 64, 64) -> 32, 1.37x on
(2, 64, 128, 128) -> 64, 1.09-1.15x on (2, 64, 32, 32) -> 64, and 0.98-1.04x
on the mask head's (16, 64, 14, 14) -> 64 (same process, alternating).

The loop order: for each block of 3 output channels, all the pixels of the
row. Its 3 weight rows (3*L numbers: 3.5 KB at 32 channels) then stay in the
core's first-level cache while the row streams past them. The other order
(for each block of pixels, all output channels) reads every weight row again
for each block of pixels: O*L numbers, 37 KB at 32 channels and 147 KB at 64,
more than the 32 KB first-level cache, so the loads come from the second
level and wait on its bandwidth. Measured with the 2 x 4 block: 1.15-1.27x
faster this way round on the four shapes above. (The blocks and orders were
first tried the other way round, where a 3 x 3 block gained only 6-9%.)

What bounds it: each of the 9 sums is a chain of dependent multiply-adds (one
per 8 inputs), and a multiply-add's result is ready only 4-5 cycles later, so
two FMA units need 8-10 chains in flight to stay busy. The 9 horizontal sums
per block (over L = 288 inputs at 32 channels) take a few percent more.
Measured: ``correlate`` at 130-155 GFLOP/s on a 2-core AVX2 machine where
OpenBLAS's sgemm reaches 160-170.

``weight_sums`` (below) keeps 4 pixels x 2 rows of dW: its sums live in dW
(memory), not in registers, and 3 x 3 or 8 x 1 blocks, or the output-channel
loop outside the pixel loop, measured from 0.72x to 1.27x of it, mixed or
slower across the four shapes; it runs at 105-120 GFLOP/s.

A layout without the stacked copy was tried as well: read each window as kh
runs of kw*C numbers straight from the padded channels-last rows. Then every
block ends kh partial dot products instead of one, and those extra horizontal
sums cost what the copy saved (forward of (8, 32, 64, 64) -> 32: 7.5 ms
against 7.2 ms with the copy; the weight gradient 8.5 against 7.4).

One ``prange`` task per output row (n, r): each writes only its own row of y.
The tasks are handed out a few at a time (``parallel_chunksize``), not
split into one equal share per thread up front: on a machine whose cores are
shared with other programs, a thread that gets less of its core then simply
takes fewer tasks (measured with other jobs running: 48 ms instead of 58 ms
for ``correlate`` of (2, 64, 128, 128) -> 64; no difference on an idle machine).

The passes
----------
* forward: ``correlate(stack_rows(channels_last(x)), stacked_weights(w))``.
* input gradient, stride 1: the same correlation, of dy padded by
  (kh - 1 - ph, kw - 1 - pw), with the kernel flipped and its two channel
  axes swapped (``flipped_weights``). Stride s: the input pixels split into
  s*s phases (h % s, w % s); each phase receives only the taps a, a + s, ...
  and is again such a correlation, written into dx[:, :, h0::s, w0::s]
  (``_phases``). This is also conv_transpose2d's forward.
* weight gradient: dW[o] (as wk[o], L numbers) = sum over pixels of
  dy[n, o, r, q] * window(n, r, q). ``weight_sums`` adds GRAD_PIXELS = 4
  windows at a time into two rows of dW (4 multiply-adds per read and write
  of an element of dW, vectorised along L); each task sums a band of output
  rows into its own copy of dW, and the copies are added at the end.
* both gradients at stride 1 (``backward``): the weight gradient is summed
  from the windows of dy that the input gradient has just stacked, with x as
  the multipliers, which saves stacking x: 1.11-1.16x faster for the two
  passes together on the benchmark and model shapes (same process, alternating).

No BLAS at all on this path: on a 2-core machine, OpenBLAS's threads and
Numba's would fight over the cores (``kernels/cpu/conv.py``).
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, parallel_chunksize, prange

PIXELS = 3  # output pixels per register block (the first index of the sums s00..s22)
OUTPUTS = 3  # output channels per register block (the second index)
GRAD_PIXELS = 4  # pixels per step of the weight gradient
TASKS_PER_CHUNK = 2  # rows a thread takes at a time
# The weight gradient's partial sums: bands of output rows per thread, each with its
# own copy of dW (zeroed and added up: O*L numbers per band). Two per thread let a
# thread that gets less of its core take less; 16 bands (the earlier fixed count)
# made the copies cost more than the sums on small maps: (2, 64, 8, 8) -> 64 took
# 0.68 ms with 16 bands, 0.33 with 4, 0.27 with 2 (2 threads; no change at 64x64).
BANDS_PER_THREAD = 2


@njit(cache=True, parallel=True)
def channels_last(x, out):
    """x (N, C, H, W) -> out (N, H, W, C): the one transposition of the input."""
    N, C, H, W = x.shape
    for task in prange(N * H):
        n, h = task // H, task % H
        dst = out[n, h]  # (W, C)
        for c in range(C):
            src = x[n, c, h]
            for w in range(W):
                dst[w, c] = src[w]


@njit(cache=True, parallel=True)
def stack_rows(xt, kh, sh, ph, pw, Ho, out):
    """xt (N, H, W, C) channels last -> out (N, Ho, Ws, kh, C): out[n, r, v, i, :] = xt[n, r*sh + i - ph, v - pw, :].

    Entries outside the input are 0; Ws = out.shape[2] may be wider than the
    padded input (the extra columns are zeros that round a row up to whole
    blocks). ph and pw may be negative (they then crop). Every copy is a
    contiguous run of C numbers, and each output row is written front to back
    (column v, then its kh input rows): measured ~1.5x faster than stacking
    straight from (N, C, H, W), which transposes kh times, and 1.4-2.2x faster
    than writing the kh input rows one after the other.
    """
    N, H, W, C = xt.shape
    Ws = out.shape[2]
    vlo = min(max(0, pw), Ws)  # columns v with 0 <= v - pw < W
    vhi = max(min(Ws, W + pw), vlo)
    for task in prange(N * Ho):
        n, r = task // Ho, task % Ho
        dst = out[n, r]  # (Ws, kh, C)
        dst[:vlo] = 0
        dst[vhi:] = 0
        for v in range(vlo, vhi):
            for i in range(kh):
                h = r * sh + i - ph
                d = dst[v, i]
                if h < 0 or h >= H:
                    d[:] = 0
                    continue
                s = xt[n, h, v - pw]
                for c in range(C):
                    d[c] = s[c]


@njit(cache=True, parallel=True, fastmath=True)
def correlate(xs, wk, bias, step, y):
    """y[n, o, r, q] = bias[o] + dot(xs[n, r, q*step : q*step + L], wk[o]) for every o < O, q < Wo.

    xs (N, Ho, Ls): stacked rows (``stack_rows``) with each row flattened; a
    row must hold the windows of Wo rounded up to PIXELS pixels.
    wk (Ok, L): stacked weights, Ok = O rounded up to OUTPUTS (rows past O are
    not used). y (N, O, Ho, Wo).
    """
    N, O, Ho, Wo = y.shape
    L = wk.shape[1]
    zero = y.dtype.type(0)
    for task in prange(N * Ho):
        n, r = task // Ho, task % Ho
        row = xs[n, r]
        for o in range(0, O, OUTPUTS):
            w0, w1, w2 = wk[o], wk[o + 1], wk[o + 2]
            for q in range(0, Wo, PIXELS):
                x0 = row[q * step : q * step + L]  # the windows of pixels q, q + 1, q + 2
                x1 = row[(q + 1) * step : (q + 1) * step + L]
                x2 = row[(q + 2) * step : (q + 2) * step + L]
                s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = zero
                for k in range(L):  # vectorised: 9 SIMD accumulators
                    a, b, c = x0[k], x1[k], x2[k]
                    s00 += a * w0[k]
                    s01 += a * w1[k]
                    s02 += a * w2[k]
                    s10 += b * w0[k]
                    s11 += b * w1[k]
                    s12 += b * w2[k]
                    s20 += c * w0[k]
                    s21 += c * w1[k]
                    s22 += c * w2[k]
                _store(y, n, r, q, o, s00, s01, s02, bias)
                if q + 1 < Wo:
                    _store(y, n, r, q + 1, o, s10, s11, s12, bias)
                if q + 2 < Wo:
                    _store(y, n, r, q + 2, o, s20, s21, s22, bias)


@njit(cache=True, parallel=True, fastmath=True)
def weight_sums(xs, dy, step, bands, dwk):
    """dwk[b, o] = sum over the output rows (n, r) of band b of sum_q dy[n, o, r, q] * window(n, r, q).

    xs (N, Ho, Ls) stacked rows (``stack_rows``, rows flattened) holding Wo
    rounded up to GRAD_PIXELS windows; dy (N, O, Ho, Wo); bands (B + 1,) row
    boundaries in the flat (n, r) order; dwk (B, O, L), overwritten.
    """
    N, O, Ho, Wo = dy.shape
    L = dwk.shape[2]
    zero = dwk.dtype.type(0)
    for band in prange(dwk.shape[0]):
        acc = dwk[band]
        acc[:, :] = 0
        for task in range(bands[band], bands[band + 1]):
            n, r = task // Ho, task % Ho
            row = xs[n, r]
            for q in range(0, Wo, GRAD_PIXELS):
                x0 = row[q * step : q * step + L]
                x1 = row[(q + 1) * step : (q + 1) * step + L]
                x2 = row[(q + 2) * step : (q + 2) * step + L]
                x3 = row[(q + 3) * step : (q + 3) * step + L]
                d = dy[n, :, r]
                for o in range(0, O, 2):  # two rows of dW at a time
                    p = min(o + 1, O - 1)  # (the same row twice if O is odd)
                    d00, d01, d02, d03 = _four(d[o], q, Wo, zero)
                    d10, d11, d12, d13 = _four(d[p], q, Wo, zero)
                    if p == o:
                        d10 = d11 = d12 = d13 = zero
                    a, b = acc[o], acc[p]
                    for k in range(L):  # vectorised along the window
                        u0, u1, u2, u3 = x0[k], x1[k], x2[k], x3[k]
                        a[k] += d00 * u0 + d01 * u1 + d02 * u2 + d03 * u3
                        b[k] += d10 * u0 + d11 * u1 + d12 * u2 + d13 * u3


@njit(inline="always")
def _four(d, q, Wo, zero):
    """d[q : q + 4], 0 past Wo."""
    return (d[q], d[q + 1] if q + 1 < Wo else zero, d[q + 2] if q + 2 < Wo else zero, d[q + 3] if q + 3 < Wo else zero)


@njit(inline="always")
def _store(y, n, r, q, o, s0, s1, s2, bias):
    """y[n, o + t, r, q] = s_t + bias[o + t] for the channels t < 3 that exist."""
    O = y.shape[1]
    y[n, o, r, q] = s0 + bias[o]
    if o + 1 < O:
        y[n, o + 1, r, q] = s1 + bias[o + 1]
    if o + 2 < O:
        y[n, o + 2, r, q] = s2 + bias[o + 2]


# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------
def stacked_weights(w: np.ndarray) -> np.ndarray:
    """(O, C, kh, kw) -> (Ok, kw*kh*C): row o is w[o] ordered (j, i, c); zero rows up to Ok."""
    O, C, kh, kw = w.shape
    Ok = -(-O // OUTPUTS) * OUTPUTS
    wk = np.zeros((Ok, kw * kh * C), dtype=w.dtype)
    wk[:O] = w.transpose(0, 3, 2, 1).reshape(O, -1)
    return wk


def flipped_weights(w: np.ndarray) -> np.ndarray:
    """The kernel of the input gradient: (O, C, kh, kw) -> (C, O, kh, kw), rotated by 180 degrees."""
    return np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


def _stacked(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, Ho: int, Wo: int):
    """The stacked rows of x for an output of Ho x Wo, flattened: (N, Ho, Ws*kh*C), and the step of a pixel."""
    N, C = x.shape[:2]
    Wb = max(-(-Wo // PIXELS) * PIXELS, -(-Wo // GRAD_PIXELS) * GRAD_PIXELS)  # rounded up to whole blocks
    Ws = max((Wb - 1) * sw + kw, x.shape[3] + pw)
    xt = np.empty((N, x.shape[2], x.shape[3], C), dtype=x.dtype)
    xs = np.empty((N, Ho, Ws, kh, C), dtype=x.dtype)
    with parallel_chunksize(TASKS_PER_CHUNK):
        channels_last(x, xt)
        stack_rows(xt, kh, sh, ph, pw, Ho, xs)
    return xs.reshape(N, Ho, Ws * kh * C), sw * kh * C


def forward(x: np.ndarray, w: np.ndarray, bias: np.ndarray, stride, padding) -> np.ndarray:
    """y (N, O, Ho, Wo) = conv2d(x, w) + bias; x (N, C, H, W), w (O, C, kh, kw), bias (O,)."""
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    xs, step = _stacked(x, kh, kw, sh, sw, ph, pw, Ho, Wo)
    y = np.empty((N, O, Ho, Wo), dtype=x.dtype)
    with parallel_chunksize(TASKS_PER_CHUNK):
        correlate(xs, stacked_weights(w), bias, step, y)
    return y


def _phases(k: int, s: int, p: int, n: int):
    """Along one axis of the input gradient: for each phase a < s, the taps a, a + s, ... it reads.

    Input positions h with (h + p) % s == a (h = h0, h0 + s, ...: count m) receive
    dx[h0 + s*r] = sum_t dy[r + t - pad] * w[a + s*(T - 1 - t)], t < T: a stride-1
    correlation of dy with the T taps a::s flipped, with padding pad.
    Yields (a, h0, T, m, pad); T = 0 where no tap reads the phase (s > k).
    """
    for a in range(s):
        h0 = (a - p) % s
        if h0 >= n:
            continue
        T, m = len(range(a, k, s)), len(range(h0, n, s))
        yield a, h0, T, m, T - 1 - (h0 + p - a) // s


def input_grad(dy: np.ndarray, w: np.ndarray, bias: np.ndarray, x_hw: tuple[int, int], stride, padding) -> np.ndarray:
    """dx (N, C, H, W) of conv2d for upstream dy (N, O, Ho, Wo), plus bias[c].

    dx[n, c, h, w] = sum_{o, i, j: h = oh*sh + i - ph, w = ow*sw + j - pw} dy[n, o, oh, ow] w[o, c, i, j].
    For stride 1: the correlation of dy, padded by (kh - 1 - ph, kw - 1 - pw), with
    the flipped kernel. For stride s: the same, once per phase (h % s, w % s) of dx,
    with the taps that reach that phase (``_phases``).
    """
    _, C, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    H, W = x_hw
    dx = np.empty((dy.shape[0], C, H, W), dtype=dy.dtype)
    for a, h0, Th, Mh, pad_h in _phases(kh, sh, ph, H):
        for b, w0, Tw, Mw, pad_w in _phases(kw, sw, pw, W):
            out = dx[:, :, h0::sh, w0::sw]  # (N, C, Mh, Mw)
            if Th == 0 or Tw == 0:
                out[...] = bias[None, :, None, None]
                continue
            ds, step = _stacked(dy, Th, Tw, 1, 1, pad_h, pad_w, Mh, Mw)
            with parallel_chunksize(TASKS_PER_CHUNK):
                correlate(ds, stacked_weights(flipped_weights(w[:, :, a::sh, b::sw])), bias, step, out)
    return dx


def weight_grad(dy: np.ndarray, x: np.ndarray, kernel: tuple[int, int], stride, padding) -> np.ndarray:
    """dW (O, C, kh, kw) of conv2d for upstream dy (N, O, Ho, Wo) and input x (N, C, H, W)."""
    O = dy.shape[1]
    C = x.shape[1]
    kh, kw = kernel
    xs, step = _stacked(x, kh, kw, *stride, *padding, dy.shape[2], dy.shape[3])
    dwk = _summed(xs, step, dy, kw * kh * C)  # (O, kw*kh*C), rows as stacked_weights
    return dwk.reshape(O, kw, kh, C).transpose(0, 3, 2, 1).copy()


def backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, stride, padding) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dW) of conv2d for upstream dy (N, O, Ho, Wo), input x (N, C, H, W), weight w (O, C, kh, kw).

    Stride 1: both from one stacked copy of dy. The input gradient correlates
    the stacked dy with the flipped kernel wf = ``flipped_weights(w)`` (C, O, kh, kw):

        dx[n, c, h, w] = dot(window_ds(n, h, w), wf[c])
        dwf[c]         = sum_{n, h, w} x[n, c, h, w] * window_ds(n, h, w)

    The second line is dW's sum over pixels regrouped by input pixel (h, w):
    the window of dy that the input gradient reads at (h, w) holds every
    dy[n, o, h - i, w - j] that meets x[n, c, h, w] through tap (i, j)
    (docs/derivations/conv.md, "What the fast path computes"). So it is
    ``weight_sums`` with x in dy's usual place, x is not stacked, and dwf
    flipped back is dW.
    Stride s > 1: the input gradient splits into s*s phases, each with a few taps,
    and summing the weight gradient per phase measured up to 2x slower than
    stacking x once (``weight_grad``); so there the two passes are separate.
    """
    O, C, kh, kw = w.shape
    if tuple(stride) != (1, 1):
        dx = input_grad(dy, w, np.zeros(C, dtype=dy.dtype), x.shape[2:], stride, padding)
        return dx, weight_grad(dy, x, (kh, kw), stride, padding)
    (ph, pw), (H, W) = padding, x.shape[2:]
    ds, step = _stacked(dy, kh, kw, 1, 1, kh - 1 - ph, kw - 1 - pw, H, W)
    dx = np.empty(x.shape, dtype=dy.dtype)
    with parallel_chunksize(TASKS_PER_CHUNK):
        correlate(ds, stacked_weights(flipped_weights(w)), np.zeros(C, dy.dtype), step, dx)
    dwf = _summed(ds, step, x, kw * kh * O)  # (C, kw*kh*O): d loss / d stacked_weights(wf)
    return dx, dwf.reshape(C, kw, kh, O).transpose(3, 0, 2, 1)[:, :, ::-1, ::-1].copy()


def _summed(xs: np.ndarray, step: int, g: np.ndarray, L: int) -> np.ndarray:
    """(G, L): row o = sum over the pixels (n, r, q) of g[n, o, r, q] * window(n, r, q); g (N, G, R, Q).

    The rows (n, r) are cut into BANDS_PER_THREAD bands per thread, each summed by
    ``weight_sums`` into its own copy, and the copies are added here.
    """
    rows = g.shape[0] * g.shape[2]
    bands = BANDS_PER_THREAD * get_num_threads()
    cuts = np.linspace(0, rows, min(bands, rows) + 1).astype(np.int64)
    parts = np.empty((len(cuts) - 1, g.shape[1], L), dtype=g.dtype)
    with parallel_chunksize(1):
        weight_sums(xs, g, step, cuts, parts)
    return parts.sum(axis=0)
