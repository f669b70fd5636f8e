"""The benchmark scripts still run against the current code.

Benchmarks are not tests (no timing is asserted here), but a script that no
longer imports, or calls an op with an outdated signature, is found only when
someone wants a number -- on a GPU machine, when its time is short. So every
script is imported, the cheap ones run end to end on tiny settings, and the
GPU benchmark's CPU-side checks and model wiring run without a GPU (its
RoIAlign row on Numba's CUDA simulator, in a child process as in
tests/test_conv_cuda.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import tinymrcnn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
# the children import the tinymrcnn these tests import (the installed one in CI, whose
# Numba cache the other tests have filled), not whatever their working folder holds
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(tinymrcnn.__file__)))
SCRIPTS = sorted(f[:-3] for f in os.listdir(BENCH) if f.startswith("bench_") and f.endswith(".py"))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, tmp_path, **env):
    path = os.pathsep.join([PACKAGE_PARENT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=path, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports(name):
    module = _load(name)
    assert callable(module.main)


@pytest.mark.parametrize(
    "args, expect",
    [
        ([os.path.join(BENCH, "bench_nms.py"), "--repeats", "1", "--sizes", "100"], "100"),
        ([os.path.join(BENCH, "bench_roi.py"), "--repeats", "1", "--ref-rois", "1"], "backward, NumPy reference"),
        ([os.path.join(BENCH, "bench_conv.py"), "--impl", "tinymrcnn", "--repeats", "1"], "["),
        ([os.path.join(BENCH, "bench_model.py"), "--batch", "1", "--repeats", "1"], "whole step"),
    ],
    ids=["nms", "roi", "conv", "model"],
)
def test_cheap_benchmarks_run(args, expect, tmp_path):
    assert expect in _run(args, tmp_path)


def test_gpu_benchmark_times_the_model_inside_a_cuda_session(monkeypatch):
    """config.device only takes effect inside runtime.session: the model rows must open one."""
    from tinymrcnn import runtime

    bench = _load("bench_cuda")
    devices = []

    @contextlib.contextmanager
    def recording_session(config, processes=1):
        devices.append(config.device)  # (the kernels stay on the CPU: there is no GPU here)
        yield

    monkeypatch.setattr(runtime, "session", recording_session)
    label, rows, table = bench.bench_model(SimpleNamespace(synchronize=lambda: None), 1, "smoke", stages=True)
    assert [r["op"].split(",")[0] for r in rows] == ["training step", "predict()"]
    assert not any(r["bad"] for r in rows)
    # every timed and checked call of each model: 1 check + 2 warm-ups + 1 timed, training and predict,
    # and the stage table's one training step
    assert devices.count("cuda") == devices.count("cpu") == 9
    assert "backbone.body forward" in table and "host <-> device: to host" in table


def test_gpu_benchmark_r50_rows_use_the_r50_preset_at_512():
    """--r50 times torchvision's architecture on 2 unresized 512x512 images, on both devices."""
    bench = _load("bench_cuda")
    config, images, targets, label = bench.model_inputs("r50")
    assert [im.shape for im in images] == [(3, 512, 512)] * 2 and len(targets) == 2
    for device in ("cpu", "cuda"):
        c = config(device)
        assert (c.device, c.block, c.blocks_per_stage, c.min_size, c.max_size) == (
            device,
            "bottleneck",
            (3, 4, 6, 3),
            512,
            512,
        )
    assert "R50-FPN" in label


_SIM_ROI_ROW = """
import numpy as np
from numba import cuda
from tinymrcnn.kernels.cuda.roi_align import roi_align_backward_cuda, roi_align_forward_cuda
import importlib.util, sys
spec = importlib.util.spec_from_file_location("bench_cuda", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
row = bench.bench_roi_align(cuda, None, None, None, (roi_align_forward_cuda, roi_align_backward_cuda),
                            (1, 2, 6, 7), 3, 2, 0.5, 1, True, np.random.default_rng(0))
print(row["errs"]["cpu"])
"""


def test_gpu_benchmark_roi_align_row_on_the_simulator(tmp_path):
    out = _run(["-c", _SIM_ROI_ROW, os.path.join(BENCH, "bench_cuda.py")], tmp_path, NUMBA_ENABLE_CUDASIM="1")
    err = float(out.split()[-1])
    assert err < 1e-5
