"""The numba.cuda conv kernels against a NumPy reference, on the CUDA simulator.

Why a subprocess: the simulator is chosen once, by NUMBA_ENABLE_CUDASIM, when
numba is first imported, and by then other test modules of this pytest run
have imported numba for the CPU kernels. Setting the variable here would be
too late, and setting it before numba's import would switch every later
module to the simulator too. So the kernels run in a child process (this file
run as a script with ``--simulate``) whose environment sets the variable from
the start; the parent writes the inputs to an .npz file, the child writes the
kernels' outputs to another, and the assertions run here, against the float64
reference below. Nothing leaks into the rest of the session.

The simulator runs each GPU thread as a Python thread, so the inputs are tiny
and most cases use a tiny tile (8 threads a block); one case runs the
production tile (256 threads) to check that its index arithmetic is right too.
Tests marked ``gpu`` run the same kernels on real hardware and are skipped
without it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tinymrcnn.kernels.cuda.conv import (
    DEFAULT_TILE,
    Tile,
    conv2d_backward_cuda,
    conv2d_forward_cuda,
    conv_transpose2d_backward_cuda,
    conv_transpose2d_forward_cuda,
)
from tinymrcnn.kernels.cuda.device import cuda_available, is_simulator, require_cuda, to_host

SIM_TILE = Tile(bm=4, bn=8, bk=4, tm=2, tn=2, reduce=16)  # 8 threads a block: fast to simulate

# name: (N, C, H, W, weight shape, stride, padding, tile). conv2d weight is
# (O, C, kh, kw); conv_transpose2d weight is (C_in, C_out, kh, kw) with C_in = C.
CONV_CASES = {
    "3x3_s1_p1": (2, 3, 5, 6, (2, 3, 3, 3), 1, 1, SIM_TILE),
    "3x3_s2_p1": (1, 2, 5, 6, (3, 2, 3, 3), 2, 1, SIM_TILE),
    "3x3_s2_p0_uncovered_rows": (1, 3, 6, 5, (2, 3, 3, 3), 2, 0, SIM_TILE),
    "3x3_s1_p0": (2, 2, 5, 6, (3, 2, 3, 3), 1, 0, SIM_TILE),
    "1x1_s1": (2, 3, 5, 6, (3, 3, 1, 1), 1, 0, SIM_TILE),
    "1x1_s2": (1, 3, 6, 5, (2, 3, 1, 1), 2, 0, SIM_TILE),
    "3x2_stride21_pad10": (1, 2, 5, 6, (2, 2, 3, 2), (2, 1), (1, 0), SIM_TILE),
    "3x3_s1_p1_default_tile": (1, 2, 5, 6, (3, 2, 3, 3), 1, 1, DEFAULT_TILE),
    "empty_batch": (0, 2, 5, 6, (3, 2, 3, 3), 1, 1, SIM_TILE),  # the mask head with no RoIs
}
TRANSPOSE_CASES = {
    "2x2_s2_mask_head": (1, 3, 4, 5, (3, 2, 2, 2), 2, 0, SIM_TILE),
    "3x3_s2_p1": (2, 2, 3, 4, (2, 3, 3, 3), 2, 1, SIM_TILE),
    "3x3_s1_p1": (1, 3, 4, 4, (3, 2, 3, 3), 1, 1, SIM_TILE),
    "empty_batch": (0, 3, 4, 5, (3, 2, 2, 2), 2, 0, SIM_TILE),
}
RTOL = ATOL = 1e-5  # float32 sums of at most 60 terms of size ~1 against float64


# ---------------------------------------------------------------------------
# The reference: plain NumPy, float64, one (i, j) tap of the kernel at a time.


def _pairs(stride, padding):
    s = (stride, stride) if np.isscalar(stride) else tuple(stride)
    p = (padding, padding) if np.isscalar(padding) else tuple(padding)
    return s, p


def conv2d_ref(x, w, b, stride, padding):
    """y[n,o,oh,ow] = b[o] + sum_{c,i,j} w[o,c,i,j] x_pad[n,c,oh*s+i,ow*s+j]."""
    (sh, sw), (ph, pw) = _pairs(stride, padding)
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = np.zeros((N, O, Ho, Wo))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i : i + sh * Ho : sh, j : j + sw * Wo : sw]  # (N, C, Ho, Wo)
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return y if b is None else y + b[None, :, None, None]


def conv2d_backward_ref(dy, x, w, stride, padding):
    """The scatter form: each tap sends dy * w back to the pixels it read."""
    (sh, sw), (ph, pw) = _pairs(stride, padding)
    N, C, H, W = x.shape
    _, _, kh, kw = w.shape
    _, _, Ho, Wo = dy.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i : i + sh * Ho : sh, j : j + sw * Wo : sw] += np.einsum("nohw,oc->nchw", dy, w[:, :, i, j])
            dw[:, :, i, j] = np.einsum("nohw,nchw->oc", dy, xp[:, :, i : i + sh * Ho : sh, j : j + sw * Wo : sw])
    return dxp[:, :, ph : ph + H, pw : pw + W], dw, dy.sum(axis=(0, 2, 3))


def conv_transpose2d_ref(x, w, b, stride, padding):
    """y[n,co,ih*s-p+i,iw*s-p+j] += x[n,ci,ih,iw] w[ci,co,i,j] (PyTorch's definition)."""
    (sh, sw), (ph, pw) = _pairs(stride, padding)
    N, _, H, W = x.shape
    _, Co, kh, kw = w.shape
    Hf, Wf = (H - 1) * sh + kh, (W - 1) * sw + kw  # before cropping the padding
    yf = np.zeros((N, Co, Hf, Wf))
    for i in range(kh):
        for j in range(kw):
            yf[:, :, i : i + sh * H : sh, j : j + sw * W : sw] += np.einsum("nchw,co->nohw", x, w[:, :, i, j])
    y = yf[:, :, ph : Hf - ph, pw : Wf - pw]
    return y if b is None else y + b[None, :, None, None]


def conv_transpose2d_backward_ref(dy, x, w, stride, padding):
    """The gather form of the same taps: dx reads dy where y was written."""
    (sh, sw), (ph, pw) = _pairs(stride, padding)
    N, _, H, W = x.shape
    _, _, kh, kw = w.shape
    dyf = np.pad(dy, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            tap = dyf[:, :, i : i + sh * H : sh, j : j + sw * W : sw]  # (N, C_out, H, W)
            dx += np.einsum("nohw,co->nchw", tap, w[:, :, i, j])
            dw[:, :, i, j] = np.einsum("nchw,nohw->co", x, tap)
    return dx, dw, dy.sum(axis=(0, 2, 3))


def _inputs(case, transpose, seed):
    """float32 inputs of one case: x, weight, bias, dy."""
    N, C, H, W, wshape, stride, padding, _ = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal(wshape).astype(np.float32)
    b = rng.standard_normal(wshape[1] if transpose else wshape[0]).astype(np.float32)
    ref = conv_transpose2d_ref if transpose else conv2d_ref
    dy = rng.standard_normal(ref(x, w, b, stride, padding).shape).astype(np.float32)
    return x, w, b, dy


# ---------------------------------------------------------------------------
# The child process: run every case's kernels on the simulator.


def _run_cases(inp):
    """Kernel outputs of every case, as a dict of NumPy arrays (keys 'name/out')."""
    out = {}
    for transpose, cases in ((False, CONV_CASES), (True, TRANSPOSE_CASES)):
        fwd = conv_transpose2d_forward_cuda if transpose else conv2d_forward_cuda
        bwd = conv_transpose2d_backward_cuda if transpose else conv2d_backward_cuda
        for name, case in cases.items():
            key = ("T:" if transpose else "C:") + name
            stride, padding, tile = case[5], case[6], case[7]
            x, w, b, dy = (inp[f"{key}/{a}"] for a in ("x", "w", "b", "dy"))
            out[f"{key}/y"] = to_host(fwd(x, w, b, stride, padding, tile=tile))
            out[f"{key}/y_nobias"] = to_host(fwd(x, w, None, stride, padding, tile=tile))
            for a, g in zip(("dx", "dw", "db"), bwd(dy, x, w, stride, padding, tile=tile)):
                out[f"{key}/{a}"] = to_host(g)
    return out


def _child_main(in_path, out_path):
    assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and is_simulator()
    with np.load(in_path) as f:
        inp = dict(f)
    np.savez(out_path, **_run_cases(inp))


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Inputs and simulator outputs of every case: {'C:name/x': ..., 'C:name/y': ...}."""
    inp = {}
    for seed, (transpose, cases) in enumerate(((False, CONV_CASES), (True, TRANSPOSE_CASES))):
        for k, (name, case) in enumerate(cases.items()):
            key = ("T:" if transpose else "C:") + name
            for a, v in zip(("x", "w", "b", "dy"), _inputs(case, transpose, 100 * seed + k)):
                inp[f"{key}/{a}"] = v
    d = tmp_path_factory.mktemp("cudasim")
    in_path, out_path = d / "inputs.npz", d / "outputs.npz"
    np.savez(in_path, **inp)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--simulate", str(in_path), str(out_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"simulator run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with np.load(out_path) as f:
        inp.update(f)
    return inp


def _check(got, ref, what):
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL, err_msg=what)
    assert got.dtype == np.float32, what


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d_kernels_match_reference_on_simulator(sim, name):
    stride, padding = CONV_CASES[name][5:7]
    r = {a: sim[f"C:{name}/{a}"].astype(np.float64) for a in ("x", "w", "b", "dy")}
    _check(sim[f"C:{name}/y"], conv2d_ref(r["x"], r["w"], r["b"], stride, padding), "y")
    _check(sim[f"C:{name}/y_nobias"], conv2d_ref(r["x"], r["w"], None, stride, padding), "y (no bias)")
    for a, ref in zip(("dx", "dw", "db"), conv2d_backward_ref(r["dy"], r["x"], r["w"], stride, padding)):
        _check(sim[f"C:{name}/{a}"], ref, a)


@pytest.mark.parametrize("name", list(TRANSPOSE_CASES))
def test_conv_transpose2d_kernels_match_reference_on_simulator(sim, name):
    stride, padding = TRANSPOSE_CASES[name][5:7]
    r = {a: sim[f"T:{name}/{a}"].astype(np.float64) for a in ("x", "w", "b", "dy")}
    _check(sim[f"T:{name}/y"], conv_transpose2d_ref(r["x"], r["w"], r["b"], stride, padding), "y")
    _check(sim[f"T:{name}/y_nobias"], conv_transpose2d_ref(r["x"], r["w"], None, stride, padding), "y (no bias)")
    refs = conv_transpose2d_backward_ref(r["dy"], r["x"], r["w"], stride, padding)
    for a, ref in zip(("dx", "dw", "db"), refs):
        _check(sim[f"T:{name}/{a}"], ref, a)


@pytest.mark.parametrize("transpose", [False, True])
def test_simulator_outputs_match_cpu_ops(sim, transpose):
    """The same outputs against tinymrcnn.ops' CPU conv kernels."""
    ops = pytest.importorskip("tinymrcnn.ops")
    names = ("conv_transpose2d", "conv_transpose2d_backward") if transpose else ("conv2d", "conv2d_backward")
    if not all(hasattr(ops, f) for f in names):
        pytest.skip(f"tinymrcnn.ops has no {names[0]} yet")
    fwd, bwd = (getattr(ops, f) for f in names)
    tag = "T" if transpose else "C"
    for name, case in (TRANSPOSE_CASES if transpose else CONV_CASES).items():
        stride, padding = case[5:7]
        x, w, b, dy = (sim[f"{tag}:{name}/{a}"] for a in ("x", "w", "b", "dy"))
        _check(sim[f"{tag}:{name}/y"], fwd(x, w, b, stride, padding), f"{name} y")
        for a, ref in zip(("dx", "dw", "db"), bwd(dy, x, w, stride, padding)):
            _check(sim[f"{tag}:{name}/{a}"], ref, f"{name} {a}")


# ---------------------------------------------------------------------------
# The reference itself: its backward passes against finite differences.


@pytest.mark.parametrize("transpose", [False, True])
def test_reference_backward_matches_finite_differences(transpose):
    from tinymrcnn.gradcheck import gradcheck

    rng = np.random.default_rng(1)
    stride, padding = (2, 1), (1, 0)
    x = rng.standard_normal((2, 2, 4, 5))
    w = rng.standard_normal((2, 3, 3, 2) if transpose else (3, 2, 3, 2))
    b = rng.standard_normal(3)
    fwd, bwd = (conv_transpose2d_ref, conv_transpose2d_backward_ref) if transpose else (conv2d_ref, conv2d_backward_ref)
    errs = gradcheck(lambda x, w, b: fwd(x, w, b, stride, padding), [x, w, b], lambda g: bwd(g, x, w, stride, padding))
    assert max(errs) < 1e-6, errs  # as the CPU conv layers; a wrong gradient gives ~1


# ---------------------------------------------------------------------------
# No GPU, no numba-cuda, bad input: one clear message.


def test_cpu_path_never_imports_numba_cuda():
    code = (
        "import sys, numpy as np, tinymrcnn, tinymrcnn.ops, tinymrcnn.kernels.cuda.conv\n"
        "from tinymrcnn.kernels.cuda.device import is_cuda_array\n"
        "assert not is_cuda_array(np.zeros(3))\n"
        "assert 'numba.cuda' not in sys.modules, 'numba.cuda was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_missing_numba_cuda_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba.cuda", None)  # makes `import numba.cuda` fail
    with pytest.raises(RuntimeError, match=r'pip install "tinymrcnn\[cuda\]"'):
        require_cuda()
    assert not cuda_available()


@pytest.mark.skipif(cuda_available(), reason="a GPU (or the simulator) is present")
def test_gpu_without_device_gives_one_clear_message():
    with pytest.raises(RuntimeError, match="no usable NVIDIA GPU") as e:
        require_cuda()
    assert e.value.__cause__ is None  # no chained numba traceback
    x = np.zeros((1, 1, 3, 3), np.float32)
    with pytest.raises(RuntimeError, match="no usable NVIDIA GPU"):
        conv2d_forward_cuda(x, np.zeros((1, 1, 3, 3), np.float32))


def test_numpy_that_numba_cuda_cannot_compile_with_is_named(monkeypatch):
    """numba-cuda 0.30.4 + NumPy 2.5 fails at the first kernel compile; require_cuda says so first."""
    from tinymrcnn.kernels.cuda import device

    real_import = device.importlib.import_module

    def broken_numpy_support(name, *args):
        if name == "numba.cuda.np.npyimpl":
            raise AttributeError("module 'numpy' has no attribute 'row_stack'")
        return real_import(name, *args)

    device._numpy_support_problem.cache_clear()
    monkeypatch.setattr(device.importlib, "import_module", broken_numpy_support)
    try:
        assert device._numpy_support_problem() == "module 'numpy' has no attribute 'row_stack'"
    finally:
        device._numpy_support_problem.cache_clear()
    # require_cuda on a machine with a GPU and libNVVM, but that NumPy
    gpu = type("FakeCuda", (), {"is_available": staticmethod(lambda: True)})
    monkeypatch.setattr(device, "_import_numba_cuda", lambda: gpu)
    monkeypatch.setattr(device, "is_simulator", lambda: False)
    monkeypatch.setattr(device, "_nvvm_available", lambda: True)
    monkeypatch.setattr(device, "_numpy_support_problem", lambda: "module 'numpy' has no attribute 'row_stack'")
    with pytest.raises(RuntimeError, match=r'cannot compile kernels with NumPy .*row_stack.*"numpy<2.5"'):
        device.require_cuda()


def test_low_occupancy_warnings_are_off_unless_the_environment_asks(monkeypatch):
    from types import SimpleNamespace

    from tinymrcnn.kernels.cuda import device

    monkeypatch.delenv("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", raising=False)
    config = SimpleNamespace(CUDA_LOW_OCCUPANCY_WARNINGS=1)
    monkeypatch.setitem(sys.modules, "numba.cuda.core.config", config)
    device._quiet_occupancy_warnings()
    assert config.CUDA_LOW_OCCUPANCY_WARNINGS == 0
    monkeypatch.setenv("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "1")
    config.CUDA_LOW_OCCUPANCY_WARNINGS = 1
    device._quiet_occupancy_warnings()
    assert config.CUDA_LOW_OCCUPANCY_WARNINGS == 1


def test_bad_input_is_rejected_before_any_kernel():
    x = np.zeros((1, 2, 5, 5), np.float32)
    with pytest.raises(ValueError, match="float32"):
        conv2d_forward_cuda(x.astype(np.float64), np.zeros((1, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="4 dimensions"):
        conv2d_forward_cuda(x[0], np.zeros((1, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        conv2d_forward_cuda(x, np.zeros((1, 2, 3, 3), np.float32), stride=0)
    with pytest.raises(ValueError, match="unsupported tile"):
        Tile(bm=64, bn=64, bk=16, tm=4, tn=4, reduce=100).check()


def test_mismatched_shapes_are_named_before_any_kernel():
    """Each pass names the argument that does not fit: channels, bias length, dy's shape."""
    x = np.zeros((1, 2, 5, 5), np.float32)
    w = np.zeros((3, 2, 3, 3), np.float32)  # conv2d: 2 -> 3 channels; as conv_transpose2d: 3 -> 2
    y = np.zeros((1, 3, 5, 5), np.float32)  # conv2d(x, w, padding=1)
    with pytest.raises(ValueError, match="expects 2 input channels, x has 3"):
        conv2d_forward_cuda(y, w, padding=1)
    with pytest.raises(ValueError, match="bias has 2 entries, weight has 3 output channels"):
        conv2d_forward_cuda(x, w, np.zeros(2, np.float32), padding=1)
    with pytest.raises(ValueError, match=r"dy \(1, 3, 4, 5\) \(expected \(1, 3, 5, 5\)\)"):
        conv2d_backward_cuda(y[:, :, :4], x, w, padding=1)
    with pytest.raises(ValueError, match="expects 3 input channels, x has 2"):
        conv_transpose2d_forward_cuda(x, w, padding=1)
    with pytest.raises(ValueError, match="bias has 3 entries, weight has 2 output channels"):
        conv_transpose2d_forward_cuda(y, w, np.zeros(3, np.float32), padding=1)
    with pytest.raises(ValueError, match=r"dy \(1, 2, 5, 4\) \(expected \(1, 2, 5, 5\)\)"):
        conv_transpose2d_backward_cuda(x[..., :4], y, w, padding=1)


# ---------------------------------------------------------------------------
# Real hardware (skipped without it): production tile, medium shapes.


def _real_gpu():
    return cuda_available() and not is_simulator()


@pytest.mark.gpu
@pytest.mark.skipif(not _real_gpu(), reason="needs an NVIDIA GPU with numba-cuda")
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (2, 0)])
def test_kernels_on_gpu_match_reference(transpose, stride, padding):
    k = 2 if transpose and stride == 2 and padding == 0 else 3
    case = (2, 24, 19, 23, (40, 24, k, k) if not transpose else (24, 40, k, k), stride, padding, None)
    x, w, b, dy = _inputs(case, transpose, seed=7)
    f64 = [a.astype(np.float64) for a in (x, w, b, dy)]
    fwd, bwd = (
        (conv_transpose2d_forward_cuda, conv_transpose2d_backward_cuda)
        if transpose
        else (conv2d_forward_cuda, conv2d_backward_cuda)
    )
    rfwd, rbwd = (
        (conv_transpose2d_ref, conv_transpose2d_backward_ref) if transpose else (conv2d_ref, conv2d_backward_ref)
    )
    tol = dict(rtol=1e-4, atol=1e-3)  # sums of up to ~10^4 float32 terms
    np.testing.assert_allclose(
        to_host(fwd(x, w, b, stride, padding)), rfwd(f64[0], f64[1], f64[2], stride, padding), **tol
    )
    for got, ref in zip(bwd(dy, x, w, stride, padding), rbwd(f64[3], f64[0], f64[1], stride, padding)):
        np.testing.assert_allclose(to_host(got), ref, **tol)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--simulate":
        _child_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"usage: NUMBA_ENABLE_CUDASIM=1 {sys.argv[0]} --simulate INPUTS.npz OUTPUTS.npz")
