"""Training speed with one process vs data-parallel workers (tinymrcnn/parallel.py).

    python benchmarks/bench_train.py [--steps 60] [--workers 1,2]

Trains the shapes preset from scratch for ``--steps`` steps (batch 4,
128x128) once per worker count, in this one run, and prints the median time
of a step (loading the batch, forward, backward, gradient averaging and the
optimizer step; the first 10 steps, which load Numba's cache, are left out)
and the speed-up over the first worker count.
"""

import argparse
import os
import tempfile

import numpy as np

from tinymrcnn.parallel import available_cores
from tinymrcnn.train import TrainConfig, train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    args = ap.parse_args()
    counts = [int(v) for v in args.workers.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# training step, shapes preset, batch 4 x 128x128; {available_cores()} cores, load {load:.1f}")
    print(f"{'workers':>8}{'ms / step':>12}{'speed-up':>10}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            cfg = TrainConfig(
                out_dir=os.path.join(tmp, f"w{n}"),
                iters=args.steps,
                workers=n,
                num_val_images=4,
                checkpoint_every=0,
                warmup_iters=10,
            )
            hist = train(cfg, progress=False, log=lambda *a: None)["history"]
            dt = np.diff([0.0] + [r["elapsed_s"] for r in hist])[10:]
            ms = 1000 * float(np.median(dt))
            base = base or ms
            print(f"{n:>8}{ms:>12.0f}{base / ms:>9.2f}x")


if __name__ == "__main__":
    main()
