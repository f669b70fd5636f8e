"""Helpers of the exercise notebooks: a short training run, and routing the model through your code.

Three of the exercise functions (the box coder, the proposal layer, the mask
loss) are what the model calls anyway, so a training run uses them as they
are. The other two are readable references whose fast twins (Numba kernels)
the model normally calls; :func:`use_conv2d_backward` and
:func:`use_roi_align` route the model through the reference for the
duration of a ``with`` block, so the run trains on the student's code.

``TINYMRCNN_NOTEBOOK_SMALL=1`` (CI) makes :func:`notebook_steps` return the
small step count, so every notebook runs in seconds.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import time

import numpy as np


def small() -> bool:
    """True when TINYMRCNN_NOTEBOOK_SMALL=1: run every notebook in its shortest form."""
    return os.environ.get("TINYMRCNN_NOTEBOOK_SMALL", "") == "1"


def notebook_steps(full: int, short: int = 2) -> int:
    """``full`` training steps, or ``short`` under TINYMRCNN_NOTEBOOK_SMALL=1."""
    return short if small() else full


def short_training(steps: int, batch_size: int = 2, lr: float = 2e-3, seed: int = 0, log_every: int = 5,
                   config=None):
    """Train a fresh shapes-preset model for ``steps`` steps; returns (model, history).

    history: one dict per step with the five losses, their sum ("total") and
    the step's wall time ("seconds"). AdamW with a 5-step linear warm-up and
    then a constant learning rate: enough for the losses to fall visibly in
    a few dozen steps, which is all a notebook needs.
    """
    from ..config import MaskRCNNConfig
    from ..data.shapes import ShapesDataset
    from ..model.mask_rcnn import MaskRCNN
    from ..train import TrainConfig, load_batch, make_optimizer, train_step

    cfg = config if config is not None else MaskRCNNConfig.shapes()
    model = MaskRCNN(cfg, seed=seed)
    optimizer = make_optimizer(model, TrainConfig(lr=lr))
    data = ShapesDataset(max(steps * batch_size, batch_size), seed=seed)
    history = []
    for step in range(steps):
        idx = np.arange(step * batch_size, (step + 1) * batch_size) % len(data)
        images, targets = load_batch(data, idx, step, seed, hflip=True)
        t0 = time.perf_counter()
        losses, _ = train_step(model, optimizer, images, targets, lr * min(1.0, (step + 1) / 5), grad_clip=10.0)
        losses = dict(losses, total=float(sum(losses.values())), seconds=time.perf_counter() - t0)
        history.append(losses)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:3d}  total {losses['total']:.3f}  "
                  + "  ".join(f"{k.replace('loss_', '')} {v:.3f}" for k, v in losses.items()
                              if k.startswith("loss_"))
                  + f"  ({losses['seconds']:.1f} s)")
    return model, history


def plot_losses(history, title: str = "training losses"):
    """The five losses and their sum against the step; returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = np.arange(len(history))
    for key in [k for k in history[0] if k.startswith("loss_")] + ["total"]:
        ax.plot(steps, [h[key] for h in history], label=key, lw=2 if key == "total" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return fig


@contextlib.contextmanager
def use_conv2d_backward(backward=None):
    """Inside the block, every Conv2d layer's backward calls ``backward`` (default: the package's
    ``conv2d_backward_reference``, i.e. your exercise) instead of the fast kernel."""
    nn_conv = importlib.import_module("..nn.conv", __package__)
    ops_conv = importlib.import_module("..ops.conv", __package__)
    fn = backward if backward is not None else ops_conv.conv2d_backward_reference

    def layer_backward(dy, x, w, stride=1, padding=0, need_input_grad=True):
        dx, dw, db = fn(dy, x, w, stride, padding)      # your function always makes dx
        return (dx if need_input_grad else None), dw, db

    saved = nn_conv.conv2d_backward
    nn_conv.conv2d_backward = layer_backward
    try:
        yield fn
    finally:
        nn_conv.conv2d_backward = saved


@contextlib.contextmanager
def use_roi_align(forward=True, backward=True):
    """Inside the block, the box and mask poolers run the readable RoIAlign (your exercises).

    forward / backward: True for the package's ``roi_align_reference`` /
    ``roi_align_backward_reference``, a function with the same signature, or
    False to keep the fast kernel. The references work on one map; the
    pooler's pyramid is handled here, one level at a time.
    """
    from ..checks import pair
    poolers = importlib.import_module("..model.poolers", __package__)
    ra = importlib.import_module("..ops.roi_align", __package__)

    fwd = ra.roi_align_reference if forward is True else forward
    bwd = ra.roi_align_backward_reference if backward is True else backward

    def as_array(f):
        return f.numpy() if isinstance(f, ra.ChannelsLast) else f

    def levels_forward(features, rois, levels, scales, output_size, sampling_ratio=-1, aligned=False,
                       mode="avg"):
        maps = [as_array(f) for f in features]
        ph, pw = pair(output_size, "output_size")
        out = np.zeros((len(rois), maps[0].shape[1], ph, pw), maps[0].dtype)
        for i, m in enumerate(maps):
            idx = np.flatnonzero(levels == i)
            if idx.size:
                out[idx] = fwd(m, rois[idx], (ph, pw), scales[i], sampling_ratio, aligned, mode)
        return out

    def levels_backward(dy, rois, levels, scales, input_shapes, sampling_ratio=-1, aligned=False,
                        mode="avg", features=None):
        grads = []
        for i, shape in enumerate(input_shapes):
            idx = np.flatnonzero(levels == i)
            if idx.size == 0:
                grads.append(np.zeros(shape, dy.dtype))
                continue
            x = as_array(features[i]) if features is not None else None
            grads.append(bwd(np.ascontiguousarray(dy[idx]), rois[idx], shape, scales[i], sampling_ratio,
                             aligned, mode, x))
        return grads

    saved = poolers.roi_align_levels, poolers.roi_align_levels_backward
    if fwd:
        poolers.roi_align_levels = levels_forward
    if bwd:
        poolers.roi_align_levels_backward = levels_backward
    try:
        yield
    finally:
        poolers.roi_align_levels, poolers.roi_align_levels_backward = saved
