"""Benchmark: conv2d forward + backward, tinymrcnn vs a plain NumPy im2col vs torch.

    python benchmarks/bench_conv.py               # the table (float32)
    python benchmarks/bench_conv.py --repeats 9   # more repeats (the median is reported)
    python benchmarks/bench_conv.py --rounds 5    # more interleaved rounds (default 3)
    python benchmarks/bench_conv.py --stat min    # the fastest repeat (a busy machine)
    python benchmarks/bench_conv.py --cold-start  # first call with an empty / a warm Numba cache
    python benchmarks/bench_conv.py --profile     # our time split into its kernels

Each row times one forward and one backward (dx, dw, db) of a convolution at
(N, C, H, W) -> O channels: 3x3 with padding 1 on three shapes, and a 1x1.
Each implementation runs in its own process, each shape with a warm-up call
and then ``--repeats`` timed calls. The processes take turns for ``--rounds``
rounds, so that the shared machine's changing load falls on all of them.
torch (``torch.nn.functional.conv2d`` + autograd) is used when importable.

"vs torch" is torch's time / ours (throughput ratio; target >= 0.7): the median
of the rounds' ratios, with their range; "vs NumPy" is the NumPy baseline's
time / ours, for reference (both are bound by the same sgemm at 256 channels,
so there is no target for it). The time columns are medians over the rounds. "path" is the
algorithm tinymrcnn picks for the shape (tinymrcnn/kernels/cpu/conv.py):
"direct" (conv_direct.py, Numba dot products), "GEMM" (shifted windows in
BLAS) or "blocks" (one GEMM per image, kernel == stride).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

try:  # torch before tinymrcnn: it then keeps its own OpenMP runtime and wait policy
    import torch  # noqa: F401  (tinymrcnn/kernels/cpu/__init__.py)
except ImportError:
    pass

import tinymrcnn.kernels.cpu.conv as kc
from tinymrcnn.ops import conv2d, conv2d_backward

SHAPES = [  # (N, C, H, W, O, k)
    (1, 256, 64, 64, 256, 3),
    (8, 32, 64, 64, 32, 3),
    (2, 64, 128, 128, 64, 3),
    (1, 256, 64, 64, 256, 1),
]


# ---------------------------------------------------------------------------
# The plain NumPy baseline: im2col by stride tricks, one matmul, col2im by adds
# ---------------------------------------------------------------------------
def numpy_conv2d(x, w, b, pad):
    """Forward; returns y and the im2col matrix (kept for the backward)."""
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))  # (N, C, Ho, Wo, kh, kw)
    Ho, Wo = win.shape[2:4]
    cols = win.transpose(1, 4, 5, 0, 2, 3).reshape(C * kh * kw, N * Ho * Wo)  # copy
    y = (w.reshape(O, -1) @ cols).reshape(O, N, Ho, Wo).transpose(1, 0, 2, 3) + b[None, :, None, None]
    return np.ascontiguousarray(y), cols


def numpy_conv2d_backward(dy, x, w, cols, pad):
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = dy.shape[2:]
    dyr = dy.transpose(1, 0, 2, 3).reshape(O, -1)  # (O, N*Ho*Wo)
    dw = (dyr @ cols.T).reshape(w.shape)
    dcols = (w.reshape(O, -1).T @ dyr).reshape(C, kh, kw, N, Ho, Wo)
    dxp = np.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=x.dtype)
    for i in range(kh):  # col2im
        for j in range(kw):
            dxp[:, :, i : i + Ho, j : j + Wo] += dcols[:, i, j].transpose(1, 0, 2, 3)
    return dxp[:, :, pad : pad + H, pad : pad + W], dw, dy.sum(axis=(0, 2, 3))


# ---------------------------------------------------------------------------
STAT = {"median": np.median, "min": np.min}


def _time_ms(fn, repeats, stat):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(STAT[stat](times))


def _torch():
    try:
        import torch
        import torch.nn.functional as F

        return torch, F
    except ImportError:
        return None, None


def _path(x_shape, w_shape, pad) -> str:
    g = kc.geometry(x_shape, w_shape, (1, 1), (pad, pad))
    return "direct" if g.direct else "blocks" if g.disjoint else "GEMM"


def _inputs(N, C, H, W, O, k):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W), dtype=np.float32)
    w = (rng.standard_normal((O, C, k, k), dtype=np.float32) / np.sqrt(C * k * k)).astype(np.float32)
    b = rng.standard_normal(O, dtype=np.float32)
    dy = rng.standard_normal((N, O, H, W), dtype=np.float32)
    return x, w, b, dy


def time_one(impl: str, repeats: int, stat: str) -> list[float]:
    """ms per forward+backward of one implementation on every shape (nan: torch not installed)."""
    torch, F = _torch() if impl == "torch" else (None, None)
    if impl == "torch" and torch is None:
        return [float("nan")] * len(SHAPES)
    times = []
    for N, C, H, W, O, k in SHAPES:
        pad = k // 2
        x, w, b, dy = _inputs(N, C, H, W, O, k)
        if impl == "tinymrcnn":

            def fb():
                conv2d(x, w, b, 1, pad)
                conv2d_backward(dy, x, w, 1, pad)
        elif impl == "numpy":

            def fb():
                _, cols = numpy_conv2d(x, w, b, pad)
                numpy_conv2d_backward(dy, x, w, cols, pad)
        else:
            tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
            tdy = torch.from_numpy(dy)

            def fb():
                tx.grad = tw.grad = tb.grad = None
                F.conv2d(tx, tw, tb, padding=pad).backward(tdy)

        times.append(_time_ms(fb, max(1, min(repeats, 3)) if impl == "numpy" else repeats, stat))
    return times


def run_table(repeats: int, stat: str, rounds: int) -> None:
    """The table. Each implementation runs in its own process: three thread pools in one
    process (Numba's, OpenBLAS's, torch's OpenMP) were measured to slow each other down
    up to 20x on 2 cores, which would make the ratios meaningless. The processes take
    turns for ``rounds`` rounds (the order reversed every other round), so that a change
    in the machine's load falls on all of them; a round gives one ratio per shape, and the
    table reports each implementation's median time and the median and range of the
    per-round ratios."""
    torch, _ = _torch()
    print(
        f"# conv2d forward+backward, float32, {stat} of {repeats} after a warm-up, "
        f"each implementation in its own process, {rounds} interleaved rounds"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}; "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}; "
        + (f"torch {torch.__version__}, {torch.get_num_threads()} threads" if torch else "torch: not installed")
    )
    impls = ["tinymrcnn", "numpy"] + (["torch"] if torch else [])
    results = {impl: [] for impl in impls}  # impl -> per round, ms per shape
    for r in range(rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--impl", impl, "--repeats", str(repeats), "--stat", stat],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[impl].append(json.loads(out.strip().splitlines()[-1]))
    times = {impl: np.array(v) for impl, v in results.items()}  # (rounds, shapes)
    head = (
        f"{'(N, C, H, W) -> O, k':<30}{'path':>7}{'tinymrcnn':>11}{'NumPy':>10}{'torch':>10}"
        f"{'vs torch':>10}{'(range)':>14}{'vs NumPy':>10}"
    )
    print(head)
    print("-" * len(head))
    for row, (N, C, H, W, O, k) in enumerate(SHAPES):
        ours, np_t = times["tinymrcnn"][:, row], times["numpy"][:, row]
        name = f"({N}, {C}, {H}, {W}) -> {O}, {k}x{k}"
        line = f"{name:<30}{_path((N, C, H, W), (O, C, k, k), k // 2):>7}{np.median(ours):>9.1f}ms{np.median(np_t):>8.1f}ms"
        if torch:
            ratios = times["torch"][:, row] / ours  # torch's time / ours, round by round
            line += (
                f"{np.median(times['torch'][:, row]):>8.1f}ms{np.median(ratios):>9.2f}x"
                f"{f'{ratios.min():.2f}-{ratios.max():.2f}':>14}"
            )
        else:
            line += f"{'-':>10}{'-':>10}{'-':>14}"
        print(line + f"{np.median(np_t / ours):>9.1f}x", flush=True)


# ---------------------------------------------------------------------------
# Profile: where the time of one forward+backward goes
# ---------------------------------------------------------------------------
def run_profile(repeats: int) -> None:
    """Time every BLAS call and every Numba kernel of the fast path."""
    import tinymrcnn.kernels.cpu.conv_direct as kd

    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    originals = {
        (kc, name): getattr(kc, name)
        for name in (
            "gemm",
            "pad_phases",
            "gather_output",
            "scatter_wide",
            "gather_phases",
            "copy_windows",
            "add_windows",
        )
    }
    originals.update(
        {(kd, name): getattr(kd, name) for name in ("channels_last", "stack_rows", "correlate", "weight_sums")}
    )
    for (module, name), fn in originals.items():
        setattr(module, name, timed("BLAS gemm" if name == "gemm" else name, fn))
    try:
        rng = np.random.default_rng(0)
        print(f"# where the time goes (min over {repeats} runs of each part; ms)")
        for N, C, H, W, O, k in SHAPES:
            pad = k // 2
            x = rng.standard_normal((N, C, H, W), dtype=np.float32)
            w = rng.standard_normal((O, C, k, k), dtype=np.float32)
            dy = rng.standard_normal((N, O, H, W), dtype=np.float32)
            best: dict[str, float] = {}
            for r in range(repeats + 1):
                spent.clear()
                t0 = time.perf_counter()
                conv2d(x, w, None, 1, pad)
                conv2d_backward(dy, x, w, 1, pad)
                spent["total"] = time.perf_counter() - t0
                if r:  # the first is a warm-up
                    for name, t in spent.items():
                        best[name] = min(best.get(name, np.inf), t)
            gflop = 3 * 2 * N * O * C * k * k * H * W / 1e9
            parts = ", ".join(f"{n} {1e3 * t:.1f}" for n, t in best.items() if n != "total")
            kernel = best.get("BLAS gemm", 0.0) + best.get("correlate", 0.0) + best.get("weight_sums", 0.0)
            print(
                f"({N}, {C}, {H}, {W}) -> {O}, {k}x{k}: total {1e3 * best['total']:.1f}: {parts}; "
                f"multiply-add rate {gflop / kernel:.0f} GFLOP/s"
            )
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)


# ---------------------------------------------------------------------------
# Cold start: the first call in a fresh process, empty and warm Numba cache
# ---------------------------------------------------------------------------
_CHILD = r"""
import time
t0 = time.perf_counter()
import numpy as np
import tinymrcnn.kernels.cpu.conv as kc
from tinymrcnn.ops import conv2d, conv2d_backward
t1 = time.perf_counter()
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 16, 32, 32), dtype=np.float32)
w = rng.standard_normal((16, 16, 3, 3), dtype=np.float32)
b = np.zeros(16, np.float32)
t2 = time.perf_counter()
y = conv2d(x, w, b, 1, 1)
conv2d_backward(np.ones_like(y), x, w, 1, 1)
t3 = time.perf_counter()
print(f"{t1 - t0:.3f} {t3 - t2:.3f}")
"""


def run_cold_start() -> None:
    print("# first conv2d forward+backward (float32, 3x3 pad 1) in a fresh process")
    print(f"{'Numba cache':<14}{'import':>10}{'first fwd+bwd':>16}")
    with tempfile.TemporaryDirectory(prefix="tinymrcnn-numba-cache-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("empty", "warm", "warm"):
            out = subprocess.run(
                [sys.executable, "-c", _CHILD], env=env, check=True, capture_output=True, text=True
            ).stdout.split()
            t_import, t_first = float(out[-2]), float(out[-1])
            print(f"{label:<14}{t_import:>9.2f}s{t_first:>15.2f}s", flush=True)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds of the table (ratios per round)")
    ap.add_argument(
        "--stat",
        choices=sorted(STAT),
        default="median",
        help="how the repeats are summarised (min: the least disturbed run)",
    )
    ap.add_argument(
        "--cold-start", action="store_true", help="measure the first call with an empty and with a warm Numba cache"
    )
    ap.add_argument("--profile", action="store_true", help="split tinymrcnn's time into its kernels")
    ap.add_argument(
        "--impl",
        choices=["tinymrcnn", "numpy", "torch"],
        help="(used by the table) time one implementation, print its times as JSON",
    )
    args = ap.parse_args(argv)
    if args.impl:
        print(json.dumps(time_one(args.impl, args.repeats, args.stat)))
    elif args.cold_start:
        run_cold_start()
    elif args.profile:
        run_profile(args.repeats)
    else:
        run_table(args.repeats, args.stat, args.rounds)


if __name__ == "__main__":
    main()
