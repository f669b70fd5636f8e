"""conv2d and conv_transpose2d on the GPU with numba.cuda: forward and backward.

Every pass is one matrix product, computed without building the im2col matrix
("implicit GEMM"): the kernels fetch each matrix element straight from the
feature map while they load it into shared memory.

    x (N,C,H,W), weight (O,C,kh,kw), y (N,O,Ho,Wo), float32, NCHW.
    Ho = (H + 2*pad_h - kh) // stride_h + 1, likewise Wo.
    k = (c, i, j) runs over C*kh*kw, p = (n, oh, ow) over N*Ho*Wo.

    forward   y[o, p]  = sum_k  W[o, k] * X[k, p]     M=O, N=N*Ho*Wo, K=C*kh*kw
    dx        dx[c, q] = sum_k' W[o, c, i, j] * DY[k', q]
                                     k' = (o,i,j), q = (n,ih,iw)   M=C, N=N*H*W, K=O*kh*kw
    dweight   dW[o, k] = sum_p  dy[o, p] * X[k, p]    M=O, N=C*kh*kw, reduce over N*Ho*Wo
    dbias     db[o]    = sum_p  dy[o, p]

with the im2col matrix X[k, p] = x[n, c, oh*stride - pad + i, ow*stride - pad + j]
(0 outside the map) and DY[k', q] = dy[n, o, (ih + pad - i)/stride, (iw + pad - j)/stride]
(0 where the division is not exact or the position is outside dy).

Why dx needs no atomic adds: the scatter form of the backward ("every output
pixel adds W * dy into kh*kw input pixels") has many threads writing the same
dx element. We use the gather form instead: the thread that owns dx[n,c,ih,iw]
visits every (o, i, j) whose output position (ih + pad - i)/stride lands on
the grid and sums the products itself. Each dx element has exactly one writer.
dweight reduces over N*Ho*Wo, far more than one block should loop over, so it
is split over blocks ("split-K"): each block writes its partial sum to its own
slice of a buffer and a second kernel adds the slices, again without atomics,
so results are deterministic.

conv_transpose2d (weight (C_in, C_out, kh, kw) as in PyTorch) is the adjoint
of conv2d in x, so it reuses the same kernels with the roles swapped:
    forward  = conv2d's dx of its input            (C_in plays O, C_out plays C)
    dx       = conv2d forward of dy
    dweight  = conv2d's dweight with (dy := x, x := dy)
    dbias    = sum of dy over (N, H, W)

The gather kernel (forward, dx): thread/block mapping
-----------------------------------------------------
A block computes a BM x BN tile of the output matrix (BM output channels by BN
output pixels; 64 x 64 by default) with (BM/TM) * (BN/TN) threads (256). Each
thread owns a TM x TN micro-tile (4 x 4) held in registers: rows
ty, ty + BM/TM, ty + 2*BM/TM, ... and columns tx, tx + BN/TN, ... The strided
layout makes a warp read shared memory without bank conflicts and write
neighbouring pixels of y (coalesced stores).
The reduction dimension K advances BK (16) at a time. Per step the block
  1. loads the weight tile As[BK, BM] (consecutive threads read consecutive k
     of one weight row: coalesced),
  2. gathers the input tile Bs[BK, BN]: this is the im2col step. Each thread
     always loads the same column p (its pixel (n, oh, ow) is decoded once,
     before the loop); consecutive threads take consecutive pixels, so the
     reads from x are coalesced,
  3. syncthreads, then every thread does TM*TN fused multiply-adds per k
     from values it reads out of shared memory (TM + TN reads for TM*TN
     FMAs: the point of the micro-tile), and syncthreads again.
Per k the index table ktab[:, k] (built on the host, K entries) gives the
weight offset, the channel offset in the source map and the tap (i, j), so the
loops over K do no integer division (except dx with stride > 1, which divides
by the stride to find the output pixel). The grid is (ceil(N/BN), ceil(M/BM))
blocks of GEMM-columns x GEMM-rows.

The accumulators are ``cuda.local.array``s indexed by loops with constant trip
counts (TM, TN are compile-time constants), which LLVM unrolls and keeps in
registers: ptxas reports no local memory for the default tile on sm_90
(8x8 micro-tiles did spill into a stack frame; see the Tile docstring).

The dweight kernel: the same block/thread/micro-tile mapping on the GEMM
(O rows) x (C*kh*kw columns), reducing over pixels: each thread always loads
the same pixel row r of the step, decodes it once per step and uses it for
both its dy and its x loads. The grid is (ceil(C*kh*kw/BN), ceil(O/BM), Z):
block z handles pixels [z*chunk, (z+1)*chunk), and Z is chosen so that about
TARGET_BLOCKS blocks run (for (8,64,128,128) -> 64 there are only 9 output
tiles, so Z = 114 chunks of 1152 pixels).

dbias (channel_sum): one block per channel, each thread sums a strided slice
of that channel over the batch, then a tree reduction in shared memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ...checks import pair
from .device import empty, is_simulator, require_cuda, to_device


@dataclass(frozen=True)
class Tile:
    """Block tile sizes; compile-time constants of the kernels.

    bm x bn is the output tile of a block, tm x tn the micro-tile of a thread,
    bk the depth of the reduction staged in shared memory per step, reduce
    the threads per block of the two reduction kernels (a power of 2). The
    default suits a GPU; the tests run a tiny tile so that the simulator,
    which runs each thread in Python, stays fast. benchmarks/bench_cuda.py
    times a few alternatives beside the default. Register use on sm_90 (ptxas,
    numba-cuda 0.30): 64x64x16/4x4 (256 threads) 106 registers for the gather
    kernel, 96 for dweight; 64x64x16/8x4 160; 8x8 micro-tiles left the
    accumulators in local memory.
    """

    bm: int = 64
    bn: int = 64
    bk: int = 16
    tm: int = 4
    tn: int = 4
    reduce: int = 256

    @property
    def threads(self) -> int:
        return (self.bm // self.tm) * (self.bn // self.tn)

    def check(self) -> None:
        t = self.threads
        ok = (
            self.bm % self.tm == 0
            and self.bn % self.tn == 0
            and t % self.bn == 0
            and t % self.bk == 0
            and (self.bm * self.bk) % t == 0
            and (self.bn * self.bk) % t == 0
            and t <= 1024
            and 0 < self.reduce <= 1024
            and self.reduce & (self.reduce - 1) == 0
        )
        if not ok:
            raise ValueError(
                f"unsupported tile {self}: the load loops need threads % bn == 0, "
                "threads % bk == 0 and bm*bk, bn*bk multiples of threads; "
                "reduce must be a power of 2"
            )


DEFAULT_TILE = Tile()
# The tile a wrapper uses when given none, on the CUDA simulator: it runs every
# thread of a block as a Python thread, so 16 threads a block instead of 256
# keep a whole model's training step testable (tests/test_model_cuda.py). The
# arithmetic is the same; only dweight's split-K partial sums are grouped
# differently (float32 rounding).
SIMULATOR_TILE = Tile(bm=4, bn=16, bk=4, tm=2, tn=2, reduce=16)
# numba.cuda, bound by _kernels() on first use so that importing this file
# never loads it. The kernels must reach it as a module global: the CUDA
# simulator swaps the globals that name numba.cuda for its fake module.
cuda = None

TARGET_BLOCKS = 1024  # split-K aims at about this many blocks (several waves on any GPU)
SIMULATOR_TARGET_BLOCKS = 8  # the simulator starts every block's threads in Python: few blocks


@lru_cache(maxsize=None)
def _kernels(tile: Tile):
    """Compile (lazily, once per tile) the four kernels; returns them in a dict."""
    global cuda
    tile.check()
    cuda = require_cuda()
    BM, BN, BK, TM, TN = tile.bm, tile.bn, tile.bk, tile.tm, tile.tn
    TX = BN // TN  # threads along a tile row (pixels / k columns)
    TY = BM // TM  # threads along a tile column (channels)
    T = TX * TY  # threads per block
    A_LOADS = BM * BK // T  # shared-memory elements each thread loads per step
    B_LOADS = BN * BK // T
    B_KSTEP = T // BN  # gather kernel: rows of Bs loaded together
    R_STEP = T // BK  # dweight kernel: columns loaded together
    RT = tile.reduce  # threads per block of the reduction kernels
    BM1, BN1 = BM + 1, BN + 1  # padded shared-memory rows (shapes must be constants, not expressions)

    @cuda.jit
    def gemm_gather(
        a, a_mstride, src, src_img, Hs, Ws, ktab, K, mul_h, mul_w, div_h, div_w, Ht, Wt, P, M, bias, has_bias, out
    ):
        """out[n, m, th, tw] = sum_k A[m, k] * B[k, p] (+ bias[m]), p = (n, th, tw).

        A[m, k] = a[m * a_mstride + ktab[0, k]]                 (the weights)
        B[k, p] = src[n * src_img + ktab[1, k] + h * Ws + w]     (the gather)
            h = (th * mul_h + ktab[2, k]) / div_h, w likewise; 0 unless the
            division is exact and (h, w) lies inside the Hs x Ws source map.
        forward: mul = stride, div = 1, ktab[2] = i - pad; dx: mul = 1,
        div = stride, ktab[2] = pad - i (see the module docstring).
        """
        tid = cuda.threadIdx.x
        tx = tid % TX
        ty = tid // TX
        m0 = cuda.blockIdx.y * BM
        p0 = cuda.blockIdx.x * BN
        As = cuda.shared.array((BK, BM1), np.float32)  # +1: no bank conflicts on the transposed store
        Bs = cuda.shared.array((BK, BN), np.float32)
        acc = cuda.local.array((TM, TN), np.float32)
        a_reg = cuda.local.array(TM, np.float32)
        b_reg = cuda.local.array(TN, np.float32)
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = np.float32(0.0)

        # The pixel this thread gathers for, decoded once.
        pb = tid % BN
        p = p0 + pb
        HWt = Ht * Wt
        n = p // HWt
        rem = p - n * HWt
        th = rem // Wt
        h_base = th * mul_h
        w_base = (rem - th * Wt) * mul_w
        src_base = n * src_img

        for k0 in range(0, K, BK):
            for q in range(A_LOADS):  # As[kk, mm] = A[m0 + mm, k0 + kk]
                e = tid + T * q
                kk = e % BK
                mm = e // BK
                v = np.float32(0.0)
                if m0 + mm < M and k0 + kk < K:
                    v = a[(m0 + mm) * a_mstride + ktab[0, k0 + kk]]
                As[kk, mm] = v
            for q in range(B_LOADS):  # Bs[kk, pb] = B[k0 + kk, p]: im2col on the fly
                kk = tid // BN + B_KSTEP * q
                k = k0 + kk
                v = np.float32(0.0)
                if p < P and k < K:
                    h = h_base + ktab[2, k]
                    w = w_base + ktab[3, k]
                    ok = True
                    if div_h != 1:  # only dx / conv_transpose with stride > 1
                        ok = h % div_h == 0
                        h = h // div_h
                    if div_w != 1:
                        ok = ok and w % div_w == 0
                        w = w // div_w
                    if ok and h >= 0 and h < Hs and w >= 0 and w < Ws:
                        v = src[src_base + ktab[1, k] + h * Ws + w]
                Bs[kk, pb] = v
            cuda.syncthreads()
            for kk in range(BK):  # the micro-tile update, all in registers
                for i in range(TM):
                    a_reg[i] = As[kk, ty + i * TY]
                for j in range(TN):
                    b_reg[j] = Bs[kk, tx + j * TX]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += a_reg[i] * b_reg[j]
            cuda.syncthreads()

        for j in range(TN):
            pj = p0 + tx + j * TX
            if pj < P:
                nj = pj // HWt
                base = nj * M * HWt + (pj - nj * HWt)  # out[nj, 0, th, tw]
                for i in range(TM):
                    m = m0 + ty + i * TY
                    if m < M:
                        v = acc[i, j]
                        if has_bias:
                            v += bias[m]
                        out[base + m * HWt] = v

    @cuda.jit
    def gemm_dweight(dy, x, x_img, H, W, ktab, K, stride_h, stride_w, Ho, Wo, P, O, chunk, part):
        """part[z, o, k] = sum over pixels p in chunk z of dy[o, p] * X[k, p].

        dy (N,O,Ho,Wo) and x (N,C,H,W) flat; X[k, p] = x[n, c, oh*s + ktab[2,k],
        ow*s + ktab[3,k]] with ktab[1, k] = c*H*W. part is (Z, O, K) flat.
        """
        tid = cuda.threadIdx.x
        tx = tid % TX
        ty = tid // TX
        m0 = cuda.blockIdx.y * BM  # output channels
        c0 = cuda.blockIdx.x * BN  # columns k = (c, i, j)
        z = cuda.blockIdx.z
        As = cuda.shared.array((BK, BM1), np.float32)  # As[r, mm] = dy[m0 + mm, pixel r]
        Bs = cuda.shared.array((BK, BN1), np.float32)  # Bs[r, cc] = X[c0 + cc, pixel r]
        acc = cuda.local.array((TM, TN), np.float32)
        a_reg = cuda.local.array(TM, np.float32)
        b_reg = cuda.local.array(TN, np.float32)
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = np.float32(0.0)

        HWo = Ho * Wo
        r = tid % BK  # the pixel row this thread loads, every step
        p_begin = z * chunk
        p_end = min(p_begin + chunk, P)
        for ps in range(p_begin, p_end, BK):
            p = ps + r
            valid = p < p_end
            n = p // HWo
            rem = p - n * HWo
            oh = rem // Wo
            h_base = oh * stride_h
            w_base = (rem - oh * Wo) * stride_w
            dy_base = n * O * HWo + rem
            x_base = n * x_img
            for q in range(A_LOADS):
                mm = tid // BK + R_STEP * q
                v = np.float32(0.0)
                if valid and m0 + mm < O:
                    v = dy[dy_base + (m0 + mm) * HWo]
                As[r, mm] = v
            for q in range(B_LOADS):
                cc = tid // BK + R_STEP * q
                k = c0 + cc
                v = np.float32(0.0)
                if valid and k < K:
                    h = h_base + ktab[2, k]
                    w = w_base + ktab[3, k]
                    if h >= 0 and h < H and w >= 0 and w < W:
                        v = x[x_base + ktab[1, k] + h * W + w]
                Bs[r, cc] = v
            cuda.syncthreads()
            for rr in range(BK):
                for i in range(TM):
                    a_reg[i] = As[rr, ty + i * TY]
                for j in range(TN):
                    b_reg[j] = Bs[rr, tx + j * TX]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += a_reg[i] * b_reg[j]
            cuda.syncthreads()

        out_base = z * O * K
        for i in range(TM):
            m = m0 + ty + i * TY
            if m < O:
                for j in range(TN):
                    k = c0 + tx + j * TX
                    if k < K:
                        part[out_base + m * K + k] = acc[i, j]

    @cuda.jit
    def sum_slices(part, Z, L, out):
        """out[l] = sum_z part[z * L + l]: adds the split-K partial sums, one thread per l."""
        l = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if l < L:
            s = np.float32(0.0)
            for z in range(Z):
                s += part[z * L + l]
            out[l] = s

    @cuda.jit
    def channel_sum(dy, N, C, HW, out):
        """out[c] = sum over n, pixels of dy[n, c, :]: one block per channel c,
        a strided loop per thread, then a tree reduction in shared memory."""
        c = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        buf = cuda.shared.array(RT, np.float32)
        s = np.float32(0.0)
        for n in range(N):
            base = (n * C + c) * HW
            for r in range(tid, HW, RT):
                s += dy[base + r]
        buf[tid] = s
        cuda.syncthreads()
        half = RT // 2
        while half > 0:
            if tid < half:
                buf[tid] += buf[tid + half]
            cuda.syncthreads()
            half //= 2
        if tid == 0:
            out[c] = buf[0]

    return {
        "gemm_gather": gemm_gather,
        "gemm_dweight": gemm_dweight,
        "sum_slices": sum_slices,
        "channel_sum": channel_sum,
    }


# ---------------------------------------------------------------------------
# Index tables: ktab[:, k] = (weight offset, source channel offset, tap_h, tap_w)
# Built once per geometry on the host (K entries) and kept on the device.


@lru_cache(maxsize=128)
def _forward_table(C, kh, kw, H, W, ph, pw):
    """k = (c, i, j): A[o, k] = W[o, k] (offset k), source x channel c, tap (i - pad)."""
    c, i, j = np.meshgrid(np.arange(C), np.arange(kh), np.arange(kw), indexing="ij")
    tab = np.stack([np.arange(C * kh * kw), (c * H * W).ravel(), (i - ph).ravel(), (j - pw).ravel()])
    return to_device(tab.astype(np.int32))


@lru_cache(maxsize=128)
def _transposed_table(O, C, kh, kw, Ho, Wo, ph, pw):
    """k' = (o, i, j): A[c, k'] = W[o, c, i, j] at c*kh*kw + (o*C*kh*kw + i*kw + j),
    source dy channel o, tap (pad - i), divided by the stride in the kernel."""
    o, i, j = np.meshgrid(np.arange(O), np.arange(kh), np.arange(kw), indexing="ij")
    tab = np.stack([(o * C * kh * kw + i * kw + j).ravel(), (o * Ho * Wo).ravel(), (ph - i).ravel(), (pw - j).ravel()])
    return to_device(tab.astype(np.int32))


# ---------------------------------------------------------------------------
# Host wrappers. They take numba device arrays (NumPy arrays are copied to the
# device first) and return device arrays; nothing is copied back. ``tile``: a
# Tile, or None for DEFAULT_TILE (SIMULATOR_TILE on the CUDA simulator).


def _check_array(a, name, ndim):
    """dtype and rank of one argument (None passes), checked before the GPU is touched."""
    if a is None:
        return
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise ValueError(f"{name} must be float32 for the GPU kernels, got {a.dtype}")
    if len(a.shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")


def _stride_padding(stride, padding):
    (sh, sw), (ph, pw) = pair(stride, "stride"), pair(padding, "padding")
    if sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got ({sh},{sw}), ({ph},{pw})")
    return (sh, sw), (ph, pw)


def _on_device(*arrays):
    """The checked arguments as device arrays (NumPy arrays are copied over; None stays)."""
    out = []
    for a in arrays:
        d = None if a is None else to_device(a)
        if d is not None and not d.is_c_contiguous():
            raise ValueError("the GPU kernels need C-contiguous arrays")
        out.append(d)
    return out


def _resolve_tile(tile):
    """The tile to launch with: ``tile``, else DEFAULT_TILE (SIMULATOR_TILE on the simulator)."""
    if tile is not None:
        return tile
    return SIMULATOR_TILE if is_simulator() else DEFAULT_TILE


def _out_size(H, W, kh, kw, sh, sw, ph, pw):
    """(Ho, Wo) of conv2d, or a ValueError when the geometry gives no output."""
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"no output: input {H}x{W}, kernel {kh}x{kw}, stride ({sh},{sw}), padding ({ph},{pw})")
    return Ho, Wo


def _checked_forward(x, weight, bias, stride, padding, transposed):
    """The arguments of a forward (conv2d, or conv_transpose2d with weight (C_in, C_out, ...)); -> stride, padding."""
    _check_array(x, "x", 4)
    _check_array(weight, "weight", 4)
    _check_array(bias, "bias", 1)
    c_in, c_out = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    if c_in != x.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} expects {c_in} input channels, x has {x.shape[1]}")
    if bias is not None and bias.shape[0] != c_out:
        raise ValueError(f"bias has {bias.shape[0]} entries, weight has {c_out} output channels")
    return _stride_padding(stride, padding)


def _checked_backward(dy, x, weight, stride, padding, transposed):
    """The arguments of a backward: dy must have the forward's output shape; -> stride, padding."""
    _check_array(dy, "dy", 4)
    (sh, sw), (ph, pw) = _checked_forward(x, weight, None, stride, padding, transposed)
    N, _, H, W = x.shape
    _, _, kh, kw = weight.shape
    if transposed:
        expect = (N, weight.shape[1], (H - 1) * sh - 2 * ph + kh, (W - 1) * sw - 2 * pw + kw)
    else:
        expect = (N, weight.shape[0]) + _out_size(H, W, kh, kw, sh, sw, ph, pw)
    if tuple(dy.shape) != expect:
        raise ValueError(
            f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"dy {tuple(dy.shape)} (expected {expect})"
        )
    return (sh, sw), (ph, pw)


