"""Linear, Flatten, ReLU, Sigmoid, MaxPool2d, the norms and nearest upsampling.

Every layer is gradient-checked in float64 by centred differences (inputs and
parameters, several shapes, batch > 1, non-square maps). Inputs are kept away
from the places where the function is not differentiable (ReLU at 0, max-pool
ties). Optional tests compare forward and backward with PyTorch.
"""

import numpy as np
import pytest

from tinymrcnn.gradcheck import check_module, gradcheck
from tinymrcnn.nn import (
    BatchNorm2d,
    Flatten,
    FrozenBatchNorm2d,
    GroupNorm,
    Linear,
    MaxPool2d,
    ReLU,
    Sigmoid,
    UpsampleNearest,
    upsample_nearest,
    upsample_nearest_backward,
)
from tinymrcnn.nn.pooling import max_pool2d, max_pool2d_backward, max_pool2d_backward_reference, max_pool2d_reference
from tinymrcnn.nn.upsample import nearest_source_index

TOL = 1e-6


def rng(seed=0):
    return np.random.default_rng(seed)


def distinct(shape, seed=0):
    """Values 0.01 apart in random order: no two within the finite-difference step."""
    n = int(np.prod(shape))
    return (rng(seed).permutation(n).reshape(shape) * 0.01 - 0.005 * n).astype(np.float64)


def away_from_zero(shape, seed=0, margin=0.05):
    x = rng(seed).standard_normal(shape)
    return np.where(x >= 0, x + margin, x - margin)


def randomize_affine(module, seed=1):
    r = rng(seed)
    module.weight.data = r.uniform(0.5, 1.5, module.weight.shape)
    module.bias.data = r.standard_normal(module.bias.shape)
    module.zero_grad()
    return module


# The norms' input gradients have entries near 0.001 (normalising removes the
# mean and scale directions of dy), where the rounding noise of the centred
# difference, ~1e-16 |L| / h, is ~1e-6 relative at h = 1e-6. A step of 1e-4
# cuts that noise 100x; its truncation error, O(h^2), stays ~1e-8.
NORM_H = 1e-4


def assert_grads_ok(errs):
    assert errs, "nothing was checked"
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"gradient check failed: {bad}"


# ---------------------------------------------------------------------------
# Linear, Flatten, activations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_f,out_f,shape,bias",
    [
        (3, 5, (4, 3), True),
        (7, 2, (2, 3, 7), True),  # leading dims are flattened, as in torch
        (6, 4, (1, 6), False),
    ],
)
def test_linear_gradients(in_f, out_f, shape, bias):
    m = Linear(in_f, out_f, bias=bias, rng=rng(3)).to_dtype(np.float64)
    errs = check_module(m, [rng(4).standard_normal(shape)], max_checks=None)
    expected = {"input0", "weight"} | ({"bias"} if bias else set())
    assert set(errs) == expected
    assert_grads_ok(errs)


def test_linear_forward_shape_init_and_default_rng():
    m = Linear(20, 3)
    assert m.weight.shape == (3, 20) and m.bias.shape == (3,)
    assert m.weight.data.dtype == np.float32
    bound = 1 / np.sqrt(20)
    assert np.abs(m.weight.data).max() <= bound and np.abs(m.bias.data).max() <= bound
    np.testing.assert_array_equal(Linear(20, 3).weight.data, m.weight.data)  # default rng(0)
    x = rng().standard_normal((5, 20)).astype(np.float32)
    y = m(x)
    assert y.dtype == np.float32 and y.shape == (5, 3)
    np.testing.assert_allclose(y, x @ m.weight.data.T + m.bias.data, rtol=1e-6)
    assert list(m.state_dict()) == ["weight", "bias"]


