"""Finite-difference gradient checking.

Every hand-written backward in tinymrcnn is checked the same way: reduce the
function's output to a scalar with a fixed random upstream gradient ``g``,
``L(x) = sum(f(x) * g)``, and compare the analytic ``dL/dx`` with the centred
difference

    dL/dx_i  ~=  (L(x + h e_i) - L(x - h e_i)) / (2 h)

in float64, whose truncation error is O(h^2). The error measure per element is
``|a - n| / max(|a|, |n|, floor)``: relative where values are large, absolute
near zero, so a correct gradient reaches about 1e-8 with h = 1e-6.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def numerical_gradient(
    f: Callable[[], float],
    x: np.ndarray,
    h: float = 1e-6,
    indices: Sequence[tuple] | None = None,
    richardson: bool = False,
) -> np.ndarray:
    """Centred-difference gradient of the scalar ``f()`` with respect to ``x``.

    ``x`` is perturbed in place and restored. With ``indices`` only those
    elements are computed (the rest stay 0), which keeps checks of large
    arrays cheap.

    The centred difference D(h) has error ``c h^2 + noise / h`` (truncation
    plus float64 rounding of f). With ``richardson=True`` the estimate is
    ``(4 D(h/2) - D(h)) / 3``, which cancels the h^2 term (error O(h^4)), so a
    larger h can be used and the rounding noise shrinks: the right choice for
    deep networks, whose loss sums thousands of terms.
    """
    if x.dtype != np.float64:
        raise ValueError(f"gradient checks need float64 arrays, got {x.dtype}")
    grad = np.zeros_like(x)
    its = indices if indices is not None else list(np.ndindex(*x.shape))

    def central(idx, step):
        old = x[idx]
        x[idx] = old + step
        fp = f()
        x[idx] = old - step
        fm = f()
        x[idx] = old
        return (fp - fm) / (2.0 * step)

    for idx in its:
        if richardson:
            grad[idx] = (4.0 * central(idx, h / 2) - central(idx, h)) / 3.0
        else:
            grad[idx] = central(idx, h)
    return grad


def relative_error(analytic: np.ndarray, numeric: np.ndarray, floor: float = 1e-8) -> float:
    """Largest elementwise ``|a - n| / max(|a|, |n|, floor)``."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"shape mismatch: analytic {a.shape} vs numeric {n.shape}")
    if a.size == 0:
        return 0.0
    denom = np.maximum(np.maximum(np.abs(a), np.abs(n)), floor)
    return float(np.max(np.abs(a - n) / denom))


def gradcheck(
    f: Callable[..., np.ndarray],
    inputs: Sequence[np.ndarray],
    backward: Callable[[np.ndarray], Sequence[np.ndarray]],
    h: float = 1e-6,
    max_checks: int | None = 200,
    seed: int = 0,
    floor: float = 1e-8,
) -> list[float]:
    """Compare a hand-written backward with centred differences.

    Args:
        f: ``f(*inputs) -> y`` (any shape), the forward pass. It must be a
            deterministic function of ``inputs``.
        inputs: float64 arrays; every one is checked.
        backward: ``backward(g) -> grads``, one gradient per input, the
            analytic gradient of ``sum(f(*inputs) * g)``. It is called right
            after one ``f(*inputs)`` call (so Modules may use their cache).
        h: finite-difference step.
        max_checks: check at most this many randomly chosen elements of each
            input (None: all of them).
        seed: seeds the upstream gradient and the choice of elements.
        floor: see :func:`relative_error`.

    Returns:
        The worst relative error of each input's gradient.
    """
    rng = np.random.default_rng(seed)
    inputs = list(inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, np.ndarray) or x.dtype != np.float64:
            raise ValueError(f"input {i} must be a float64 ndarray for a gradient check")
    y = f(*inputs)
    g = rng.standard_normal(np.shape(y))
    analytic = backward(g)
    if len(analytic) != len(inputs):
        raise ValueError(f"backward returned {len(analytic)} gradients for {len(inputs)} inputs")

    def loss() -> float:
        return float(np.sum(f(*inputs) * g))

    errors = []
    for x, a in zip(inputs, analytic):
        a = np.asarray(a, dtype=np.float64)
        if a.shape != x.shape:
            raise ValueError(f"gradient shape {a.shape} != input shape {x.shape}")
        all_idx = list(np.ndindex(*x.shape))
        if max_checks is not None and len(all_idx) > max_checks:
            pick = rng.choice(len(all_idx), size=max_checks, replace=False)
            idx = [all_idx[j] for j in pick]
        else:
            idx = all_idx
        num = numerical_gradient(loss, x, h, idx)
        sel = tuple(np.array(idx).T) if idx else ()
        errors.append(relative_error(a[sel], num[sel], floor) if idx else 0.0)
    return errors


def check_module(
    module,
    inputs: Sequence[np.ndarray],
    h: float = 1e-6,
    max_checks: int | None = 200,
    seed: int = 0,
    floor: float = 1e-8,
    scale_floor: float = 0.0,
    richardson: bool = False,
) -> dict[str, float]:
    """Gradient-check a Module's input(s) and every trainable parameter.

    The module must already hold float64 parameters (``module.to_dtype``).
    ``scale_floor`` > 0 raises the floor to ``scale_floor`` times the largest
    analytic gradient entry of all checked tensors: in a deep network some
    entries are exactly zero (e.g. a shift that a later BatchNorm removes) while
    the finite difference carries rounding noise of about
    ``1e-16 * sum|f * g| / h``; such entries are then compared in absolute
    terms, against the scale of the whole gradient.
    ``richardson``: see :func:`numerical_gradient`.
    Returns ``{"input0": err, ..., "<param name>": err}``.
    """
    rng = np.random.default_rng(seed)
    module.train()
    inputs = [np.ascontiguousarray(x, dtype=np.float64) for x in inputs]
    y = module(*inputs)
    g = rng.standard_normal(np.shape(y))
    module.zero_grad()
    dx = module.backward(g)
    dxs = dx if isinstance(dx, tuple) else (dx,)
    module.clear_cache()

    def loss() -> float:
        out = float(np.sum(module(*inputs) * g))
        module.clear_cache()
        return out

    def pick(shape):
        all_idx = list(np.ndindex(*shape))
        if max_checks is not None and len(all_idx) > max_checks:
            return [all_idx[j] for j in rng.choice(len(all_idx), size=max_checks, replace=False)]
        return all_idx

    result = {}
    targets = [(f"input{i}", x, a) for i, (x, a) in enumerate(zip(inputs, dxs))]
    targets += [(name, p.data, p.grad.copy()) for name, p in module.named_parameters() if p.requires_grad]
    scale = max((float(np.max(np.abs(a))) for _, _, a in targets if np.size(a)), default=0.0)
    floor = max(floor, scale_floor * scale)
    for name, x, a in targets:
        idx = pick(x.shape)
        num = numerical_gradient(loss, x, h, idx, richardson)
        if not idx:
            result[name] = 0.0
            continue
        sel = tuple(np.array(idx).T)
        result[name] = relative_error(np.asarray(a)[sel], num[sel], floor)
    return result
