"""conv2d / conv_transpose2d: finite differences, fast == reference, Modules, torch, bad input."""

import numpy as np
import pytest

import tinymrcnn.kernels.cpu.conv as cpu_conv
from tinymrcnn.gradcheck import check_module, gradcheck
from tinymrcnn.nn import Conv2d, ConvTranspose2d
from tinymrcnn.ops import conv2d, conv2d_backward, conv_transpose2d, conv_transpose2d_backward
from tinymrcnn.ops.conv import (
    conv2d_backward_reference,
    conv2d_reference,
    conv_transpose2d_backward_reference,
    conv_transpose2d_reference,
)

# (N, C, H, W, O, kernel, stride, padding): stride 1/2, padding 0/1/3, kernel 1/3/7,
# batch > 1, non-square maps, and (h, w) pairs.
CASES = [
    (2, 3, 7, 5, 4, 3, 1, 1),
    (3, 2, 9, 6, 3, 3, 2, 1),
    (2, 2, 8, 11, 3, 7, 2, 3),
    (1, 3, 7, 9, 2, 7, 1, 3),
    (2, 4, 6, 5, 3, 1, 1, 0),
    (2, 3, 7, 6, 2, 1, 2, 0),
    (2, 3, 6, 7, 4, 3, 2, 0),
    (2, 2, 5, 8, 3, 2, 2, 0),
    (2, 3, 7, 8, 2, (3, 1), (2, 1), (1, 0)),
    (1, 2, 6, 9, 3, (1, 3), (1, 3), (0, 1)),
]
IDS = [f"N{c[0]}C{c[1]}H{c[2]}W{c[3]}O{c[4]}k{c[5]}s{c[6]}p{c[7]}".replace(" ", "") for c in CASES]


def _k(k):
    return (k, k) if isinstance(k, int) else k


def _arrays(case, transposed, dtype=np.float64, seed=0):
    N, C, H, W, O, k, s, p = case
    kh, kw = _k(k)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    # conv2d weight (O, C, kh, kw); conv_transpose2d weight (C_in=C, C_out=O, kh, kw)
    w = rng.standard_normal((C, O, kh, kw) if transposed else (O, C, kh, kw)).astype(dtype)
    b = rng.standard_normal(O).astype(dtype)
    return x, w, b, s, p


def _rel(a, b):
    """Norm-wise relative difference max|a - b| / max|b|."""
    scale = max(float(np.max(np.abs(b))), 1e-30) if np.size(b) else 1.0
    return float(np.max(np.abs(np.asarray(a, np.float64) - b))) / scale if np.size(b) else 0.0


@pytest.fixture(params=["per_tap", "im2col", "blocks", "direct"])
def path(request, monkeypatch):
    """Run a test through every fast path: one GEMM per tap, im2col chunks (few channels),
    where kernel == stride and padding == 0 per-image block matrices, and the direct
    dot products of conv_direct.py (forward and input gradient)."""
    monkeypatch.setattr(cpu_conv, "IM2COL_MAX_CHANNELS", 10**9 if request.param == "im2col" else 0)
    monkeypatch.setattr(cpu_conv, "DISJOINT_MIN_PIXELS", 1 if request.param == "blocks" else 10**9)
    direct = request.param == "direct"
    monkeypatch.setattr(cpu_conv, "DIRECT_MIN_CHANNELS", 1 if direct else 10**9)
    monkeypatch.setattr(cpu_conv, "DIRECT_MAX_CHANNELS", 10**9 if direct else 0)
    return request.param


OPS = {
    "conv2d": (conv2d, conv2d_backward, conv2d_reference, conv2d_backward_reference, False),
    "conv_transpose2d": (
        conv_transpose2d,
        conv_transpose2d_backward,
        conv_transpose2d_reference,
        conv_transpose2d_backward_reference,
        True,
    ),
}


# ---------------------------------------------------------------------------
# Finite differences (float64): dx, dweight, dbias of the fast path.
# A convolution is linear in each of x, w, b, so the centred difference has no
# truncation error at all; the step H only sets the rounding error
# (~ eps * |L| / H), and H = 1e-3 keeps it far below the tolerance.
# ---------------------------------------------------------------------------
H = 1e-3


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_finite_differences(op, case, path):
    fwd, bwd, _, _, transposed = OPS[op]
    x, w, b, s, p = _arrays(case, transposed)
    errs = gradcheck(lambda x, w, b: fwd(x, w, b, s, p), [x, w, b], lambda g: bwd(g, x, w, s, p), h=H, max_checks=150)
    assert max(errs) <= 1e-6, f"{op}: relative errors (dx, dw, db) = {errs}"


