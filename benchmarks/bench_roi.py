"""RoIAlign on the CPU: Numba kernels vs the readable reference (vs torch where it has one).

The setting of the paper's box head: K RoIs (512 sampled per image in
training, up to 2000 proposals) pooled to 256 x 7 x 7 with sampling_ratio 2
from the FPN pyramid of an 800 x 800 image, P2..P5 = 200, 100, 50, 25 cells,
each RoI from the level the FPN LevelMapper picks.

Rows
----
* transpose: ``channels_last`` of the four levels, once per image (the kernels
  gather along contiguous channels; the model can share one conversion
  between the box and the mask poolers). Reported apart, never hidden.
* kernel: the four per-level Numba kernel calls on pre-converted maps.
* pooler: MultiScaleRoIAlign.forward/backward on pre-converted maps
  (adds input checks, the level mapping and the scatter back to RoI order).
* reference: the readable NumPy reference, timed on a subset of the RoIs
  and scaled to K (it is linear in K), as the row says.
* torch: torchvision.ops.roi_align when importable (torch alone has none).

Times are the minimum and the median wall time of repeated runs, and the
minimum CPU time of the process (all threads); us/RoI is min wall / K. The
machine may be shared: the minimum is the least disturbed run, and the load
average is printed with the table. (OpenMP threads that spin while they
wait for a descheduled sibling made the 2-thread backward 3x slower than 1
thread on a loaded machine; tinymrcnn starts Numba's pool with passive
waiting, ``tinymrcnn/kernels/cpu/__init__.py``.) Usage:

    python benchmarks/bench_roi.py [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

try:  # torch before tinymrcnn: it then keeps its own OpenMP runtime and wait policy
    import torch  # noqa: F401  (tinymrcnn/kernels/cpu/__init__.py)
except ImportError:
    pass

from tinymrcnn.kernels.cpu.roi_align import channels_last, roi_align_backward_stripes, roi_align_forward_nhwc
from tinymrcnn.model.poolers import MultiScaleRoIAlign
from tinymrcnn.ops.roi_align import roi_align_backward_reference, roi_align_reference

C, OUT, SAMPLING, IMAGE = 256, 7, 2, 800
SIZES = (200, 100, 50, 25)


def proposals(k, rng):
    """k boxes of an 800x800 image, sides log-uniform in [16, 600] px: every level gets some."""
    centre = rng.uniform(0, IMAGE, (k, 2))
    side = np.exp(rng.uniform(np.log(16), np.log(600), (k, 1))) * rng.uniform(0.7, 1.4, (k, 2))
    boxes = np.clip(np.concatenate([centre - side / 2, centre + side / 2], axis=1), 0, IMAGE)
    return np.concatenate([np.zeros((k, 1)), boxes], axis=1)


def timeit(fn, repeats):
    """(min wall, median wall, min CPU time of this process) in seconds.

    On a shared machine the wall time of a parallel kernel suffers when another
    process takes a core; the CPU time (all threads together) does not, so it
    is printed too: with T threads and a free machine, wall ~ CPU / T.
    """
    fn()  # compile / warm up
    ts, cs = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return min(ts), float(np.median(ts)), min(cs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="Numba threads (default: all cores)")
    ap.add_argument("--ref-rois", type=int, default=8, help="RoIs the reference is timed on")
    args = ap.parse_args()
    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((1, C, s, s)).astype(np.float32) for s in SIZES]
    rows = []

    def row(name, k, times, note=""):
        tmin, tmed, cpu = times
        rows.append((name, k, tmin * 1e3, tmed * 1e3, cpu * 1e3, tmin / k * 1e6, note))

    row(
        "transpose NCHW->NHWC, 4 levels",
        1,
        timeit(lambda: [channels_last(f) for f in feats], args.repeats),
        "once per image, not per RoI",
    )
    maps = [channels_last(f) for f in feats]
    pooler = MultiScaleRoIAlign(OUT, SAMPLING, aligned=False)
    try:
        import torch
        from torchvision.ops import roi_align as tv_roi_align
    except ImportError:
        tv_roi_align = None

    for k in (512, 2000):
        rois = proposals(k, rng)
        levels = pooler.map_levels(rois)
        split = [np.ascontiguousarray(rois[levels == lvl]) for lvl in (2, 3, 4, 5)]
        hist = "/".join(str(len(s)) for s in split)
        dy = rng.standard_normal((k, C, OUT, OUT)).astype(np.float32)
        dys = [np.ascontiguousarray(dy[levels == lvl]) for lvl in (2, 3, 4, 5)]

        level = levels - 2
        scales = np.array([2.0**-lvl for lvl in (2, 3, 4, 5)])
        index = [np.flatnonzero(level == i) for i in range(4)]
        dummy = np.zeros((1, 1, 1, 1), np.float32)

        def fwd_kernels():  # one parallel pass over all RoIs, output in RoI order
            return roi_align_forward_nhwc(
                tuple(m.data for m in maps), level, scales, rois, OUT, OUT, SAMPLING, False, False
            )

        def bwd_kernels():  # one pass per level, dx (1, C, H_l, W_l)
            return [
                roi_align_backward_stripes(dy, rois, idx, dummy, 1, s, s, sc, SAMPLING, False, False, 8)
                for idx, s, sc in zip(index, SIZES, scales)
            ]

        row("forward, numba kernels", k, timeit(fwd_kernels, args.repeats), f"RoIs per level P2..P5: {hist}")
        row(
            "forward, MultiScaleRoIAlign",
            k,
            timeit(lambda: pooler.forward(maps, rois), args.repeats),
            "+ checks, level mapping, RoI order",
        )
        row("backward, numba kernels", k, timeit(bwd_kernels, args.repeats), "dx (N, C, H, W) per level")

        def pooler_bwd():
            pooler.forward(maps, rois)
            return pooler.backward(dy)

        row("forward+backward, MultiScaleRoIAlign", k, timeit(pooler_bwd, max(3, args.repeats // 2)))

        # the reference on a few RoIs of each level, scaled to k
        sub = max(1, args.ref_rois)
        t_f = t_b = c_f = c_b = 0.0
        for f, r, g, lvl in zip(feats, split, dys, (2, 3, 4, 5)):
            if len(r) == 0:
                continue
            n = min(sub, len(r))
            t, c = time.perf_counter(), time.process_time()
            roi_align_reference(f, r[:n], OUT, 2.0**-lvl, SAMPLING)
            t_f += (time.perf_counter() - t) / n * len(r)
            c_f += (time.process_time() - c) / n * len(r)
            t, c = time.perf_counter(), time.process_time()
            roi_align_backward_reference(g[:n], f, r[:n], OUT, 2.0**-lvl, SAMPLING)
            t_b += (time.perf_counter() - t) / n * len(r)
            c_b += (time.process_time() - c) / n * len(r)
        row("forward, NumPy reference", k, (t_f, t_f, c_f), f"timed on {sub} RoIs/level, scaled")
        row("backward, NumPy reference", k, (t_b, t_b, c_b), f"timed on {sub} RoIs/level, scaled")

        if tv_roi_align is not None:
            tf = [torch.from_numpy(f) for f in feats]
            tr = [torch.from_numpy(r).float() for r in split]

            def fwd_torch():
                return [tv_roi_align(f, r, OUT, 2.0**-lvl, SAMPLING, False) for f, r, lvl in zip(tf, tr, (2, 3, 4, 5))]

            row("forward, torchvision", k, timeit(fwd_torch, args.repeats), f"torch {torch.__version__}")
        else:
            nan = float("nan")
            rows.append(
                ("forward/backward, torch", k, nan, nan, nan, nan, "n/a: torch has no roi_align without torchvision")
            )

    print(
        f"RoIAlign, {C} channels, {OUT}x{OUT}, sampling_ratio {SAMPLING}, aligned=False, float32, "
        f"FPN P2..P5 of an {IMAGE}x{IMAGE} image"
    )
    print(
        f"Numba threads: {numba.get_num_threads()}, CPU cores: {os.cpu_count()}, "
        f"load average at the end: {os.getloadavg()[0]:.2f}"
    )
    print(f"{'row':38s} {'K':>5s} {'min ms':>8s} {'median ms':>9s} {'CPU ms':>8s} {'us/RoI':>7s}  note")
    for name, k, tmin, tmed, cpu, per, note in rows:
        print(f"{name:38s} {k:5d} {tmin:8.2f} {tmed:9.2f} {cpu:8.2f} {per:7.2f}  {note}")


if __name__ == "__main__":
    main()
