"""The Numba CPU kernels, and the one setting they need: Numba's thread pool.

Numba runs ``prange`` loops on a thread pool from one of three layers
(OpenMP, TBB, its own "workqueue"). A training step of the shapes preset
launches about 160 parallel loops, many of them on maps of 2x2 to 16x16
pixels, so what a launch costs matters as much as the loops themselves.

* **OpenMP, when it is there.** With one thread per process (each
  data-parallel training worker) OpenMP runs the loop in the calling thread;
  workqueue hands it to a pool thread and waits to be woken, 50-100 us per
  loop in a virtual machine. Measured on a 2-core AMD EPYC (2026-12-04): one
  worker's step (2 images, one thread) 131-135 ms with OpenMP against
  192-201 ms with workqueue; a step of ``train --workers 2``
  (``benchmarks/bench_train.py``, the two alternating) 118-124 ms against
  130-175 ms.
* **Idle threads sleep.** OpenMP's idle threads spin by default, waiting for
  the next loop. On a 2-core machine shared with another program that is a
  disaster: two processes with two threads each took 1.52 s per step
  (``benchmarks/bench_model.py``, both at once) with spinning threads,
  0.22-0.25 s with sleeping ones (OpenMP's passive wait) and 0.24 s with
  workqueue. One such process alone took about the same with either wait
  (passive 180-193 ms, the default 194-198, always spinning 185-232). So
  the pool starts with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment
  sets a policy; the variable is set only while the pool starts, here, and
  then removed again. (A torch imported *after* this shares the same OpenMP
  runtime and so its passive wait: torch's 32-channel convolution in
  ``benchmarks/bench_conv.py`` took 24.4 ms instead of 16-20. Imported
  before, torch keeps its own runtime; the benchmarks that time torch do
  that.)
* Where Numba's OpenMP layer cannot load (no libgomp; macOS without Intel
  OpenMP), workqueue. ``NUMBA_THREADING_LAYER`` in the environment
  overrides all of this.

OpenMP's pool does not survive ``os.fork``; tinymrcnn never forks (its
training workers are new interpreters, ``tinymrcnn/parallel.py``).
"""

import os

from numba import config


def _start_thread_pool() -> None:
    """Pick the threading layer and start Numba's pool, OpenMP threads waiting passively."""
    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    config.THREADING_LAYER = "default"  # the first of the priority list that loads
    config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
    try:
        from numba.np.ufunc.parallel import _is_initialized, _launch_threads
    except ImportError:  # another Numba: the layer is picked at the first parallel loop
        return
    if _is_initialized:
        return  # parallel Numba code ran before tinymrcnn was imported: its layer stays
    policy = os.environ.get("OMP_WAIT_POLICY")
    if policy is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read once, when libgomp loads
    try:
        _launch_threads()
    finally:
        if policy is None:
            del os.environ["OMP_WAIT_POLICY"]


_start_thread_pool()
