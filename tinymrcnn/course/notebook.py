"""Helpers of the exercise notebooks: a short training run, and routing the model through your code.

Three of the exercise functions (the box coder, the proposal layer, the mask
loss) are what the model calls anyway, so a training run uses them as they
are. The other two are readable references whose fast twins (Numba kernels)
the model normally calls; :func:`use_conv2d_backward` and
:func:`use_roi_align` route the model through the reference for the
duration of a ``with`` block, so the run trains on the student's code.

``TINYMRCNN_NOTEBOOK_MODE=test`` (or ``TINYMRCNN_NOTEBOOK_SMALL=1``; CI sets
it) makes :func:`notebook_steps` return the small step count, so every
notebook runs in seconds: the test mode of the step-through notebooks.

:func:`setup_exercise` (the first cell of every exercise notebook) turns on
inline figures and lets each exercise run on its own, in any order: every
function of the *other* exercises that is still a stub runs the reference
solution from ``tinymrcnn/course/reference/`` (written by make-student), and
a note says which. The notebook's own exercise is never replaced.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import time
from pathlib import Path

import numpy as np


def small() -> bool:
    """True in the test mode (TINYMRCNN_NOTEBOOK_MODE=test or TINYMRCNN_NOTEBOOK_SMALL=1): shortest runs."""
    mode = os.environ.get("TINYMRCNN_NOTEBOOK_MODE", "").strip().lower()
    return mode == "test" or (mode == "" and os.environ.get("TINYMRCNN_NOTEBOOK_SMALL", "") == "1")


# ---------------------------------------------------------------------------
# Each exercise on its own: the reference solution for the other exercises' stubs
# ---------------------------------------------------------------------------
_FALLBACKS: dict[str, list[str]] = {}  # exercise name -> functions running the reference
_MISSING: dict[str, list[str]] = {}  # stubs without a reference in this copy
REFERENCE_MARK = "__tinymrcnn_reference__"


def _package_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def _is_stub(fn, exercise: str, function: str) -> bool:
    """True if ``fn`` still holds make-student's ``raise NotImplementedError("Exercise ...")``."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return f'raise NotImplementedError("Exercise {exercise}: write {function}")' in source


def _get(module, qualname):
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _reference_module(ex):
    """The reference (solution) version of ``ex``'s module, from tinymrcnn/course/reference/; or None."""
    rel = Path(*ex.path.split("/")[1:])  # ops/roi_align.py
    path = _package_dir() / "course" / "reference" / rel
    if not path.is_file() or os.environ.get("TINYMRCNN_GRADING") == "1":  # never while grading
        return None
    parent, _, leaf = ex.module.rpartition(".")
    name = f"{parent}._reference_{leaf}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = parent  # relative imports: the package itself
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _replace_everywhere(old, new) -> None:
    """Point every loaded tinymrcnn module's global that is ``old`` at ``new``."""
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("tinymrcnn") or "._reference_" in mod_name:
            continue
        for key, value in list(vars(mod).items()):
            if value is old:
                setattr(mod, key, new)


def use_reference_for_stubs(own: str | None = None) -> dict[str, list[str]]:
    """Make every exercise function still a stub, except exercise ``own``'s, run the reference solution.

    Returns {exercise: [functions now running the reference]}. Stubs without
    a reference (a copy made with --no-reference) are left alone and listed
    in ``_MISSING``. Idempotent; lasts for the interpreter (restart the
    kernel after writing one of them).
    """
    from .exercises import EXERCISES

    importlib.import_module("..model.mask_rcnn", __package__)  # the model's modules, loaded now
    for ex in EXERCISES:
        if ex.name == own:
            continue
        module = importlib.import_module(ex.module)
        stubs = [p.function for p in ex.parts if _is_stub(_get(module, p.function), ex.name, p.function)]
        if not stubs:
            continue
        ref = _reference_module(ex)
        if ref is None:
            _MISSING[ex.name] = stubs
            continue
        for function in stubs:
            new = _get(ref, function)
            if "." in function:  # a method: replace it on the class
                cls_name, meth = function.rsplit(".", 1)
                setattr(_get(module, cls_name), meth, new)
            else:
                _replace_everywhere(getattr(module, function), new)
            try:
                setattr(new, REFERENCE_MARK, True)
            except AttributeError:
                pass
        _FALLBACKS.setdefault(ex.name, [])
        _FALLBACKS[ex.name] += [f for f in stubs if f not in _FALLBACKS[ex.name]]
    return dict(_FALLBACKS)


