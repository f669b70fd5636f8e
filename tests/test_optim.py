"""Optimizers, schedules and gradient clipping: hand formulas, torch step by step (optional)."""

import io
import math

import numpy as np
import pytest

from tinymrcnn.nn import Parameter
from tinymrcnn.optim import SGD, Adam, AdamW, WarmupCosine, WarmupMultiStep, clip_grad_norm


def rng(seed=0):
    return np.random.default_rng(seed)


def make_params(seed=0, dtype=np.float64):
    r = rng(seed)
    return [Parameter(r.standard_normal((3, 4)).astype(dtype)), Parameter(r.standard_normal(5).astype(dtype))]


def quadratic_grads(params, centres):
    """Loss sum ||p - c||^2 / 2; its gradient is p - c."""
    for p, c in zip(params, centres):
        p.grad[...] = p.data - c
    return sum(float(((p.data - c) ** 2).sum()) / 2 for p, c in zip(params, centres))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.0),
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=True),
        lambda ps: Adam(ps, lr=0.05),
        lambda ps: AdamW(ps, lr=0.05, weight_decay=0.0),
    ],
)
def test_optimizers_minimise_a_quadratic(make_opt):
    params = make_params()
    centres = [rng(1).standard_normal(p.shape) for p in params]
    opt = make_opt(params)
    first = quadratic_grads(params, centres)
    for _ in range(300):
        opt.zero_grad()
        quadratic_grads(params, centres)
        opt.step()
    assert quadratic_grads(params, centres) < 1e-4 * first


def test_sgd_steps_by_hand():
    p = Parameter(np.array([1.0, -2.0]))
    opt = SGD([p], lr=0.1, momentum=0.5, weight_decay=0.01)
    g1, g2 = np.array([0.3, 0.4]), np.array([-0.1, 0.2])
    p.grad[...] = g1
    opt.step()
    d1 = g1 + 0.01 * np.array([1.0, -2.0])  # buf = d1 on the first step
    x1 = np.array([1.0, -2.0]) - 0.1 * d1
    np.testing.assert_allclose(p.data, x1, rtol=1e-15)
    p.grad[...] = g2
    opt.step()
    buf = 0.5 * d1 + (g2 + 0.01 * x1)
    np.testing.assert_allclose(p.data, x1 - 0.1 * buf, rtol=1e-15)


def test_first_adam_step_is_lr_times_sign():
    # m1 = (1-b1) g, v1 = (1-b2) g^2; after bias correction the step is lr * g / (|g| + eps).
    g = np.array([0.3, -2.0, 1e-3])
    p = Parameter(np.array([1.0, 2.0, 3.0]))
    opt = Adam([p], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    p.grad[...] = g
    opt.step()
    np.testing.assert_allclose(p.data, [1.0, 2.0, 3.0] - 0.01 * g / (np.abs(g) + 1e-8), rtol=1e-12)


def test_adamw_decays_the_weight_not_the_gradient():
    p = Parameter(np.array([2.0]))
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad[...] = 0.0  # no gradient: only the decay acts
    opt.step()
    np.testing.assert_allclose(p.data, [2.0 * (1 - 0.1 * 0.5)])
    q = Parameter(np.array([2.0]))
    Adam([q], lr=0.1, weight_decay=0.5).step()  # L2: g = 0.5 * 2 -> a full Adam step
    np.testing.assert_allclose(q.data, [2.0 - 0.1], rtol=1e-7)


def test_frozen_parameters_are_skipped():
    for make in (lambda ps: SGD(ps, lr=0.1), lambda ps: Adam(ps, lr=0.1)):
        params = make_params()
        params[1].requires_grad = False
        before = params[1].data.copy()
        opt = make(params)
        for p in params:
            p.grad[...] = 1.0
        opt.step()
        np.testing.assert_array_equal(params[1].data, before)
        assert not np.array_equal(params[0].data, make_params()[0].data)
        assert all(not k.endswith(".1") for k in opt.state_dict())


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4),
        lambda ps: Adam(ps, lr=0.01, weight_decay=1e-3),
        lambda ps: AdamW(ps, lr=0.01),
    ],
)
def test_state_dict_round_trip_through_npz_resumes_exactly(make_opt):
    def grads(params, t):
        for i, p in enumerate(params):
            p.grad[...] = rng(100 * t + i).standard_normal(p.shape)

    full = make_params()
    opt = make_opt(full)
    for t in range(5):
        grads(full, t)
        opt.step()

    part = make_params()
    opt = make_opt(part)
    for t in range(3):
        grads(part, t)
        opt.step()
    buf = io.BytesIO()
    np.savez(buf, **opt.state_dict())  # plain arrays: no pickle needed
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as f:
        saved = dict(f)
    opt2 = make_opt(part)
    opt2.lr = 123.0
    opt2.load_state_dict(saved)
    assert opt2.lr == opt.lr
    for t in range(3, 5):
        grads(part, t)
        opt2.step()
    for a, b in zip(full, part):
        np.testing.assert_array_equal(a.data, b.data)


