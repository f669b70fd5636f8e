"""The Numba CPU kernels, and the one setting they need: Numba's threading layer.

Numba runs ``prange`` loops on a thread pool from one of three layers (TBB,
OpenMP, its own "workqueue"). OpenMP's threads spin for a while after every
parallel loop; the convolution and RoIAlign kernels here run many short loops
per training step, and on a 2-core machine shared with other work the spinning
threads took the cores from each other: a training step of the shapes preset
(benchmarks/bench_model.py) took 2.8-3.4 s with OpenMP and 0.74-0.79 s with
workqueue in the same run, under load. So the kernels ask for workqueue unless
the environment chose a layer (``NUMBA_THREADING_LAYER``). It takes effect if
no parallel Numba code ran in the process before tinymrcnn's kernels were
imported. workqueue does not allow two Python threads to run parallel kernels
at the same time; tinymrcnn never does, and its data-parallel training uses
processes.
"""

import os

from numba import config

if "NUMBA_THREADING_LAYER" not in os.environ:
    config.THREADING_LAYER = "workqueue"
