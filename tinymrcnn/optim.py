"""Optimizers (SGD with momentum, Adam/AdamW), learning-rate schedules, gradient clipping.

The update rules are PyTorch's, step for step, so a run can be compared with
torch.optim (tests/test_optim.py does). Parameters whose ``requires_grad`` is
False are skipped. The learning rate is a plain attribute, ``opt.lr``, that a
schedule sets before each step:

    sched = WarmupMultiStep(base_lr=0.02, warmup_iters=100, warmup_factor=0.001,
                            milestones=(800, 1000), gamma=0.1)
    for it in range(iters):
        opt.lr = sched.lr_at(it)
        ... forward, backward ...
        opt.step(); opt.zero_grad()

``state_dict()`` returns a flat ``{name: ndarray}`` dict (step counters,
momentum buffers, Adam moments, the lr), so ``np.savez`` can store it with
the model weights and no pickle; buffer names carry the parameter's position
in the list given to the optimizer.
"""

from __future__ import annotations

import bisect
import math
from typing import Iterable

import numpy as np

from .kernels.cpu.optim import adam_update, sum_of_squares
from .nn.module import Parameter


def _as_param_list(params) -> list[Parameter]:
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, Parameter):
            raise TypeError(f"optimizer params must be Parameters, item {i} is {type(p).__name__}")
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    return params