def _gather_gemm(tile, a, a_mstride, src, tab, K, mul, div, out_shape, bias):
    """Launch gemm_gather: out (N, M, Ht, Wt) from the source map src (N, Cs, Hs, Ws)."""
    N, M, Ht, Wt = out_shape
    _, Cs, Hs, Ws = src.shape
    out = empty(out_shape, np.float32)
    P = N * Ht * Wt
    if out.size == 0:
        return out
    if K == 0:
        raise ValueError("conv with zero input channels is not supported on the GPU")
    grid = (math.ceil(P / tile.bn), math.ceil(M / tile.bm))
    has_bias = bias is not None
    _kernels(tile)["gemm_gather"][grid, tile.threads](
        a.reshape(-1),
        a_mstride,
        src.reshape(-1),
        Cs * Hs * Ws,
        Hs,
        Ws,
        tab,
        K,
        mul[0],
        mul[1],
        div[0],
        div[1],
        Ht,
        Wt,
        P,
        M,
        bias if has_bias else out.reshape(-1),
        has_bias,
        out.reshape(-1),
    )
    return out


def _dweight(tile, dy, x, kh, kw, stride, padding):
    """dW (O, C, kh, kw) = sum over pixels of dy (N,O,Ho,Wo) times im2col(x (N,C,H,W))."""
    N, O, Ho, Wo = dy.shape
    _, C, H, W = x.shape
    K = C * kh * kw
    P = N * Ho * Wo
    dw = empty((O, C, kh, kw), np.float32)
    if P == 0:
        _zero(tile, dw)
        return dw
    tiles = math.ceil(K / tile.bn) * math.ceil(O / tile.bm)
    steps = math.ceil(P / tile.bk)
    target = SIMULATOR_TARGET_BLOCKS if is_simulator() else TARGET_BLOCKS
    Z = min(steps, max(1, math.ceil(target / tiles)), 65535)
    chunk = math.ceil(steps / Z) * tile.bk
    Z = math.ceil(P / chunk)
    part = dw.reshape(-1) if Z == 1 else empty((Z * O * K,), np.float32)
    tab = _forward_table(C, kh, kw, H, W, padding[0], padding[1])
    k = _kernels(tile)
    k["gemm_dweight"][(math.ceil(K / tile.bn), math.ceil(O / tile.bm), Z), tile.threads](
        dy.reshape(-1), x.reshape(-1), C * H * W, H, W, tab, K, stride[0], stride[1], Ho, Wo, P, O, chunk, part
    )
    if Z > 1:
        L = O * K
        k["sum_slices"][math.ceil(L / tile.reduce), tile.reduce](part, Z, L, dw.reshape(-1))
    return dw