def test_linear_bad_input():
    m = Linear(4, 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        m(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        m(np.full((1, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="float32 or float64"):
        m(np.zeros((1, 4), np.int64))


def test_flatten():
    x = rng().standard_normal((3, 2, 4, 5))
    f = Flatten()
    assert f(x).shape == (3, 40)
    assert_grads_ok(check_module(f, [x]))


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (7,), (3, 1, 6, 2)])
def test_relu_gradients(shape):
    assert_grads_ok(check_module(ReLU(), [away_from_zero(shape)], max_checks=None))


def test_relu_values_and_gradient_at_zero():
    r = ReLU()
    x = np.array([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(r(x), [0.0, 0.0, 2.0])
    np.testing.assert_array_equal(r.backward(np.ones(3)), [0.0, 0.0, 1.0])  # d/dx at 0 is 0, as torch


def test_sigmoid_gradients_and_stability():
    assert_grads_ok(check_module(Sigmoid(), [rng().standard_normal((2, 3, 4))]))
    s = Sigmoid()
    y = s(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_array_equal(y, [0.0, 0.5, 1.0])


# ---------------------------------------------------------------------------
# MaxPool2d
# ---------------------------------------------------------------------------

POOL_CASES = [
    # (kernel, stride, padding, input shape)
    (3, 2, 1, (2, 3, 9, 7)),  # the ResNet stem pool, odd non-square map
    (3, 2, 1, (1, 2, 8, 10)),  # even sizes
    (2, 2, 0, (2, 2, 6, 5)),  # odd width: last column dropped
    (3, 1, 1, (1, 3, 5, 6)),  # overlapping windows
    (1, 2, 0, (2, 2, 7, 6)),  # FPN's P6: kernel 1, stride 2
    (3, 3, 0, (1, 1, 9, 9)),
    ((3, 2), (2, 1), (1, 0), (2, 2, 7, 5)),  # non-square kernel/stride/padding
    (7, 1, 3, (1, 2, 7, 9)),  # kernel 7: most windows mostly padding
]


@pytest.mark.parametrize("k,s,p,shape", POOL_CASES)
def test_maxpool_gradients(k, s, p, shape):
    m = MaxPool2d(k, stride=s, padding=p)
    assert_grads_ok(check_module(m, [distinct(shape)], max_checks=None))


@pytest.mark.parametrize("k,s,p,shape", POOL_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_maxpool_numba_equals_reference(k, s, p, shape, dtype):
    for seed, x in enumerate([rng(0).standard_normal(shape), rng(1).integers(0, 3, shape).astype(float)]):  # many ties
        x = x.astype(dtype)
        y_ref, a_ref = max_pool2d_reference(x, k, s, p)
        y, a = max_pool2d(x, k, s, p)
        assert y.dtype == dtype and a.dtype == np.int64
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(a, a_ref)
        dy = rng(seed).standard_normal(y.shape).astype(dtype)
        dx_ref = max_pool2d_backward_reference(dy, a_ref, x.shape)
        dx = max_pool2d_backward(dy, a, x.shape)
        assert dx.dtype == dtype
        np.testing.assert_allclose(
            dx, dx_ref, rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-6 if dtype == np.float32 else 1e-12
        )


def test_maxpool_stem_shape_numba_equals_reference():
    x = rng(5).standard_normal((8, 64, 64, 64)).astype(np.float32)
    y, a = max_pool2d(x, 3, 2, 1)
    assert y.shape == (8, 64, 32, 32)
    y_ref, a_ref = max_pool2d_reference(x, 3, 2, 1)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(a, a_ref)


def test_maxpool_ties_first_max_gets_the_whole_gradient():
    x = np.ones((1, 1, 4, 4))
    m = MaxPool2d(2)
    y = m(x)
    dx = m.backward(np.ones_like(y))
    expected = np.zeros((4, 4))
    expected[::2, ::2] = 1.0  # the top-left cell of each window, once
    np.testing.assert_array_equal(dx[0, 0], expected)
    # With overlap and padding every output still sends its gradient to exactly one cell.
    x = rng(2).integers(0, 2, (2, 3, 7, 6)).astype(np.float64)
    m = MaxPool2d(3, stride=2, padding=1)
    y = m(x)
    dy = rng(3).uniform(1, 2, y.shape)
    dx = m.backward(dy)
    np.testing.assert_allclose(dx.sum(axis=(2, 3)), dy.sum(axis=(2, 3)))
    _, argmax = max_pool2d(x, 3, 2, 1)
    flat = x.reshape(2, 3, -1)
    np.testing.assert_array_equal(np.take_along_axis(flat, argmax.reshape(2, 3, -1), 2).reshape(y.shape), y)


def test_maxpool_padding_never_wins():
    x = -np.ones((1, 1, 3, 3)) * 5.0  # all negative: zero padding would win, -inf padding does not
    y, a = max_pool2d(x, 3, 2, 1)
    np.testing.assert_array_equal(y, -5.0)
    assert (a >= 0).all()


def test_maxpool_bad_input():
    m = MaxPool2d(3, stride=2, padding=1)
    with pytest.raises(ValueError, match="4 dimensions"):
        m(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="non-finite"):
        x = np.zeros((1, 1, 8, 8))
        x[0, 0, 3, 3] = np.nan
        m(x)
    with pytest.raises(ValueError, match="larger than the padded input"):
        MaxPool2d(5)(np.zeros((1, 1, 3, 8)))
    with pytest.raises(ValueError, match="half the kernel"):
        MaxPool2d(3, padding=2)(np.zeros((1, 1, 8, 8)))
    with pytest.raises(ValueError, match="argmax shape"):
        max_pool2d_backward(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 3), np.int64), (1, 1, 4, 4))


# ---------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------


def test_frozen_batchnorm_forward_backward_and_names():
    C = 3
    m = FrozenBatchNorm2d(C)
    r = rng(1)
    m.weight = r.uniform(0.5, 2, C).astype(np.float32)
    m.bias = r.standard_normal(C).astype(np.float32)
    m.running_mean = r.standard_normal(C).astype(np.float32)
    m.running_var = r.uniform(0.5, 2, C).astype(np.float32)
    assert list(m.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert m.parameters() == []
    x = r.standard_normal((2, C, 4, 5)).astype(np.float32)
    y = m(x)
    assert y.dtype == np.float32
    ref = (x - m.running_mean[:, None, None]) / np.sqrt(m.running_var[:, None, None] + 1e-5) * m.weight[
        :, None, None
    ] + m.bias[:, None, None]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    m.to_dtype(np.float64)
    assert_grads_ok(check_module(m, [r.standard_normal((2, C, 3, 5))], max_checks=None))


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 2, 3, 7), (3, 1, 1, 4)])
def test_batchnorm_training_gradients(shape):
    m = randomize_affine(BatchNorm2d(shape[1]).to_dtype(np.float64))
    errs = check_module(m, [rng(2).standard_normal(shape) * 2 + 1], h=NORM_H)
    assert set(errs) == {"input0", "weight", "bias"}
    assert_grads_ok(errs)


def test_batchnorm_running_statistics_and_eval():
    C = 2
    m = BatchNorm2d(C, momentum=0.1)
    x = rng(3).standard_normal((4, C, 3, 5)).astype(np.float32) * 3 + 2
    y = m(x)
    mu = x.mean(axis=(0, 2, 3))
    var_b = x.var(axis=(0, 2, 3))
    n = 4 * 3 * 5
    np.testing.assert_allclose(m.running_mean, 0.9 * 0 + 0.1 * mu, rtol=1e-5)
    np.testing.assert_allclose(m.running_var, 0.9 * 1 + 0.1 * var_b * n / (n - 1), rtol=1e-5)
    assert int(m.num_batches_tracked) == 1
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), var_b / (var_b + 1e-5), rtol=1e-4)
    m.eval()
    y_eval = m(x)
    ref = (x - m.running_mean[:, None, None]) / np.sqrt(m.running_var[:, None, None] + 1e-5)
    np.testing.assert_allclose(y_eval, ref, rtol=1e-5, atol=1e-5)
    sd = m.state_dict()
    assert list(sd) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert sd["num_batches_tracked"].shape == ()  # a 0-d array, as torch's
    fresh = BatchNorm2d(C)
    fresh.load_state_dict(sd)
    assert fresh.num_batches_tracked.shape == () and int(fresh.num_batches_tracked) == 1


