"""The runtime layer: sessions restore what they change, the timer watches from outside, one training step."""

import platform
import sys

import numpy as np
import pytest

from tinymrcnn import MaskRCNN, MaskRCNNConfig, kernels, runtime
from tinymrcnn.data.shapes import ShapesDataset


def small_model():
    config = MaskRCNNConfig.shapes(
        stem_channels=8,
        stage_channels=(8, 8, 16, 16),
        fpn_channels=8,
        box_representation_size=16,
        mask_channels=8,
        group_norm_groups=4,
    )
    return MaskRCNN(config, seed=0)


def batch(n=2):
    ds = ShapesDataset(n, image_size=64, seed=1)
    items = [ds[i] for i in range(n)]
    return [img for img, _ in items], [t for _, t in items]


def test_session_sets_and_restores_device_and_blas_threads():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    with runtime.session(MaskRCNNConfig.shapes(blas_threads=1)):
        assert kernels.get_device() == "cpu"
        assert all(n == 1 for n in blas_threads())
    assert blas_threads() == before and kernels.get_device() == "cpu"
    with pytest.raises(ValueError, match="device must be one of"):
        kernels.set_device("tpu")


def test_stage_timer_times_each_stage_and_leaves_the_model_as_it_was():
    images, targets = batch()
    plain, timed = small_model(), small_model()
    runtime.compute_gradients(plain, images, targets)
    timer = runtime.StageTimer()
    with timer.watch(timed):
        timed.rng = np.random.default_rng(1)
        runtime.compute_gradients(timed, images, targets)
    for stage in (
        "backbone.body forward",
        "backbone.body backward",
        "rpn.head forward",
        "rpn.head backward",
        "rpn loss",
        "roi_heads forward_train",
        "roi_heads.mask_head backward",
    ):
        assert timer.seconds[stage] > 0 and timer.calls[stage] >= 1, stage
    assert timer.calls["rpn.head forward"] == timer.calls["rpn.head backward"] == 5  # once per level
    assert "rpn.head backward" in timer.table() and "whole step" in timer.table(total_s=1.0)
    # unwrapped again: the methods are the class's, and nothing was changed by watching
    assert "forward" not in timed.backbone.body.__dict__ and "loss" not in timed.rpn.__dict__
    plain.rng = np.random.default_rng(1)
    plain.zero_grad()
    runtime.compute_gradients(plain, images, targets)
    for (name, a), (_, b) in zip(plain.named_parameters(), timed.named_parameters()):
        np.testing.assert_array_equal(a.grad, b.grad, err_msg=name)


def test_compute_gradients_skips_the_backward_on_a_non_finite_loss(monkeypatch):
    model = small_model()
    images, targets = batch(1)
    monkeypatch.setattr(model, "forward_train", lambda *a: {"loss_mask": float("nan")})
    monkeypatch.setattr(model, "backward", lambda: pytest.fail("backward ran after a NaN loss"))
    losses = runtime.compute_gradients(model, images, targets)
    assert np.isnan(losses["loss_mask"])


def test_blas_threads_zero_shares_the_cores_among_the_workers(monkeypatch):
    """0 = one BLAS thread per core for one process, the cores divided among several (at least one each)."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    if not blas_threads():
        pytest.skip("no BLAS library found by threadpoolctl")
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 4)
    config = MaskRCNNConfig.shapes(blas_threads=0)
    for processes, expected in ((1, 4), (2, 2), (3, 1), (8, 1)):
        with runtime.session(config, processes=processes):
            assert all(n == expected for n in blas_threads()), (processes, blas_threads())
    assert MaskRCNNConfig.torchvision_r50_fpn().blas_threads == 0
    with pytest.raises(ValueError, match="blas_threads must be None, 0"):
        MaskRCNNConfig.shapes(blas_threads=-1)


# -- Numba's thread pool (tinymrcnn/kernels/cpu/__init__.py), in fresh interpreters ------------------
_POOL_PROBE = """
import json, os
import tinymrcnn.kernels.cpu
import numba
from numba.np.ufunc import parallel
started = parallel._is_initialized
parallel._launch_threads()  # what the first parallel loop would do
try:
    import numba.np.ufunc.omppool  # noqa: F401
    omp = True
except ImportError:
    omp = False
print(json.dumps({"started": started, "layer": numba.threading_layer(), "omp_loads": omp,
                  "policy": os.environ.get("OMP_WAIT_POLICY")}))
"""


def _run_probe(code, *args, **env_changes):
    """Run ``code`` in a fresh interpreter (this checkout first on the path); its last line as JSON."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY")}
    env.update(env_changes)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _probe_pool(**env_changes):
    return _run_probe(_POOL_PROBE, **env_changes)


def test_the_kernels_start_numbas_pool_on_openmp_and_leave_the_environment_as_it_was():
    got = _probe_pool()
    assert got["started"]
    assert got["layer"] == ("omp" if got["omp_loads"] else "workqueue")
    assert got["policy"] is None  # set only while the pool started


def test_the_environment_chooses_the_layer_and_the_wait_policy():
    chosen = _probe_pool(NUMBA_THREADING_LAYER="workqueue")
    assert chosen["layer"] == "workqueue" and not chosen["started"]  # left to Numba
    assert _probe_pool(OMP_WAIT_POLICY="active")["policy"] == "active"


# -- the C allocator (runtime.keep_freed_memory), in fresh interpreters ----------------------------
_MALLOC_PROBE = """
import json, resource, sys
import numpy as np
from tinymrcnn import runtime
applied = runtime.keep_freed_memory() if sys.argv[1] == "keep" else None
def cycle():  # a step's worth of arrays: allocated, touched, freed
    arrays = [np.ones(3 << 20, np.uint8) for _ in range(8)]
    del arrays
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)
def test_keep_freed_memory_reuses_the_pages_of_freed_arrays():
    default = _run_probe(_MALLOC_PROBE, "default")
    kept = _run_probe(_MALLOC_PROBE, "keep")
    assert kept["applied"] is True
    # By default glibc gives the freed 24 MB back and faults every page in again next time
    # (~6000 faults per cycle measured, 4 KB pages); kept, the next cycle reuses them.
    if default["faults"] < 1000:  # e.g. huge pages: few faults to begin with
        pytest.skip(f"this machine's default allocator faulted only {default['faults']} times")
    assert kept["faults"] < default["faults"] / 50


def test_keep_freed_memory_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.keep_freed_memory() is False