@pytest.mark.parametrize("op", list(OPS))
def test_finite_differences_of_the_references(op):
    _, _, fwd, bwd, transposed = OPS[op]
    for case in (CASES[1], CASES[8]):
        x, w, b, s, p = _arrays(case, transposed)
        errs = gradcheck(
            lambda x, w, b: fwd(x, w, b, s, p), [x, w, b], lambda g: bwd(g, x, w, s, p), h=H, max_checks=60
        )
        assert max(errs) <= 1e-6, f"{op} reference: {errs}"


# ---------------------------------------------------------------------------
# Fast path == readable reference
# ---------------------------------------------------------------------------
def _compare_fast_and_reference(op, case, dtype, tol, seed=0):
    fwd, bwd, fwd_ref, bwd_ref, transposed = OPS[op]
    x, w, b, s, p = _arrays(case, transposed, dtype, seed)
    y = fwd(x, w, b, s, p)
    y_ref = fwd_ref(x, w, b, s, p)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert _rel(y, y_ref) <= tol, f"{op} forward: {_rel(y, y_ref)}"
    dy = np.random.default_rng(seed + 1).standard_normal(y.shape).astype(dtype)
    for name, got, want in zip(("dx", "dweight", "dbias"), bwd(dy, x, w, s, p), bwd_ref(dy, x, w, s, p)):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert _rel(got, want) <= tol, f"{op} {name}: {_rel(got, want)}"


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float64, 1e-10)])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fast_equals_reference(op, dtype, tol, case, path):
    _compare_fast_and_reference(op, case, dtype, tol)


# Bigger maps, so that the wide layout is cut into several column chunks and a
# 1x1 or kernel == stride convolution takes the per-image block path (and,
# forced, the wide path).
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float64, 1e-10)])
@pytest.mark.parametrize(
    "case",
    [(2, 5, 33, 40, 6, 3, 1, 1), (3, 4, 61, 58, 5, 3, 2, 1), (2, 6, 36, 32, 5, 1, 1, 0), (3, 4, 47, 66, 5, 2, 2, 0)],
    ids=["3x3s1", "3x3s2", "1x1", "2x2s2"],
)
def test_fast_equals_reference_chunked(op, dtype, tol, case, path, monkeypatch):
    monkeypatch.setattr(cpu_conv, "CHUNK_BYTES", 1)  # -> 1024-column chunks
    N, C, H, W, O, k, s, p = case
    assert cpu_conv.geometry((N, C, H, W), (O, C, k, k), (s, s), (p, p)).M > 2048  # >= 2 chunks
    _compare_fast_and_reference(op, case, dtype, tol)


# Channel counts in the direct path's range (conv_direct.py), multiples and not of
# its blocks (3 pixels x 3 output channels; 4 pixels in the weight gradient), odd widths, stride 1/2, padding
# 0/1/2, batch 1 and 3, with the dispatch left as it is.
DIRECT_CASES = [
    (1, 16, 9, 7, 16, 3, 1, 1),
    (3, 17, 8, 11, 18, 3, 1, 0),
    (2, 16, 11, 9, 19, 3, 2, 1),
    (1, 20, 12, 10, 16, 3, 2, 0),
    (2, 16, 7, 13, 17, 5, 1, 2),
    (2, 16, 1, 6, 17, 3, 2, 1),  # one input row: the taps 0 and 2 only ever meet padding
]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float64, 1e-10)])
@pytest.mark.parametrize(
    "case", DIRECT_CASES, ids=[f"C{c[1]}W{c[3]}O{c[4]}k{c[5]}s{c[6]}p{c[7]}" for c in DIRECT_CASES]
)
def test_direct_path_equals_reference(op, dtype, tol, case):
    N, C, H, W, O, k, s, p = case
    g = cpu_conv.geometry((N, C, H, W), (O, C, k, k), (s, s), (p, p))
    assert g.direct
    _compare_fast_and_reference(op, case, dtype, tol)


def test_direct_path_empty_batch():
    for dtype in (np.float32, np.float64):
        x, w = np.zeros((0, 16, 8, 7), dtype), np.ones((20, 16, 3, 3), dtype)
        g = cpu_conv.geometry(x.shape, w.shape, (1, 1), (1, 1))
        assert g.direct
        y = cpu_conv.conv_output(x, w, None, g)
        assert y.shape == (0, 20, 8, 7) and y.dtype == dtype
        assert cpu_conv.conv_input_grad(y, w, g).shape == x.shape


