"""NMS timings: the Numba kernel against the NumPy reference (and torchvision where installed).

    python benchmarks/bench_nms.py [--repeats 5]

Boxes are drawn in clusters (like RPN proposals around objects) so that most
of them are suppressed, as at the RPN's NMS 0.7. Each row is the best of
``--repeats`` runs, after one warm-up call that compiles the Numba kernel.
torch alone has no NMS; the torchvision column is filled only when
torchvision is importable.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

try:  # torch before tinymrcnn: it then keeps its own OpenMP runtime and wait policy
    import torch  # noqa: F401  (tinymrcnn/kernels/cpu/__init__.py)
except ImportError:
    pass

from tinymrcnn.ops import nms
from tinymrcnn.ops.nms import nms_reference


def clustered_boxes(n: int, rng: np.random.Generator, image: float = 800.0):
    """n float32 boxes around n // 20 cluster centres, and random scores."""
    centres = rng.uniform(0, image, (max(n // 20, 1), 2))
    sizes = rng.uniform(16, 128, (centres.shape[0], 2))
    k = rng.integers(0, centres.shape[0], n)
    ctr = centres[k] + rng.normal(0, 0.1, (n, 2)) * sizes[k]
    wh = sizes[k] * rng.uniform(0.8, 1.25, (n, 2))
    boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1).astype(np.float32)
    return boxes, rng.random(n).astype(np.float32)


def best_time(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--iou", type=float, default=0.7)
    args = parser.parse_args()

    try:
        import torch
        import torchvision.ops

        tv_nms = torchvision.ops.nms
        torch.set_num_threads(1)
    except ImportError:
        tv_nms = None

    rng = np.random.default_rng(0)
    nms(*clustered_boxes(10, rng), args.iou)  # compile (or load the cached kernel)

    print(f"NMS at IoU {args.iou}, float32, best of {args.repeats}; {platform.processor() or platform.machine()}")
    header = (
        f"{'boxes':>7} {'kept':>6} {'numba ms':>9} {'numpy ref ms':>13} {'ref/numba':>10} "
        f"{'torchvision ms':>15} {'tv/numba':>9}"
    )
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        boxes, scores = clustered_boxes(n, rng)
        keep = nms(boxes, scores, args.iou)
        assert np.array_equal(keep, nms_reference(boxes, scores, args.iou))
        t_numba = best_time(lambda: nms(boxes, scores, args.iou), args.repeats)
        t_ref = best_time(lambda: nms_reference(boxes, scores, args.iou), max(1, args.repeats // 2))
        if tv_nms is not None:
            tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
            t_tv = best_time(lambda: tv_nms(tb, ts, args.iou), args.repeats)
            tv_cols = f"{t_tv * 1e3:15.2f} {t_tv / t_numba:9.2f}"
        else:
            tv_cols = f"{'n/a':>15} {'n/a':>9}"
        print(f"{n:7d} {keep.size:6d} {t_numba * 1e3:9.2f} {t_ref * 1e3:13.2f} {t_ref / t_numba:10.1f} {tv_cols}")
    if tv_nms is None:
        print("torchvision is not installed, so there is no torch baseline (torch itself has no NMS).")


if __name__ == "__main__":
    main()
