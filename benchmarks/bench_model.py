"""One training step and one predict() of the shapes preset, stage by stage.

    python benchmarks/bench_model.py [--batch 4] [--repeats 5] [--blas-threads 1]

Prints the time of each stage of the forward and the backward (the model's
StageTimer, tinymrcnn/profiling.py), so the slowest stage is visible, and
the same for predict(). Batch of 128x128 shapes images, float32.
"""
import argparse
import time

import numpy as np

from tinymrcnn import MaskRCNN, MaskRCNNConfig
from tinymrcnn.data.shapes import ShapesDataset
from tinymrcnn.optim import AdamW
from tinymrcnn.profiling import StageTimer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="BLAS threads inside the model's passes (default: the preset's, "
                         "MaskRCNNConfig.blas_threads; 0 leaves the process's setting alone)")
    args = ap.parse_args()
    overrides = {}
    if args.blas_threads is not None:
        overrides["blas_threads"] = args.blas_threads or None
    ds = ShapesDataset(args.batch * (args.repeats + 2), seed=0)
    model = MaskRCNN(MaskRCNNConfig.shapes(**overrides), seed=0)
    opt = AdamW(model.parameters(), lr=1e-3)

    def batch(i):
        items = [ds[j] for j in range(i * args.batch, (i + 1) * args.batch)]
        return [a for a, _ in items], [b for _, b in items]

    # Warm-up: compiles (or loads from cache) every Numba kernel.
    for i in range(2):
        images, targets = batch(i)
        model.zero_grad(); model.forward_train(images, targets); model.backward(); opt.step()
        model.predict(images)

    timer = StageTimer()
    model.set_timer(timer)
    steps = []
    for i in range(args.repeats):
        images, targets = batch(i + 2)
        t0 = time.perf_counter()
        model.zero_grad()
        model.forward_train(images, targets)
        model.backward()
        with timer.stage("optimizer step"):
            opt.step()
        steps.append(time.perf_counter() - t0)
    print(f"training step, batch {args.batch} x 128x128 (median of {args.repeats}), "
          f"blas_threads={model.config.blas_threads}: {1000 * np.median(steps):.0f} ms")
    print(timer.table(args.repeats))

    timer.reset()
    preds = []
    for i in range(args.repeats):
        images, _ = batch(i + 2)
        t0 = time.perf_counter()
        model.predict(images)
        preds.append(time.perf_counter() - t0)
    print(f"\npredict(), batch {args.batch} (median of {args.repeats}): {1000 * np.median(preds):.0f} ms")
    print(timer.table(args.repeats))


if __name__ == "__main__":
    main()