def test_load_state_dict_rejects_bad_entries():
    params = make_params()
    opt = SGD(params, lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict({"momentum_buffer.0": np.zeros(2)})
    with pytest.raises(ValueError, match="unexpected key"):
        opt.load_state_dict({"exp_avg.0": np.zeros((3, 4))})
    with pytest.raises(ValueError, match="parameter 7"):
        opt.load_state_dict({"momentum_buffer.7": np.zeros(2)})


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        SGD([], lr=0.1)
    with pytest.raises(TypeError, match="Parameters"):
        SGD([np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        Adam(make_params(), lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        Adam(make_params(), lr=0.1, betas=(0.9, 1.0))


def test_float32_parameters_stay_float32():
    params = make_params(dtype=np.float32)
    for opt in (SGD(params, lr=0.1), Adam(params, lr=0.1)):
        for p in params:
            p.grad[...] = 1.0
        opt.step()
        assert all(p.data.dtype == np.float32 for p in params)


def test_clip_grad_norm():
    params = make_params()
    for p in params:
        p.grad[...] = rng(3).standard_normal(p.shape)
    total = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    before = [p.grad.copy() for p in params]
    assert clip_grad_norm(params, total * 2) == pytest.approx(total)
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p.grad, b)  # under the limit: untouched
    assert clip_grad_norm(params, 1.0) == pytest.approx(total)
    new = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    assert new == pytest.approx(1.0, rel=1e-5)


def test_warmup_multistep_schedule():
    s = WarmupMultiStep(base_lr=0.02, warmup_iters=10, warmup_factor=0.001, milestones=(50, 80), gamma=0.1)
    assert s.lr_at(0) == pytest.approx(0.02 * 0.001)
    assert s.lr_at(5) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert s.lr_at(10) == pytest.approx(0.02)
    assert s.lr_at(49) == pytest.approx(0.02)
    assert s.lr_at(50) == pytest.approx(0.002)
    assert s.lr_at(80) == pytest.approx(0.0002)
    assert WarmupMultiStep(0.1).lr_at(0) == 0.1  # no warm-up, no milestones
    with pytest.raises(ValueError, match="increasing"):
        WarmupMultiStep(0.1, milestones=(5, 3))


def test_warmup_cosine_schedule():
    s = WarmupCosine(base_lr=1.0, warmup_iters=10, total_iters=110, min_lr=0.1)
    assert s.lr_at(0) == pytest.approx(0.001)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.55)  # half-way: the mean of 1 and 0.1
    assert s.lr_at(110) == pytest.approx(0.1)
    assert s.lr_at(500) == pytest.approx(0.1)
    lrs = [s.lr_at(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(ValueError, match="total_iters"):
        WarmupCosine(1.0, warmup_iters=10, total_iters=10)


def test_warmup_cosine_on_the_clock():
    # total_iters=None: the caller says how far the decay is (u), e.g. elapsed / budget
    s = WarmupCosine(base_lr=1.0, warmup_iters=10, total_iters=None, min_lr=0.1)
    assert s.lr_at(0, progress=0.7) == pytest.approx(0.001)  # warm-up still counts steps
    assert s.lr_at(40, progress=0.0) == pytest.approx(1.0)
    assert s.lr_at(40, progress=0.5) == pytest.approx(0.55)
    assert s.lr_at(40, progress=1.0) == pytest.approx(0.1)
    assert s.lr_at(40, progress=3.0) == pytest.approx(0.1)  # past the budget: min_lr
    with pytest.raises(ValueError, match="progress"):
        s.lr_at(40)
    stepwise = WarmupCosine(base_lr=1.0, warmup_iters=10, total_iters=110, min_lr=0.1)
    assert stepwise.lr_at(60, progress=0.25) == pytest.approx(WarmupCosine(1.0, 10, 110, 0.1).lr_at(35))


# ---------------------------------------------------------------------------
# Against torch.optim (optional)
# ---------------------------------------------------------------------------

TORCH_CASES = [
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    ("SGD", dict(lr=0.1, momentum=0.0, weight_decay=0.0)),
    ("Adam", dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0)),
    ("Adam", dict(lr=0.01, weight_decay=1e-2)),
    ("AdamW", dict(lr=0.01, weight_decay=1e-1)),
]


@pytest.mark.torch
@pytest.mark.parametrize("name,kw", TORCH_CASES)
def test_matches_torch_optim_step_by_step(name, kw):
    torch = pytest.importorskip("torch")
    ours = make_params()
    theirs = [torch.nn.Parameter(torch.tensor(p.data.copy())) for p in ours]
    opt = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[name](ours, **kw)
    topt = getattr(torch.optim, name)(theirs, **kw)
    sched = WarmupMultiStep(kw["lr"], warmup_iters=3, warmup_factor=0.1, milestones=(5,))
    for t in range(8):
        lr = sched.lr_at(t)
        opt.lr = lr
        for g in topt.param_groups:
            g["lr"] = lr
        for i, (p, q) in enumerate(zip(ours, theirs)):
            g = rng(10 * t + i).standard_normal(p.shape)
            p.grad[...] = g
            q.grad = torch.tensor(g)
        opt.step()
        topt.step()
        for p, q in zip(ours, theirs):
            np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.torch
def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch")
    ours = make_params()
    theirs = [torch.nn.Parameter(torch.tensor(p.data.copy())) for p in ours]
    for i, (p, q) in enumerate(zip(ours, theirs)):
        g = rng(i).standard_normal(p.shape) * 3
        p.grad[...] = g
        q.grad = torch.tensor(g)
    total = clip_grad_norm(ours, 0.5)
    ref = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert total == pytest.approx(float(ref), rel=1e-12)
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p.grad, q.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: Adam(ps, lr=0.01, weight_decay=1e-2),
        lambda ps: AdamW(ps, lr=0.01, weight_decay=1e-1),
        lambda ps: Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6),
    ],
)
def test_fused_adam_step_equals_the_numpy_reference(make, dtype, tol):
    rng = np.random.default_rng(5)
    shapes = [(3, 4), (7,), (2, 3, 5, 5), (1,)]
    a = [Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]
    b = [Parameter(p.data.copy()) for p in a]
    fused, reference = make(a), make(b)
    for _ in range(4):
        for p, q in zip(a, b):
            p.grad = rng.standard_normal(p.shape).astype(dtype)
            q.grad = p.grad.copy()
        fused.step()
        reference.step_reference()
    for p, q in zip(a, b):
        assert p.data.dtype == dtype
        np.testing.assert_allclose(p.data, q.data, rtol=tol, atol=tol)
    for k in ("exp_avg", "exp_avg_sq"):
        for i in fused.state[k]:
            np.testing.assert_allclose(fused.state[k][i], reference.state[k][i], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 7, 100003])
def test_sum_of_squares_equals_numpy(dtype, n):
    from tinymrcnn.kernels.cpu.optim import sum_of_squares

    g = np.random.default_rng(n).standard_normal(n).astype(dtype)
    expected = float(np.sum(np.square(g, dtype=np.float64)))
    assert sum_of_squares(g) == pytest.approx(expected, rel=1e-12, abs=0.0)
