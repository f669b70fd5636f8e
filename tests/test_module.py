"""The layer protocol: cache stack, parameter accumulation, state dicts."""

import numpy as np
import pytest

from tinymrcnn.gradcheck import check_module, gradcheck, relative_error
from tinymrcnn.nn import Module, Parameter, Sequential


class Scale(Module):
    """y = w * x (elementwise, per channel); a minimal layer for protocol tests."""

    def __init__(self, c):
        super().__init__()
        self.weight = Parameter(np.linspace(0.5, 1.5, c))
        self.register_buffer("calls", np.zeros(1))

    def forward(self, x):
        self.save(x)
        return x * self.weight.data

    def backward(self, dy):
        (x,) = self.restore()
        self.weight.accumulate((dy * x).reshape(-1, x.shape[-1]).sum(0))
        return dy * self.weight.data


def test_shared_module_called_twice_accumulates_and_pops_in_reverse():
    m = Scale(3)
    a, b = np.ones((2, 3)), 2 * np.ones((2, 3))
    m(a)
    m(b)
    dx_b = m.backward(np.ones((2, 3)))
    dx_a = m.backward(np.ones((2, 3)))
    np.testing.assert_allclose(dx_a, dx_b)
    np.testing.assert_allclose(m.weight.grad, [6.0, 6.0, 6.0])  # 2*1 + 2*2 per channel
    with pytest.raises(RuntimeError, match="no saved forward pass"):
        m.backward(np.ones((2, 3)))


def test_eval_mode_keeps_no_cache():
    m = Scale(2).eval()
    m(np.ones((1, 2)))
    with pytest.raises(RuntimeError, match="eval mode keeps no caches"):
        m.backward(np.ones((1, 2)))


def test_frozen_parameter_gets_no_gradient():
    m = Scale(2)
    m.freeze()
    m(np.ones((1, 2)))
    m.backward(np.ones((1, 2)))
    assert np.all(m.weight.grad == 0)


def test_sequential_names_state_dict_and_strict_loading():
    net = Sequential(Scale(2), Scale(2))
    sd = net.state_dict()
    assert list(sd) == ["0.weight", "1.weight", "0.calls", "1.calls"]
    sd["0.weight"] = np.array([3.0, 4.0])
    net.load_state_dict(sd)
    np.testing.assert_allclose(net[0].weight.data, [3.0, 4.0])
    bad = dict(sd)
    bad["0.weight"] = np.zeros(5)
    bad.pop("1.weight")
    bad["extra"] = np.zeros(1)
    with pytest.raises(ValueError) as e:
        net.load_state_dict(bad)
    msg = str(e.value)
    assert "0.weight: expected (2,), got (5,)" in msg and "missing: 1.weight" in msg
    assert "unexpected: extra" in msg
    np.testing.assert_allclose(net[0].weight.data, [3.0, 4.0])  # nothing changed


def test_check_module_on_sequential():
    net = Sequential(Scale(3), Scale(3))
    errs = check_module(net, [np.random.default_rng(0).standard_normal((4, 3))])
    assert set(errs) == {"input0", "0.weight", "1.weight"}
    assert max(errs.values()) < 1e-8


def test_gradcheck_detects_a_wrong_backward():
    x = np.random.default_rng(1).standard_normal(5)
    good = gradcheck(lambda x: x**2, [x], lambda g: [2 * x * g])
    bad = gradcheck(lambda x: x**2, [x], lambda g: [x * g])
    assert good[0] < 1e-8
    assert bad[0] > 0.1


def test_gradcheck_rejects_float32():
    with pytest.raises(ValueError, match="float64"):
        gradcheck(lambda x: x, [np.ones(3, np.float32)], lambda g: [g])


def test_relative_error_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        relative_error(np.ones(2), np.ones(3))
