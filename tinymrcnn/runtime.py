"""How the model runs, kept out of the model: device, BLAS threads, the step's gradients, timing.

The model's code (``tinymrcnn/model``, ``tinymrcnn/nn``) computes; it never asks
how many threads it has, which device its kernels run on, or how long it
took. Those are set here, around its calls, by ``train.py``, ``cli.py``, the
benchmarks and the data-parallel workers (``parallel.py``):

    with runtime.session(model.config):           # kernels on config.device, BLAS threads
        losses = runtime.compute_gradients(model, images, targets)

    timer = runtime.StageTimer()
    with timer.watch(model):                       # time each stage's forward and backward
        ...
    print(timer.table())

    with runtime.record_layers(model, ["backbone.body.layer2"]) as outputs:
        model.predict([image])                     # outputs["backbone.body.layer2"]: [(N, C, H, W)]

    runtime.keep_freed_memory()                    # a training process: reuse freed pages
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import sys
import time
from collections import OrderedDict
from contextlib import ExitStack, contextmanager

from .kernels import get_device, set_device

# glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # the largest glibc accepts on a 64-bit machine
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the OS.

    A training step allocates and frees the same arrays every step
    (activations, gradients, the convolutions' stacked copies, from a few
    KB to a few MB each). By default glibc's malloc serves the large ones
    with a fresh ``mmap`` and gives them back on ``free``, and returns free
    space at the top of its heap to the OS; the next step's arrays then land
    on new pages, which the kernel zero-fills on first touch. Measured on
    the shapes preset (one worker's step of 2 images): ~3000 page faults
    per step, 117 ms per step; with the two thresholds raised, 3-4 faults
    and 109 ms. The process's memory then stays near its peak between
    steps instead of shrinking, which is what a training process wants.

    Process-wide and permanent; only on Linux with glibc (elsewhere it does
    nothing and returns False). Called by ``train()`` and by each
    data-parallel worker before their first step.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # Both together: setting either one switches off glibc's adaptive thresholds, and
    # raising only one of them left the step slower than the default (measured).
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


@contextmanager
def session(config, processes: int = 1):
    """Run the ops on ``config.device`` with ``config.blas_threads`` BLAS threads, then restore both.

    BLAS threads: the Numba kernels already run in parallel, and on a small
    machine OpenBLAS's spin-waiting threads steal their cores (README, Speed),
    so the shapes preset uses one. None leaves the process's setting alone; 0
    shares the CPU's cores out among ``processes`` (the data-parallel workers
    that run at once), at least one thread each.
    """
    previous = get_device()
    with ExitStack() as stack:
        set_device(config.device)
        stack.callback(set_device, previous)
        if config.blas_threads is not None:
            from threadpoolctl import threadpool_limits

            threads = config.blas_threads or max(1, (os.cpu_count() or 1) // max(1, processes))
            stack.enter_context(threadpool_limits(limits=threads, user_api="blas"))
        yield


def check_device(config) -> None:
    """Raise :func:`session`'s error now if ``config.device`` cannot run (no GPU for "cuda").

    Changes nothing: the commands call it before they write anything, so a
    mistaken ``--device cuda`` leaves no half-made run behind.
    """
    previous = get_device()
    set_device(config.device)
    set_device(previous)


def compute_gradients(model, images, targets) -> dict:
    """One training step's gradients: zero them, forward with losses, backward.

    Leaves the gradient of the summed losses in every ``Parameter.grad`` and
    returns the five losses. A non-finite loss skips the backward (the caller
    stops training); the single process and every data-parallel worker run
    exactly this.
    """
    model.zero_grad()
    losses = model.forward_train(images, targets)
    if all(math.isfinite(v) for v in losses.values()):
        model.backward()
    return losses


# The stages of a MaskRCNN whose forward and backward a StageTimer times
# (dotted path, method names): nested stages are included in their parents.
MASK_RCNN_STAGES = (
    ("backbone.body", ("forward", "backward")),
    ("backbone.fpn", ("forward", "backward")),
    ("rpn", ("forward",)),  # head + anchors + proposal layer
    ("rpn.head", ("forward", "backward")),
    ("rpn", ("loss",)),  # anchor targets + RPN losses
    ("roi_heads", ("forward_train", "forward")),
    ("roi_heads.box_roi_pool", ("forward", "backward")),
    ("roi_heads.box_head", ("forward", "backward")),
    ("roi_heads.box_predictor", ("forward", "backward")),
    ("roi_heads.mask_roi_pool", ("forward", "backward")),
    ("roi_heads.mask_head", ("forward", "backward")),
)


class StageTimer:
    """Accumulates wall-clock seconds per named stage, in first-seen order."""

    def __init__(self):
        self.seconds: OrderedDict[str, float] = OrderedDict()
        self.calls: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.calls[name] = self.calls.get(name, 0) + 1

    @contextmanager
    def watch(self, model, stages=MASK_RCNN_STAGES):
        """Time the given methods of the model's stages while inside the block.

        Each method is wrapped on its instance (the class and the model's
        code are untouched) and unwrapped on exit. Rows read e.g.
        "backbone.body forward"; nested stages count in their parents too.
        """
        wrapped = []
        try:
            for path, methods in stages:
                module = model
                for part in path.split(".") if path else []:
                    module = getattr(module, part)
                for method in methods:
                    wrapped.append((module, method))
                    setattr(module, method, self._timed(f"{path} {method}", getattr(module, method)))
            yield self
        finally:
            for module, method in wrapped:
                module.__dict__.pop(method, None)

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def table(self, repeats: int = 1, total_s: float | None = None) -> str:
        """One row per stage, ms per repeat; ``total_s`` (the whole step) adds each stage's share."""
        lines = [f"{'stage':36s} {'ms':>9s} {'share':>7s}"]
        for name, s in self.seconds.items():
            share = f"{100 * s / total_s:6.1f}%" if total_s else ""
            lines.append(f"{name:36s} {1000 * s / repeats:9.1f} {share:>7s}")
        if total_s:
            lines.append(f"{'whole step':36s} {1000 * total_s / repeats:9.1f}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------
# Activations of named layers, recorded from outside the model
# ----------------------------------------------------------------------------
def find_module(model, name: str):
    """The sub-module at a dotted path, e.g. "backbone.body.layer2" or "rpn.head.conv"."""
    module = model
    for i, part in enumerate(name.split(".") if name else []):
        child = getattr(module, part, None)
        if child is None or not hasattr(child, "forward"):
            where = ".".join(name.split(".")[:i]) or "the model"
            have = ", ".join(n for n, _ in module.named_children()) if hasattr(module, "named_children") else ""
            raise ValueError(f"no layer {name!r}: {where} has no child {part!r} (its children: {have or 'none'})")
        module = child
    return module


def layer_names(model, depth: int = 3) -> list[str]:
    """The dotted names :func:`record_layers` accepts, down to ``depth`` levels."""

    def walk(module, prefix, level):
        for name, child in module.named_children():
            yield prefix + name
            if level < depth:
                yield from walk(child, prefix + name + ".", level + 1)

    return list(walk(model, "", 1))


def _to_host(value):
    """A copy of a layer's output on the host: arrays copied, tuples and lists element by element."""
    if isinstance(value, (tuple, list)):
        return type(value)(_to_host(v) for v in value)
    if hasattr(value, "copy_to_host"):  # a GPU array
        return value.copy_to_host()
    return value.copy() if hasattr(value, "copy") else value


@contextmanager
def record_layers(model, names):
    """Record the outputs of the named layers' forward calls while inside the block.

    As :meth:`StageTimer.watch`, each layer's ``forward`` is wrapped on its
    instance (the model's code is untouched) and unwrapped on exit. Yields
    a dict: name -> list of the outputs (host copies), one per call (a
    layer that runs once per pyramid level records one per level).
    """
    names = list(dict.fromkeys(names))  # each name once, in the given order
    modules = [find_module(model, n) for n in names]  # every name checked before any wrapping
    recorded = {n: [] for n in names}
    wrapped = []  # (module, the instance's own forward before, if any: a StageTimer's wrapper)
    try:
        for name, module in zip(names, modules):
            wrapped.append((module, module.__dict__.get("forward")))
            module.forward = _recording(module.forward, recorded[name])
        yield recorded
    finally:
        for module, before in reversed(wrapped):
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = before


def _recording(fn, outputs):
    def forward(*args, **kwargs):
        out = fn(*args, **kwargs)
        outputs.append(_to_host(out))
        return out

    return forward