def _channel_sum(tile, dy):
    """db (C,) = dy (N, C, H, W) summed over N, H, W."""
    N, C, H, W = dy.shape
    db = empty((C,), np.float32)
    if C:
        _kernels(tile)["channel_sum"][C, tile.reduce](dy.reshape(-1), N, C, H * W, db)
    return db


def _zero(tile, d):
    """Fill a device array with zeros (for degenerate empty-batch gradients)."""
    flat = d.reshape(-1)
    _kernels(tile)["sum_slices"][math.ceil(flat.size / tile.reduce), tile.reduce](flat, 0, flat.size, flat)


def conv2d_forward_cuda(x, weight, bias=None, stride=1, padding=0, tile=None):
    """y = conv2d(x, weight) + bias on the GPU (cross-correlation, as PyTorch).

    x (N, C, H, W), weight (O, C, kh, kw), bias (O,) or None; float32 device
    arrays (NumPy arrays are copied over). stride, padding: int or pair.
    Returns y (N, O, Ho, Wo) as a device array.
    """
    (sh, sw), (ph, pw) = _checked_forward(x, weight, bias, stride, padding, transposed=False)
    N, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    Ho, Wo = _out_size(H, W, kh, kw, sh, sw, ph, pw)
    tile = _resolve_tile(tile)
    x, weight, bias = _on_device(x, weight, bias)
    tab = _forward_table(C, kh, kw, H, W, ph, pw)
    return _gather_gemm(tile, weight, C * kh * kw, x, tab, C * kh * kw, (sh, sw), (1, 1), (N, O, Ho, Wo), bias)


