"""Parameter, Module and Sequential: the layer protocol every stage follows.

The protocol (read this once; every layer in tinymrcnn follows it)
------------------------------------------------------------------
* ``forward(*inputs)`` computes the output. In training mode it also pushes
  a *cache* -- a tuple of whatever its backward needs -- onto the module's
  own stack with ``self.save(...)``.
* ``backward(grad_output)`` pops the most recent cache with ``self.restore()``,
  returns the gradient with respect to the input(s), and *adds* the gradient
  of the loss with respect to each parameter into ``param.grad``.

The cache is a stack, not a single slot, so one module may be called several
times in one forward pass (the RPN head runs once per pyramid level with the
same weights). The backward calls must then come in reverse order, which is
what a backward pass does anyway: last in, first out. Parameter gradients
from every call add up, which is exactly the rule for shared weights.

In eval mode nothing is cached (inference keeps no activations), and calling
``backward`` then raises an error that says so.

Parameters are plain NumPy arrays wrapped in :class:`Parameter`; their shapes
follow PyTorch so that weights move between the two without transposes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import numpy as np


class Parameter:
    """A trainable array and its gradient.

    Attributes:
        data: the value, float32 (or float64 for gradient checks).
        grad: the accumulated gradient, same shape and dtype as ``data``.
        requires_grad: False for frozen parameters (``backward`` leaves
            ``grad`` untouched and optimizers skip them).
    """

    def __init__(self, data: np.ndarray, requires_grad: bool = True):
        self.data = np.ascontiguousarray(data)
        self.grad = np.zeros_like(self.data)
        self.requires_grad = requires_grad

    @property
    def shape(self):
        return self.data.shape

    def zero_grad(self) -> None:
        self.grad = np.zeros_like(self.data)

    def accumulate(self, g: np.ndarray) -> None:
        """Add ``g`` into ``grad`` (a no-op for a frozen parameter)."""
        if self.requires_grad:
            if g.shape != self.data.shape:
                raise ValueError(f"gradient shape {g.shape} != parameter shape {self.data.shape}")
            self.grad += g.astype(self.grad.dtype, copy=False)

    def __repr__(self) -> str:
        frozen = "" if self.requires_grad else ", frozen"
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype}{frozen})"


class Module:
    """Base class of every layer and of the model itself.

    Subclasses assign :class:`Parameter` and :class:`Module` attributes in
    ``__init__`` (after calling ``super().__init__()``); they are found by
    :meth:`named_parameters` in assignment order. Non-trainable arrays that
    belong in checkpoints (running statistics, frozen BN constants) are
    registered with :meth:`register_buffer`.
    """

    def __init__(self):
        self.training = True
        self._caches: list = []
        self._buffers: dict[str, np.ndarray] = {}

    # -- the cache stack -------------------------------------------------
    def save(self, *tensors) -> None:
        """Push what backward will need (only in training mode)."""
        if self.training:
            self._caches.append(tensors)

    def restore(self) -> tuple:
        """Pop the cache of the most recent forward call."""
        if not self._caches:
            raise RuntimeError(
                f"{type(self).__name__}.backward called with no saved forward pass: "
                "run forward in train() mode first (eval mode keeps no caches), and call "
                "backward once per forward call"
            )
        return self._caches.pop()

    def clear_cache(self) -> None:
        """Drop every saved forward pass, in this module and its children."""
        for m in self.modules():
            m._caches.clear()

    # -- the two passes ----------------------------------------------------
    def forward(self, *inputs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def backward(self, grad_output):
        raise NotImplementedError(f"{type(self).__name__} does not define backward")

    def __call__(self, *inputs, **options):
        return self.forward(*inputs, **options)

    # -- children, parameters, buffers -------------------------------------
    def register_buffer(self, name: str, value: np.ndarray) -> None:
        # asarray(order="C"), not ascontiguousarray: the latter turns a 0-d
        # buffer (BatchNorm's num_batches_tracked) into shape (1,).
        self._buffers[name] = np.asarray(value, order="C")
        object.__setattr__(self, name, self._buffers[name])

    def __setattr__(self, name, value):
        # Keep a re-assigned buffer (e.g. running_mean = ...) in the buffer table.
        if "_buffers" in self.__dict__ and name in self._buffers:
            self._buffers[name] = value
        object.__setattr__(self, name, value)

    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        for name, value in self.__dict__.items():
            if isinstance(value, Module):
                yield name, value

    def modules(self) -> Iterator["Module"]:
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every parameter with its dotted name, e.g. ``backbone.layer1.0.conv1.weight``."""
        for name, value in self.__dict__.items():
            if isinstance(value, Parameter):
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value.named_parameters(prefix + name + ".")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        for name, value in self._buffers.items():
            yield prefix + name, value
        for cname, child in self.named_children():
            yield from child.named_buffers(prefix + cname + ".")

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Parameters and buffers by dotted name (copies)."""
        out = OrderedDict()
        for name, p in self.named_parameters():
            out[name] = p.data.copy()
        for name, b in self.named_buffers():
            out[name] = np.array(b, copy=True)
        return out

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays from ``state`` into parameters and buffers.

        With ``strict=True`` every missing, unexpected or mis-shaped entry is
        reported in one ValueError before anything is changed.
        """
        targets: dict = {}
        for name, p in self.named_parameters():
            targets[name] = ("param", p)
        for name, _ in self.named_buffers():
            targets[name] = ("buffer", name)
        missing = [k for k in targets if k not in state]
        unexpected = [k for k in state if k not in targets]
        mis_shaped = []
        for k, (kind, obj) in targets.items():
            if k in state:
                want = obj.data.shape if kind == "param" else self._find_buffer(k).shape
                got = np.shape(state[k])
                if tuple(want) != tuple(got):
                    mis_shaped.append(f"{k}: expected {tuple(want)}, got {tuple(got)}")
        problems = []
        if mis_shaped:
            problems.append("shape mismatch: " + "; ".join(mis_shaped))
        if strict and missing:
            problems.append("missing: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected: " + ", ".join(unexpected))
        if problems:
            raise ValueError("load_state_dict: " + " | ".join(problems))
        for k, (kind, obj) in targets.items():
            if k not in state:
                continue
            value = np.asarray(state[k])
            if kind == "param":
                obj.data = np.ascontiguousarray(value.astype(obj.data.dtype, copy=True))
                obj.grad = np.zeros_like(obj.data)
            else:
                owner, leaf = self._buffer_owner(k)
                old = owner._buffers[leaf]
                setattr(owner, leaf, np.asarray(value.astype(old.dtype, copy=True), order="C"))

    def _buffer_owner(self, dotted: str) -> tuple["Module", str]:
        *path, leaf = dotted.split(".")
        owner = self
        for part in path:
            owner = getattr(owner, part)
        return owner, leaf

    def _find_buffer(self, dotted: str) -> np.ndarray:
        owner, leaf = self._buffer_owner(dotted)
        return owner._buffers[leaf]

    # -- modes and housekeeping ---------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            m.training = mode
            if not mode:
                m._caches.clear()
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    def to_dtype(self, dtype) -> "Module":
        """Cast every parameter and floating buffer (float64 is used by gradient checks)."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = np.zeros_like(p.data)
        for m in self.modules():
            for name, b in list(m._buffers.items()):
                if np.issubdtype(b.dtype, np.floating):
                    setattr(m, name, b.astype(dtype))
        return self

    def freeze(self) -> "Module":
        """Mark every parameter below this module as not trainable."""
        for p in self.parameters():
            p.requires_grad = False
        return self

    def __repr__(self) -> str:
        n = sum(p.data.size for p in self.parameters())
        return f"{type(self).__name__}({n} parameters)"


class Sequential(Module):
    """Modules applied in order; backward runs them in reverse.

    Children are named "0", "1", ... as in PyTorch, so their parameters read
    ``layer.0.weight`` in state dicts.
    """

    def __init__(self, *modules: Module):
        super().__init__()
        for i, m in enumerate(modules):
            object.__setattr__(self, str(i), m)
        self._n = len(modules)

    def __getitem__(self, i: int) -> Module:
        if i < 0:
            i += self._n
        return getattr(self, str(i))

    def __len__(self) -> int:
        return self._n

    def __iter__(self):
        return (self[i] for i in range(self._n))

    def forward(self, x):
        for m in self:
            x = m(x)
        return x

    def backward(self, grad_output):
        for m in reversed(list(self)):
            grad_output = m.backward(grad_output)
        return grad_output