def fallback_note() -> str:
    """One line on what runs the reference solution instead of a stub ('' if nothing)."""
    from .exercises import BY_NAME

    lines = []
    if _FALLBACKS:
        lines.append(
            "note: not written yet, so the reference solution runs for: "
            + "; ".join(f"exercise {BY_NAME[n].number} {n} ({', '.join(fs)})" for n, fs in _FALLBACKS.items())
            + ". Everything else is your code."
        )
    if _MISSING:
        lines.append(
            "note: not written yet and no reference in this copy: "
            + "; ".join(f"exercise {BY_NAME[n].number} {n} ({', '.join(fs)})" for n, fs in _MISSING.items())
            + ": the cells that train the model need those first."
        )
    return "\n".join(lines)


def setup_exercise(name: str) -> None:
    """The first cell of exercise notebook ``name``: inline figures, the fallback for other stubs, a note."""
    try:
        from IPython import get_ipython

        ip = get_ipython()
        if ip is not None:
            ip.run_line_magic("matplotlib", "inline")
    except ImportError:
        pass
    import tinymrcnn

    print("tinymrcnn from", Path(tinymrcnn.__file__).parent, "| short run:", small())
    use_reference_for_stubs(own=name)
    note = fallback_note()
    if note:
        print(note)


def show(fig):
    """Display a matplotlib figure as a PNG in the notebook, whatever the backend.

    For figures made without pyplot (``tinymrcnn.viz`` returns
    ``matplotlib.figure.Figure`` objects), which ``plt.show()`` does not know.
    Outside IPython the figure is returned unchanged.
    """
    import io

    try:
        from IPython.display import Image, display
    except ImportError:
        return fig
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    display(Image(data=buf.getvalue(), format="png"))
    return None


def is_reference(fn) -> bool:
    """True if ``fn`` is a reference solution standing in for a stub."""
    return bool(getattr(fn, REFERENCE_MARK, False))


def notebook_steps(full: int, short: int = 2) -> int:
    """``full`` training steps, or ``short`` in the test mode (:func:`small`)."""
    return short if small() else full


def short_training(steps: int, batch_size: int = 2, lr: float = 2e-3, seed: int = 0, log_every: int = 5, config=None):
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

    note = fallback_note()
    if note:
        print(note)
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
            print(
                f"step {step:3d}  total {losses['total']:.3f}  "
                + "  ".join(f"{k.replace('loss_', '')} {v:.3f}" for k, v in losses.items() if k.startswith("loss_"))
                + f"  ({losses['seconds']:.1f} s)"
            )
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
        dx, dw, db = fn(dy, x, w, stride, padding)  # your function always makes dx
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
    # Exercise 4 or 5 not written yet: its reference stands in, but the fast kernel is the same
    # function and much quicker in a training run.
    if fwd and is_reference(fwd):
        print("note: roi_align_reference is not written yet: the poolers keep the fast kernel forward")
        fwd = False
    if bwd and is_reference(bwd):
        print("note: roi_align_backward_reference is not written yet: the poolers keep the fast kernel backward")
        bwd = False

    def as_array(f):  # the kernels' channels-last copy back to (N, C, H, W)
        data = getattr(f, "data", None)
        return np.ascontiguousarray(data.transpose(0, 3, 1, 2)) if isinstance(data, np.ndarray) else f

    def levels_forward(features, rois, levels, scales, output_size, sampling_ratio=-1, aligned=False, mode="avg"):
        maps = [as_array(f) for f in features]
        ph, pw = pair(output_size, "output_size")
        out = np.zeros((len(rois), maps[0].shape[1], ph, pw), maps[0].dtype)
        for i, m in enumerate(maps):
            idx = np.flatnonzero(levels == i)
            if idx.size:
                out[idx] = fwd(m, rois[idx], (ph, pw), scales[i], sampling_ratio, aligned, mode)
        return out

    def levels_backward(dy, features, rois, levels, scales, output_size, sampling_ratio=-1, aligned=False, mode="avg"):
        grads = []
        for i, f in enumerate(features):
            x = as_array(f)
            idx = np.flatnonzero(levels == i)
            if idx.size == 0:
                grads.append(np.zeros(x.shape, dy.dtype))
                continue
            grads.append(
                bwd(np.ascontiguousarray(dy[idx]), x, rois[idx], output_size, scales[i], sampling_ratio, aligned, mode)
            )
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


def fast_roi_align_backward(dy, x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, mode="avg"):
    """The package's fast RoIAlign backward (the Numba kernel), for comparisons in the notebooks.

    Arguments as ``roi_align_backward_reference``: dy, then the forward's.
    """
    ra = importlib.import_module("..ops.roi_align", __package__)
    return ra.roi_align_backward(dy, x, rois, output_size, spatial_scale, sampling_ratio, aligned, mode)