def conv2d_backward_cuda(dy, x, weight, stride=1, padding=0, tile=None):
    """Gradients of conv2d on the GPU: (dx, dweight, dbias), device arrays.

    dy (N, O, Ho, Wo), x (N, C, H, W), weight (O, C, kh, kw).
        dx[n,c,ih,iw] = sum_{o,i,j} W[o,c,i,j] dy[n,o,(ih+p-i)/s,(iw+p-j)/s]  (exact divisions)
        dW[o,c,i,j]   = sum_{n,oh,ow} dy[n,o,oh,ow] x[n,c,oh*s-p+i,ow*s-p+j]
        db[o]         = sum_{n,oh,ow} dy[n,o,oh,ow]
    """
    (sh, sw), (ph, pw) = _checked_backward(dy, x, weight, stride, padding, transposed=False)
    H, W = x.shape[2:]
    kh, kw = weight.shape[2:]
    tile = _resolve_tile(tile)
    dy, x, weight = _on_device(dy, x, weight)
    dx = _conv2d_dx(tile, dy, weight, (H, W), (sh, sw), (ph, pw), None)
    dw = _dweight(tile, dy, x, kh, kw, (sh, sw), (ph, pw))
    return dx, dw, _channel_sum(tile, dy)


def _conv2d_dx(tile, dy, weight, in_hw, stride, padding, bias):
    """conv2d's input gradient (N, C, H, W) from dy (N, O, Ho, Wo): the transposed gather."""
    N, O, Ho, Wo = dy.shape
    _, C, kh, kw = weight.shape
    tab = _transposed_table(O, C, kh, kw, Ho, Wo, padding[0], padding[1])
    return _gather_gemm(tile, weight, kh * kw, dy, tab, O * kh * kw, (1, 1), stride, (N, C) + tuple(in_hw), bias)