def test_dispatch_rule():
    def geometry(C, O, k=3, s=1, p=1, size=64):
        return cpu_conv.geometry((2, C, size, size), (O, C, k, k), (s, s), (p, p))

    assert geometry(32, 32).direct and geometry(64, 128, s=2).direct
    assert not geometry(256, 256).direct  # long inner dimension: BLAS
    assert not geometry(3, 32, k=7, s=2, p=3).direct  # the stem: im2col
    assert not geometry(64, 64, k=1, p=0).direct  # 1x1: one GEMM per image
    assert not geometry(64, 64, k=2, s=2, p=0).direct  # kernel == stride: blocks


def test_noncontiguous_inputs():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 9, 8))[:, ::2]  # (2, 3, 9, 8), not contiguous
    w = rng.standard_normal((3, 4, 3, 3)).transpose(1, 0, 2, 3)  # (4, 3, 3, 3), not contiguous
    assert _rel(conv2d(x, w, None, 1, 1), conv2d_reference(x, w, None, 1, 1)) < 1e-12
    dy = rng.standard_normal((2, 4, 9, 8))[..., ::-1]
    for got, want in zip(conv2d_backward(dy, x, w, 1, 1), conv2d_backward_reference(dy, x, w, 1, 1)):
        assert _rel(got, want) < 1e-12


def test_empty_batch():
    for dtype in (np.float32, np.float64):
        x = np.zeros((0, 3, 8, 7), dtype)
        w = np.ones((4, 3, 3, 3), dtype)
        y = conv2d(x, w, np.ones(4, dtype), 2, 1)
        assert y.shape == (0, 4, 4, 4) and y.dtype == dtype
        dx, dw, db = conv2d_backward(y, x, w, 2, 1)
        assert dx.shape == x.shape and np.all(dw == 0) and dw.shape == w.shape and np.all(db == 0)
        wt = np.ones((3, 4, 2, 2), dtype)
        yt = conv_transpose2d(x, wt, None, 2, 0)
        assert yt.shape == (0, 4, 16, 14) and yt.dtype == dtype
        dx, dw, db = conv_transpose2d_backward(yt, x, wt, 2, 0)
        assert dx.shape == x.shape and dw.shape == wt.shape and db.shape == (4,)


def test_known_values():
    # all-ones 3x3 kernel with padding 1 counts the in-bounds neighbours (corner 4, edge 6, inside 9)
    x = np.ones((1, 1, 3, 4))
    y = conv2d(x, np.ones((1, 1, 3, 3)), None, 1, 1)
    np.testing.assert_array_equal(y[0, 0], [[4, 6, 6, 4], [6, 9, 9, 6], [4, 6, 6, 4]])
    # a 2x2 / stride 2 transposed conv with a one-hot kernel spreads each pixel into a 2x2 block
    w = np.zeros((1, 1, 2, 2))
    w[0, 0, 1, 0] = 1.0
    yt = conv_transpose2d(np.arange(4.0).reshape(1, 1, 2, 2), w, np.array([0.5]), 2, 0)
    np.testing.assert_array_equal(
        yt[0, 0], [[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 1.5, 0.5], [0.5, 0.5, 0.5, 0.5], [2.5, 0.5, 3.5, 0.5]]
    )


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,kwargs,shape",
    [
        (Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1), (2, 3, 7, 6)),
        (Conv2d, dict(in_channels=2, out_channels=3, kernel_size=(1, 3), padding=(0, 1), bias=False), (2, 2, 5, 4)),
        (Conv2d, dict(in_channels=3, out_channels=2, kernel_size=7, stride=2, padding=3), (2, 3, 9, 8)),
        (ConvTranspose2d, dict(in_channels=3, out_channels=4, kernel_size=2, stride=2), (2, 3, 4, 5)),
        (ConvTranspose2d, dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1), (2, 2, 4, 3)),
        (ConvTranspose2d, dict(in_channels=2, out_channels=2, kernel_size=3, bias=False), (1, 2, 3, 4)),
    ],
)
def test_module_gradients(cls, kwargs, shape):
    m = cls(**kwargs, rng=np.random.default_rng(5)).to_dtype(np.float64)
    x = np.random.default_rng(6).standard_normal(shape)
    errs = check_module(m, [x], h=H)
    expected = {"input0", "weight"} | ({"bias"} if kwargs.get("bias", True) else set())
    assert set(errs) == expected
    assert max(errs.values()) <= 1e-6, errs


