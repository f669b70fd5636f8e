"""One training step and one predict() of the shapes preset, stage by stage.

    python benchmarks/bench_model.py [--batch 4] [--repeats 5] [--blas-threads 1]
                                     [--numba-threads 1] [--default-malloc]

Prints the time of each stage of the forward and the backward
(``tinymrcnn.runtime.StageTimer``, which wraps the stages' methods while it
watches), so the slowest stage is visible, and the same for predict(). Batch
of 128x128 shapes images, float32, inside ``runtime.session`` (the preset's
device and BLAS threads), as in training; ``--batch 2 --numba-threads 1`` is
one data-parallel worker's share of a step on 2 cores. The process keeps the
memory it frees, as training does (``runtime.keep_freed_memory``);
``--default-malloc`` leaves the C allocator as it is, to compare.
"""

import argparse
import time

import numpy as np

from tinymrcnn import MaskRCNN, MaskRCNNConfig, runtime
from tinymrcnn.data.shapes import ShapesDataset
from tinymrcnn.optim import AdamW


def numba_threads() -> int:
    import numba

    return numba.get_num_threads()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="BLAS threads in the runtime session (default: the preset's, "
        "MaskRCNNConfig.blas_threads; 0: one per core)",
    )
    ap.add_argument("--numba-threads", type=int, default=None, help="Numba threads (default: Numba's)")
    ap.add_argument("--default-malloc", action="store_true", help="do not call runtime.keep_freed_memory()")
    args = ap.parse_args()
    if args.numba_threads is not None:
        import numba

        numba.set_num_threads(args.numba_threads)
    if not args.default_malloc:
        runtime.keep_freed_memory()
    overrides = {}
    if args.blas_threads is not None:
        overrides["blas_threads"] = args.blas_threads
    ds = ShapesDataset(args.batch * (args.repeats + 2), seed=0)
    model = MaskRCNN(MaskRCNNConfig.shapes(**overrides), seed=0)
    opt = AdamW(model.parameters(), lr=1e-3)

    def batch(i):
        items = [ds[j] for j in range(i * args.batch, (i + 1) * args.batch)]
        return [a for a, _ in items], [b for _, b in items]

    with runtime.session(model.config):
        # Warm-up: compiles (or loads from cache) every Numba kernel.
        for i in range(2):
            images, targets = batch(i)
            runtime.compute_gradients(model, images, targets)
            opt.step()
            model.predict(images)

        timer = runtime.StageTimer()
        steps = []
        with timer.watch(model):
            for i in range(args.repeats):
                images, targets = batch(i + 2)
                t0 = time.perf_counter()
                runtime.compute_gradients(model, images, targets)
                with timer.stage("optimizer step"):
                    opt.step()
                steps.append(time.perf_counter() - t0)
        print(
            f"training step, batch {args.batch} x 128x128 (median of {args.repeats}), "
            f"blas_threads={model.config.blas_threads}, numba_threads={numba_threads()}, "
            f"{'default malloc' if args.default_malloc else 'freed memory kept'}: {1000 * np.median(steps):.0f} ms"
        )
        print(timer.table(args.repeats, total_s=sum(steps)))

        timer.reset()
        preds = []
        with timer.watch(model):
            for i in range(args.repeats):
                images, _ = batch(i + 2)
                t0 = time.perf_counter()
                model.predict(images)
                preds.append(time.perf_counter() - t0)
        print(f"\npredict(), batch {args.batch} (median of {args.repeats}): {1000 * np.median(preds):.0f} ms")
        print(timer.table(args.repeats, total_s=sum(preds)))


if __name__ == "__main__":
    main()
