"""The numba.cuda RoIAlign kernels on the CUDA simulator, against the CPU kernel.

The simulator replaces numba.cuda for the whole process once
NUMBA_ENABLE_CUDASIM is set before numba is imported, so the check runs in a
subprocess: the simulator cannot leak into other test modules, whatever
order pytest runs them in. Inputs are tiny (the simulator runs every GPU
thread as a Python thread).
"""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import numpy as np
    from numba import cuda
    from tinymrcnn.ops.roi_align import roi_align, roi_align_backward
    from tinymrcnn.kernels.cuda.roi_align import roi_align_backward_cuda, roi_align_forward_cuda

    assert cuda.is_available()                      # the simulator
    rng = np.random.default_rng(0)
    rois = np.array([[0, 1, 1, 4, 5], [1, -2, 3, 9, 8], [0, 2, 2, 2, 2],
                     [1, 6, 1, 3, 3], [0, -20, -20, -10, -10], [1, 0.3, 0.2, 0.5, 0.4]])
    for dtype in (np.float64, np.float32):
        tol = 1e-12 if dtype == np.float64 else 1e-5
        for mode in ("avg", "max"):
            for aligned, sampling in ((False, 2), (True, 0)):
                x = rng.standard_normal((2, 2, 6, 7)).astype(dtype)
                y = roi_align_forward_cuda(cuda.to_device(x), rois, 2, 0.8, sampling, aligned,
                                           mode).copy_to_host()
                y_cpu = roi_align(x, rois, 2, 0.8, sampling, aligned, mode)
                assert y.dtype == dtype, y.dtype
                np.testing.assert_allclose(y, y_cpu, rtol=tol, atol=tol)
                dy = rng.standard_normal(y.shape).astype(dtype)
                dx = roi_align_backward_cuda(cuda.to_device(dy), cuda.to_device(rois), x.shape,
                                             0.8, sampling, aligned, mode,
                                             x_dev=cuda.to_device(x)).copy_to_host()
                dx_cpu = roi_align_backward(dy, x, rois, 2, 0.8, sampling, aligned, mode)
                assert dx.dtype == dtype, dx.dtype
                np.testing.assert_allclose(dx, dx_cpu, rtol=tol, atol=tol)
                print("ok", dtype.__name__, mode, aligned, sampling)
    # more outputs than the grid has threads: the grid-stride loop (1 block of 32 threads, 270 outputs)
    import tinymrcnn.kernels.cuda.roi_align as R
    R.MAX_BLOCKS = 1
    x = rng.standard_normal((2, 3, 6, 7))
    for mode in ("avg", "max"):
        y = roi_align_forward_cuda(cuda.to_device(x), rois, (3, 5), 0.8, 2, True, mode).copy_to_host()
        np.testing.assert_allclose(y, roi_align(x, rois, (3, 5), 0.8, 2, True, mode), rtol=1e-12, atol=1e-12)
        dy = rng.standard_normal(y.shape)
        dx = roi_align_backward_cuda(cuda.to_device(dy), cuda.to_device(rois), x.shape, 0.8, 2, True, mode,
                                     x_dev=cuda.to_device(x)).copy_to_host()
        np.testing.assert_allclose(dx, roi_align_backward(dy, x, rois, (3, 5), 0.8, 2, True, mode),
                                   rtol=1e-12, atol=1e-12)
    print("ok grid-stride loop")
    # zero RoIs
    y = roi_align_forward_cuda(cuda.to_device(np.ones((1, 2, 4, 4))), np.zeros((0, 5)), 2)
    assert y.shape == (0, 2, 2, 2)
    print("all ok")
""")


def test_cuda_kernels_match_the_cpu_kernel_on_the_simulator():
    pytest.importorskip("numba")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all ok" in run.stdout


def test_cpu_path_never_imports_the_cuda_kernels():
    code = (
        "import sys, numpy as np\n"
        "from tinymrcnn.ops.roi_align import roi_align\n"
        "from tinymrcnn.model.poolers import MultiScaleRoIAlign\n"
        "roi_align(np.ones((1, 1, 4, 4)), np.array([[0, 0, 0, 2, 2.]]), 2)\n"
        "assert 'tinymrcnn.kernels.cuda.roi_align' not in sys.modules\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