def test_module_shapes_and_default_init():
    conv = Conv2d(16, 8, 3, padding=1)
    assert conv.weight.shape == (8, 16, 3, 3) and conv.bias.shape == (8,)
    assert conv.weight.data.dtype == np.float32
    bound = 1 / np.sqrt(16 * 9)  # fan_in = C*kh*kw
    assert np.abs(conv.weight.data).max() <= bound and np.abs(conv.weight.data).max() > 0.9 * bound
    assert np.abs(conv.bias.data).max() <= bound
    assert abs(conv.weight.data.std() - bound / np.sqrt(3)) < 0.1 * bound  # U(-a, a) has std a/sqrt(3)
    deconv = ConvTranspose2d(16, 8, 2, stride=2)
    assert deconv.weight.shape == (16, 8, 2, 2) and deconv.bias.shape == (8,)
    bound_t = 1 / np.sqrt(8 * 4)  # PyTorch: fan_in from dim 1
    assert bound_t * 0.9 < np.abs(deconv.weight.data).max() <= bound_t
    assert list(Conv2d(3, 4, 1, bias=False).state_dict()) == ["weight"]
    assert list(conv.state_dict()) == ["weight", "bias"]
    # the default Generator makes two layers equal; a given one is used
    np.testing.assert_array_equal(Conv2d(3, 4, 3).weight.data, Conv2d(3, 4, 3).weight.data)
    assert not np.array_equal(Conv2d(3, 4, 3).weight.data, Conv2d(3, 4, 3, rng=np.random.default_rng(1)).weight.data)


def test_module_forward_matches_op_and_shared_calls_accumulate():
    m = Conv2d(3, 4, 3, stride=2, padding=1)
    x1 = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    x2 = np.random.default_rng(1).standard_normal((1, 3, 6, 10)).astype(np.float32)
    y1, y2 = m(x1), m(x2)
    np.testing.assert_allclose(y1, conv2d(x1, m.weight.data, m.bias.data, 2, 1), rtol=1e-6)
    g1, g2 = np.ones_like(y1), np.ones_like(y2)
    dx2 = m.backward(g2)  # last in, first out
    dx1 = m.backward(g1)
    assert dx1.shape == x1.shape and dx2.shape == x2.shape
    dw = conv2d_backward(g1, x1, m.weight.data, 2, 1)[1] + conv2d_backward(g2, x2, m.weight.data, 2, 1)[1]
    np.testing.assert_allclose(m.weight.grad, dw, rtol=1e-5)
    np.testing.assert_allclose(m.bias.grad, np.full(4, g1[:, 0].size + g2[:, 0].size), rtol=1e-6)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="positive channel"):
        Conv2d(0, 4, 3)
    with pytest.raises(ValueError, match="stride"):
        ConvTranspose2d(3, 4, 3, stride=0)
    with pytest.raises(ValueError, match="channel mismatch"):
        Conv2d(3, 4, 3)(np.zeros((1, 2, 5, 5), np.float32))