class Optimizer:
    """Shared bookkeeping: the parameter list, lr, zero_grad and state (de)serialisation.

    ``self.state`` maps a buffer kind (e.g. "momentum_buffer") to a dict
    {parameter index: ndarray}; ``self.steps`` counts updates per parameter.
    """

    _buffers: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Parameter], lr: float):
        if not lr >= 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        self.params = _as_param_list(params)
        self.lr = float(lr)
        self.state: dict[str, dict[int, np.ndarray]] = {k: {} for k in self._buffers}
        self.steps: dict[int, int] = {}

    def trainable(self):
        """(index, parameter) for every parameter this optimizer updates."""
        return [(i, p) for i, p in enumerate(self.params) if p.requires_grad]

    def zero_grad(self) -> None:
        for p in self.params:
            p.zero_grad()

    def step(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat dict of arrays: ``lr``, ``step.{i}`` and ``{buffer}.{i}`` per parameter i."""
        out = {"lr": np.array(self.lr, np.float64)}
        for i, n in self.steps.items():
            out[f"step.{i}"] = np.array(n, np.int64)
        for kind, bufs in self.state.items():
            for i, b in bufs.items():
                out[f"{kind}.{i}"] = b.copy()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; shapes are checked before anything changes."""
        steps, bufs = {}, {k: {} for k in self._buffers}
        for key, value in state.items():
            if key == "lr":
                continue
            kind, _, idx = key.rpartition(".")
            if not idx.isdigit() or (kind != "step" and kind not in bufs):
                raise ValueError(f"{type(self).__name__}.load_state_dict: unexpected key {key!r}")
            i = int(idx)
            if i >= len(self.params):
                raise ValueError(f"{key!r} refers to parameter {i}, but the optimizer has {len(self.params)}")
            if kind == "step":
                steps[i] = int(value)
                continue
            value = np.asarray(value)
            if value.shape != self.params[i].data.shape:
                raise ValueError(f"{key!r}: shape {value.shape} != parameter shape {self.params[i].data.shape}")
            bufs[kind][i] = value.astype(self.params[i].data.dtype, copy=True)
        if "lr" in state:
            self.lr = float(state["lr"])
        self.steps, self.state = steps, bufs


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and L2 weight decay (torch.optim.SGD).

    For each trainable parameter p with gradient g:

        g   = g + weight_decay * p
        buf = g                          (first step)
        buf = momentum * buf + g         (later steps)
        d   = g + momentum * buf  if nesterov  else  buf
        p   = p - lr * d
    """

    _buffers = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = False):
        super().__init__(params, lr)
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        if nesterov and momentum == 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum, self.weight_decay, self.nesterov = float(momentum), float(weight_decay), nesterov

    def step(self) -> None:
        bufs = self.state["momentum_buffer"]
        for i, p in self.trainable():
            g = p.grad
            if self.weight_decay:
                g = g + self.weight_decay * p.data
            if self.momentum:
                if i not in bufs:
                    bufs[i] = g.copy()
                else:
                    bufs[i] *= self.momentum
                    bufs[i] += g
                g = g + self.momentum * bufs[i] if self.nesterov else bufs[i]
            p.data -= self.lr * g
            self.steps[i] = self.steps.get(i, 0) + 1


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015), torch.optim.Adam; with ``decoupled=True`` AdamW.

    For each trainable parameter p with gradient g, at its step t = 1, 2, ...:

        g = g + weight_decay * p              (Adam: L2 in the gradient)
        p = p * (1 - lr * weight_decay)       (AdamW instead: decay the weight)
        m = b1 m + (1 - b1) g
        v = b2 v + (1 - b2) g^2
        p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    _buffers = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ):
        super().__init__(params, lr)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        self.betas = (float(b1), float(b2))
        self.eps, self.weight_decay, self.decoupled = float(eps), float(weight_decay), decoupled

    def _moments(self, i, p):
        m_all, v_all = self.state["exp_avg"], self.state["exp_avg_sq"]
        if i not in m_all:
            m_all[i] = np.zeros_like(p.data)
            v_all[i] = np.zeros_like(p.data)
        t = self.steps.get(i, 0) + 1
        self.steps[i] = t
        return m_all[i], v_all[i], t

    def step(self) -> None:
        """The update below (``step_reference``), fused into one pass per parameter."""
        b1, b2 = self.betas
        for i, p in self.trainable():
            m, v, t = self._moments(i, p)
            wd = self.weight_decay
            s = p.data.dtype.type  # the scalars in the weights' dtype
            adam_update(
                p.data.reshape(-1),
                p.grad.reshape(-1),
                m.reshape(-1),
                v.reshape(-1),
                s(self.lr / (1 - b1**t)),
                s(b1),
                s(1 - b1),
                s(b2),
                s(1 - b2),
                s(math.sqrt(1 - b2**t)),
                s(self.eps),
                s(1 - self.lr * wd if self.decoupled else 1.0),
                s(0.0 if self.decoupled else wd),
            )

    def step_reference(self) -> None:
        """The readable update, one NumPy operation per line of the formula."""
        b1, b2 = self.betas
        for i, p in self.trainable():
            g = p.grad
            if self.weight_decay:
                if self.decoupled:
                    p.data *= 1 - self.lr * self.weight_decay
                else:
                    g = g + self.weight_decay * p.data
            m, v, t = self._moments(i, p)
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            step_size = self.lr / (1 - b1**t)
            denom = np.sqrt(v) / math.sqrt(1 - b2**t) + self.eps
            p.data -= step_size * m / denom


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), torch.optim.AdamW defaults."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled=True)


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale the gradients so their global L2 norm is at most ``max_norm``.

    ``total = sqrt(sum over trainable p of ||p.grad||^2)``; if ``total > max_norm``
    every gradient is multiplied by ``max_norm / (total + 1e-6)`` (torch's
    ``clip_grad_norm_``). Returns the norm before clipping (NaN/inf are
    returned as they are, and then nothing is scaled, so the caller sees them).
    """
    grads = [p.grad for p in params if p.requires_grad]
    total = math.sqrt(sum(sum_of_squares(g.reshape(-1)) for g in grads))
    if math.isfinite(total) and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in grads:
            g *= coef
    return total


class _LinearWarmup:
    """The warm-up factor both schedules share: from ``warmup_factor`` up to 1.

    ``warmup(step) = warmup_factor * (1 - a) + a`` with ``a = step / warmup_iters``
    for ``step < warmup_iters``, and 1 afterwards (torchvision's "linear" warm-up).
    """

    def __init__(self, base_lr: float, warmup_iters: int, warmup_factor: float):
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
        self.base_lr, self.warmup_iters = float(base_lr), int(warmup_iters)
        self.warmup_factor = float(warmup_factor)

    def _warmup(self, step: int) -> float:
        if step >= self.warmup_iters:
            return 1.0
        a = step / self.warmup_iters
        return self.warmup_factor * (1 - a) + a

    def lr_at(self, step: int) -> float:
        raise NotImplementedError


class WarmupMultiStep(_LinearWarmup):
    """Linear warm-up, then the lr times gamma at each milestone (torchvision / detectron2).

    ``lr_at(step) = base_lr * warmup(step) * gamma ** (number of milestones <= step)``.
    """

    def __init__(
        self, base_lr: float, warmup_iters: int = 0, warmup_factor: float = 0.001, milestones=(), gamma: float = 0.1
    ):
        super().__init__(base_lr, warmup_iters, warmup_factor)
        milestones = [int(m) for m in milestones]
        if milestones != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {milestones}")
        self.milestones, self.gamma = milestones, float(gamma)

    def lr_at(self, step: int) -> float:
        return self.base_lr * self._warmup(step) * self.gamma ** bisect.bisect_right(self.milestones, step)


class WarmupCosine(_LinearWarmup):
    """Linear warm-up to ``base_lr``, then a half cosine down to ``min_lr`` at ``total_iters``.

    For ``warmup_iters <= step <= total_iters``, with ``u = (step - warmup_iters) /
    (total_iters - warmup_iters)``: ``lr = min_lr + (base_lr - min_lr) (1 + cos(pi u)) / 2``;
    ``min_lr`` after ``total_iters``. During warm-up: ``base_lr * warmup(step)``.

    A schedule that runs on the clock instead of on steps (``tinymrcnn train
    --minutes``) passes ``total_iters=None`` and gives ``lr_at`` the fraction
    ``u`` of the decay it has reached itself (elapsed time / budget).
    """

    def __init__(
        self,
        base_lr: float,
        warmup_iters: int,
        total_iters: int | None,
        min_lr: float = 0.0,
        warmup_factor: float = 0.001,
    ):
        super().__init__(base_lr, warmup_iters, warmup_factor)
        if total_iters is not None and total_iters <= warmup_iters:
            raise ValueError(f"total_iters ({total_iters}) must exceed warmup_iters ({warmup_iters})")
        self.total_iters = None if total_iters is None else int(total_iters)
        self.min_lr = float(min_lr)

    def lr_at(self, step: int, progress: float | None = None) -> float:
        """The learning rate of step ``step``; ``progress`` (0..1) replaces u when given."""
        if step < self.warmup_iters:
            return self.base_lr * self._warmup(step)
        if progress is None:
            if self.total_iters is None:
                raise ValueError("a WarmupCosine without total_iters needs lr_at(step, progress)")
            progress = (step - self.warmup_iters) / (self.total_iters - self.warmup_iters)
        u = min(max(progress, 0.0), 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * u))