@pytest.mark.parametrize(
    "G,shape", [(3, (2, 6, 5, 7)), (1, (3, 4, 4, 3)), (4, (2, 4, 3, 5)), (2, (2, 4)), (2, (1, 4, 9))]
)
def test_groupnorm_gradients(G, shape):
    m = randomize_affine(GroupNorm(G, shape[1]).to_dtype(np.float64))
    errs = check_module(m, [rng(4).standard_normal(shape) * 1.5 - 0.5], h=NORM_H)
    assert set(errs) == {"input0", "weight", "bias"}
    assert_grads_ok(errs)


def test_groupnorm_forward_statistics_and_eval_equal_train():
    m = GroupNorm(2, 4)
    x = rng(5).standard_normal((3, 4, 5, 6)) * 4 + 3
    y = m(x)
    g = y.reshape(3, 2, -1)
    np.testing.assert_allclose(g.mean(axis=2), 0, atol=1e-12)
    np.testing.assert_allclose(g.var(axis=2), 1, rtol=1e-4)
    np.testing.assert_array_equal(m.eval()(x), y)


def test_norm_bad_input():
    for m in (FrozenBatchNorm2d(3), BatchNorm2d(3), GroupNorm(1, 3)):
        with pytest.raises(ValueError, match="channels|\\(N, 3"):
            m(np.zeros((2, 4, 5, 5)))
    with pytest.raises(ValueError, match="4 dimensions"):
        BatchNorm2d(3)(np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        BatchNorm2d(1)(np.array([[[[1.0, np.inf]]]]))
    with pytest.raises(ValueError, match="non-finite"):
        GroupNorm(1, 1)(np.array([[[[1.0, np.nan]]]]))
    with pytest.raises(ValueError, match="more than one value"):
        BatchNorm2d(2)(np.ones((1, 2, 1, 1)))
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm(3, 4)


# ---------------------------------------------------------------------------
# Nearest upsampling
# ---------------------------------------------------------------------------

UPSAMPLE_CASES = [
    ((2, 3, 4, 5), (8, 10)),  # exact 2x (the FPN with padded inputs)
    ((1, 2, 3, 4), (7, 9)),  # odd targets (unpadded odd maps)
    ((1, 2, 2, 3), (6, 9)),  # whole-number factor 3
    ((2, 2, 5, 4), (3, 2)),  # downsampling: some sources never copied
    ((1, 1, 3, 3), (3, 3)),  # identity
    ((3, 6, 5), (13, 4)),
]  # no batch axis: (C, H, W)


def brute_upsample(x, oh, ow):
    H, W = x.shape[-2:]
    y = np.empty(x.shape[:-2] + (oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            y[..., i, j] = x[..., min(i * H // oh, H - 1), min(j * W // ow, W - 1)]
    return y


@pytest.mark.parametrize("shape,size", UPSAMPLE_CASES)
def test_upsample_forward_and_gradient(shape, size):
    x = rng(6).standard_normal(shape)
    np.testing.assert_array_equal(upsample_nearest(x, size), brute_upsample(x, *size))
    errs = gradcheck(
        lambda x: upsample_nearest(x, size), [x], lambda g: [upsample_nearest_backward(g, shape)], max_checks=None
    )
    assert errs[0] <= TOL
    m = UpsampleNearest()
    y = m(x, size)
    dy = rng(7).standard_normal(y.shape)
    # brute-force backward: scatter-add through the index maps
    dx = np.zeros_like(x)
    rows = nearest_source_index(shape[-2], size[0])
    cols = nearest_source_index(shape[-1], size[1])
    for i, a in enumerate(rows):
        for j, b in enumerate(cols):
            dx[..., a, b] += dy[..., i, j]
    np.testing.assert_allclose(m.backward(dy), dx, rtol=1e-12, atol=1e-12)


def test_upsample_index_rule_is_floor_of_ratio():
    np.testing.assert_array_equal(nearest_source_index(3, 7), [0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(nearest_source_index(4, 8), [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(nearest_source_index(5, 2), [0, 2])


def test_upsample_bad_input():
    with pytest.raises(ValueError, match="positive"):
        upsample_nearest(np.zeros((1, 1, 2, 2)), (0, 4))
    with pytest.raises(ValueError, match="dimensions|leading"):
        upsample_nearest(np.zeros((2, 2)), (4, 4))
    with pytest.raises(ValueError, match="does not match"):
        upsample_nearest_backward(np.zeros((1, 2, 4, 4)), (1, 3, 2, 2))


# ---------------------------------------------------------------------------
# Against PyTorch (optional)
# ---------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("k,s,p,shape", POOL_CASES)
def test_maxpool_matches_torch_including_ties(k, s, p, shape):
    torch = pytest.importorskip("torch")
    for x in (rng(0).standard_normal(shape), rng(1).integers(0, 3, shape).astype(float)):
        xt = torch.tensor(x, requires_grad=True)
        yt, it = torch.nn.functional.max_pool2d(xt, k, s, p, return_indices=True)
        dy = rng(2).standard_normal(yt.shape)
        yt.backward(torch.tensor(dy))
        m = MaxPool2d(k, s, p)
        y = m(x)
        np.testing.assert_array_equal(y, yt.detach().numpy())
        np.testing.assert_array_equal(max_pool2d(x, k, s, p)[1], it.numpy())
        np.testing.assert_allclose(m.backward(dy), xt.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.torch
def test_batchnorm_matches_torch():
    torch = pytest.importorskip("torch")
    C = 3
    ours = randomize_affine(BatchNorm2d(C, momentum=0.2).to_dtype(np.float64))
    ref = torch.nn.BatchNorm2d(C, momentum=0.2).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(ours.weight.data))
        ref.bias.copy_(torch.tensor(ours.bias.data))
    for step in range(2):
        x = rng(10 + step).standard_normal((4, C, 5, 3)) * 2 + 1
        dy = rng(20 + step).standard_normal(x.shape)
        xt = torch.tensor(x, requires_grad=True)
        ref.weight.grad = None
        ref.bias.grad = None
        yt = ref(xt)
        yt.backward(torch.tensor(dy))
        ours.zero_grad()
        y = ours(x)
        dx = ours.backward(dy)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(ours.weight.grad, ref.weight.grad.numpy(), rtol=1e-10)
        np.testing.assert_allclose(ours.bias.grad, ref.bias.grad.numpy(), rtol=1e-10)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(sd) == set(ours.state_dict())
    for k, v in sd.items():
        np.testing.assert_allclose(ours.state_dict()[k], v, rtol=1e-12)
    ours.eval()
    ref.eval()
    x = rng(30).standard_normal((2, C, 4, 4))
    np.testing.assert_allclose(ours(x), ref(torch.tensor(x)).detach().numpy(), rtol=1e-10, atol=1e-12)
    fresh = BatchNorm2d(C)
    fresh.load_state_dict(sd)  # torch's state dict loads unchanged


@pytest.mark.torch
@pytest.mark.parametrize("G,shape", [(2, (2, 6, 5, 4)), (6, (3, 6, 3, 3)), (1, (2, 4, 7))])
def test_groupnorm_matches_torch(G, shape):
    torch = pytest.importorskip("torch")
    ours = randomize_affine(GroupNorm(G, shape[1]).to_dtype(np.float64))
    ref = torch.nn.GroupNorm(G, shape[1]).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(ours.weight.data))
        ref.bias.copy_(torch.tensor(ours.bias.data))
    x = rng(8).standard_normal(shape) * 3
    dy = rng(9).standard_normal(shape)
    xt = torch.tensor(x, requires_grad=True)
    ref(xt).backward(torch.tensor(dy))
    y = ours(x)
    np.testing.assert_allclose(y, ref(torch.tensor(x)).detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours.backward(dy), xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(ours.weight.grad, ref.weight.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(ours.bias.grad, ref.bias.grad.numpy(), rtol=1e-10)
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.torch
def test_frozen_batchnorm_matches_torch_formula():
    torch = pytest.importorskip("torch")
    C = 4
    r = rng(11)
    m = FrozenBatchNorm2d(C)
    bufs = {
        "weight": r.uniform(0.5, 2, C),
        "bias": r.standard_normal(C),
        "running_mean": r.standard_normal(C),
        "running_var": r.uniform(0.1, 2, C),
    }
    m.load_state_dict({k: v.astype(np.float32) for k, v in bufs.items()})
    x = r.standard_normal((2, C, 3, 5)).astype(np.float32)
    t = {k: torch.tensor(v.astype(np.float32)) for k, v in bufs.items()}
    # torchvision.ops.misc.FrozenBatchNorm2d.forward, written out
    scale = t["weight"] * (t["running_var"] + 1e-5).rsqrt()
    shift = t["bias"] - t["running_mean"] * scale
    xt = torch.tensor(x, requires_grad=True)
    yt = xt * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    dy = r.standard_normal(x.shape).astype(np.float32)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(m(x), yt.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.backward(dy), xt.grad.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize(
    "shape,size",
    [c for c in UPSAMPLE_CASES if len(c[0]) == 4] + [((1, 2, 13, 25), (25, 50)), ((2, 1, 21, 30), (133, 138))],
)
def test_upsample_matches_torch(shape, size):
    torch = pytest.importorskip("torch")
    x = rng(12).standard_normal(shape).astype(np.float32)  # torch's float32 index rule
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.interpolate(xt, size=size, mode="nearest")
    dy = rng(13).standard_normal(yt.shape).astype(np.float32)
    yt.backward(torch.tensor(dy))
    np.testing.assert_array_equal(upsample_nearest(x, size), yt.detach().numpy())
    np.testing.assert_allclose(upsample_nearest_backward(dy, shape), xt.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_upsample_index_rule_matches_torch_for_many_sizes():
    torch = pytest.importorskip("torch")
    for i in range(1, 40):
        for o in range(1, 90):
            x = torch.arange(i, dtype=torch.float32).reshape(1, 1, 1, i)
            ref = torch.nn.functional.interpolate(x, size=(1, o), mode="nearest").reshape(-1)
            np.testing.assert_array_equal(nearest_source_index(i, o), ref.long().numpy(), err_msg=f"in={i}, out={o}")


@pytest.mark.torch
def test_linear_matches_torch():
    torch = pytest.importorskip("torch")
    m = Linear(6, 4, rng=rng(14)).to_dtype(np.float64)
    x = rng(15).standard_normal((5, 6))
    dy = rng(16).standard_normal((5, 4))
    w = torch.tensor(m.weight.data, requires_grad=True)
    b = torch.tensor(m.bias.data, requires_grad=True)
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.linear(xt, w, b).backward(torch.tensor(dy))
    np.testing.assert_allclose(m(x), torch.nn.functional.linear(xt, w, b).detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(m.backward(dy), xt.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(m.weight.grad, w.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(m.bias.grad, b.grad.numpy(), rtol=1e-12)