# ---------------------------------------------------------------------------
# Bad input: a ValueError that names the problem, before any kernel runs
# ---------------------------------------------------------------------------
@pytest.fixture
def no_kernels(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a kernel ran on bad input")

    for name in ("conv_output", "conv_input_grad", "conv_weight_grad"):
        monkeypatch.setattr(cpu_conv, name, boom)


def _bad_conv2d_calls():
    x = np.zeros((2, 3, 8, 8), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    nan_x = x.copy()
    nan_x[1, 2, 3, 4] = np.nan
    inf_w = w.copy()
    inf_w[0, 0, 0, 0] = np.inf
    return [
        ("must have 4 dimensions", (x[0], w)),
        ("must have 4 dimensions", (x, w[0])),
        ("channel mismatch", (np.zeros((2, 5, 8, 8), np.float32), w)),
        ("non-finite", (nan_x, w)),
        ("non-finite", (x, inf_w)),
        ("kernel larger than padded input", (np.zeros((1, 3, 2, 8), np.float32), w)),
        ("dtype mismatch", (x.astype(np.float64), w)),
        ("float32 or float64", (x.astype(np.int64), w)),
    ]


@pytest.mark.parametrize("match,args", _bad_conv2d_calls())
def test_bad_input_conv2d(match, args, no_kernels):
    x, w = args
    with pytest.raises(ValueError, match=match):
        conv2d(x, w)
    dy = np.zeros((x.shape[0], w.shape[0], 6, 6), np.float32) if x.ndim == 4 and w.ndim == 4 else x
    with pytest.raises(ValueError, match=match):
        conv2d_backward(dy, x, w)


def test_bad_stride_padding_bias_and_dy(no_kernels):
    x = np.zeros((2, 3, 8, 8))
    w = np.zeros((4, 3, 3, 3))
    with pytest.raises(ValueError, match="stride must be positive"):
        conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="stride must be positive"):
        conv_transpose2d(x, np.zeros((3, 4, 3, 3)), stride=(1, -1))
    with pytest.raises(ValueError, match="padding must be non-negative"):
        conv2d(x, w, padding=-1)
    with pytest.raises(ValueError, match="bias must have shape"):
        conv2d(x, w, np.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        conv2d(x, w, np.full(4, np.nan))
    with pytest.raises(ValueError, match="dy must have the output's shape"):
        conv2d_backward(np.zeros((2, 4, 8, 7)), x, w, 1, 1)
    with pytest.raises(ValueError, match="dy contains"):
        conv2d_backward(np.full((2, 4, 8, 8), np.inf), x, w, 1, 1)
    with pytest.raises(ValueError, match="dtype mismatch"):
        conv2d_backward(np.zeros((2, 4, 8, 8), np.float32), x, w, 1, 1)


def test_bad_input_conv_transpose2d(no_kernels):
    x = np.zeros((2, 3, 4, 4))
    with pytest.raises(ValueError, match="channel mismatch"):
        conv_transpose2d(x, np.zeros((4, 3, 2, 2)))
    with pytest.raises(ValueError, match="padding .* too large"):
        conv_transpose2d(x, np.zeros((3, 2, 2, 2)), padding=3)
    with pytest.raises(ValueError, match="non-finite"):
        conv_transpose2d(np.full((1, 3, 2, 2), np.nan), np.zeros((3, 2, 2, 2)))
    with pytest.raises(ValueError, match="must have 4 dimensions"):
        conv_transpose2d_backward(np.zeros((2, 2, 8)), x, np.zeros((3, 2, 2, 2)), 2)
    with pytest.raises(ValueError, match="bias must have shape"):
        conv_transpose2d(x, np.zeros((3, 2, 2, 2)), np.zeros(3))


# ---------------------------------------------------------------------------
# PyTorch, when installed
# ---------------------------------------------------------------------------
TORCH_CASES = CASES[:4] + [(3, 8, 14, 14, 8, 2, 2, 0), (2, 4, 10, 12, 5, 3, 1, 1)]


@pytest.mark.torch
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", TORCH_CASES)
def test_against_torch(op, case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    fwd, bwd, _, _, transposed = OPS[op]
    x, w, b, s, p = _arrays(case, transposed)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = (F.conv_transpose2d if transposed else F.conv2d)(tx, tw, tb, stride=s, padding=p)
    dy = np.random.default_rng(9).standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(dy))
    assert _rel(fwd(x, w, b, s, p), ty.detach().numpy()) < 1e-12
    for got, t in zip(bwd(dy, x, w, s, p), (tx, tw, tb)):
        assert _rel(got, t.grad.numpy()) < 1e-12


@pytest.mark.torch
def test_module_init_matches_torch_fan_in():
    torch = pytest.importorskip("torch")
    for tmod, ours in (
        (torch.nn.Conv2d(6, 5, 3), Conv2d(6, 5, 3)),
        (torch.nn.ConvTranspose2d(6, 5, 2, stride=2), ConvTranspose2d(6, 5, 2, stride=2)),
    ):
        assert tuple(tmod.weight.shape) == ours.weight.shape and tuple(tmod.bias.shape) == ours.bias.shape
        fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(tmod.weight)
        bound = 1 / np.sqrt(fan_in)
        assert float(tmod.weight.detach().abs().max()) <= bound and np.abs(ours.weight.data).max() <= bound
        assert np.abs(ours.weight.data).max() > 0.9 * bound


@pytest.mark.parametrize(
    "k,stride,pad,C,O", [(3, 1, 1, 16, 5), (3, 2, 1, 16, 17), (7, 2, 3, 3, 5), (1, 1, 0, 8, 5), (2, 2, 0, 8, 5)]
)
def test_backward_without_input_grad_gives_the_same_weight_grads(k, stride, pad, C, O):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, C, 19, 22)).astype(np.float32)
    w = rng.standard_normal((O, C, k, k)).astype(np.float32)
    y = conv2d(x, w, None, stride, pad)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, db = conv2d_backward(dy, x, w, stride, pad)
    none, dw2, db2 = conv2d_backward(dy, x, w, stride, pad, need_input_grad=False)
    assert none is None and dx is not None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)