def conv_transpose2d_forward_cuda(x, weight, bias=None, stride=1, padding=0, tile=None):
    """y = conv_transpose2d(x, weight) + bias on the GPU (PyTorch's, output_padding 0).

    x (N, C_in, H, W), weight (C_in, C_out, kh, kw), bias (C_out,) or None.
    Returns y (N, C_out, (H-1)*s - 2p + kh, (W-1)*s - 2p + kw): conv2d's dx of x.
    """
    (sh, sw), (ph, pw) = _checked_forward(x, weight, bias, stride, padding, transposed=True)
    H, W = x.shape[2:]
    kh, kw = weight.shape[2:]
    Hout, Wout = (H - 1) * sh - 2 * ph + kh, (W - 1) * sw - 2 * pw + kw
    if Hout < 1 or Wout < 1:
        raise ValueError(f"conv_transpose2d gives no output for input {H}x{W}")
    tile = _resolve_tile(tile)
    x, weight, bias = _on_device(x, weight, bias)
    return _conv2d_dx(tile, x, weight, (Hout, Wout), (sh, sw), (ph, pw), bias)


def conv_transpose2d_backward_cuda(dy, x, weight, stride=1, padding=0, tile=None):
    """Gradients of conv_transpose2d on the GPU: (dx, dweight, dbias), device arrays.

    dy (N, C_out, Hout, Wout), x (N, C_in, H, W), weight (C_in, C_out, kh, kw).
    As the adjoint of conv2d: dx = conv2d(dy, W), dW = conv2d's dweight with
    (dy := x, x := dy), db = dy summed over (N, H, W).
    """
    (sh, sw), (ph, pw) = _checked_backward(dy, x, weight, stride, padding, transposed=True)
    kh, kw = weight.shape[2:]
    tile = _resolve_tile(tile)
    dy, x, weight = _on_device(dy, x, weight)
    dx = conv2d_forward_cuda(dy, weight, None, (sh, sw), (ph, pw), tile)
    dw = _dweight(tile, x, dy, kh, kw, (sh, sw), (ph, pw))
    return dx, dw, _channel_sum(tile, dy)
