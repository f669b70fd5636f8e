"""One training step of the torchvision preset (R50-FPN) next to torchvision's, stage by stage.

    python benchmarks/bench_r50_train.py [--repeats 3] [--size 512] [--images 2] [--blas-threads N]

Both models hold the same weights (torchvision's randomly initialised
``maskrcnn_resnet50_fpn`` with a frozen-BN ResNet-50 and 3 trainable stages,
converted with ``torchvision_compat.model_from_torchvision``), both resize
nothing (short and long side set to ``--size``), and both see the same
images: shapes of the built-in dataset drawn at that size, with their boxes,
labels and masks as targets. Each step is forward with the five losses, then
backward (torch: ``sum(losses).backward()``); no optimizer.

The whole-step times come from plain runs, the two libraries alternating, so
that load from other processes hits both alike. The per-stage table comes
from separate, instrumented runs:

* tinymrcnn: ``runtime.StageTimer`` wraps the stages' forward and backward
  methods;
* torch: forward hooks time each module's forward. For the backward, a hook
  puts an identity function (:class:`Marker`) on each module's inputs and
  outputs: autograd runs the output marker's backward when the gradient
  reaches the module and the input marker's when it leaves, so the time in
  between is the module's backward. (A module whose inputs need no gradient,
  like the ResNet body, ends with the backward itself.)

Rows are the stages both libraries have as modules; "the rest" is what the
step spends outside them (anchors and proposal layer inside the RPN, RoI
sampling, targets and losses inside the RoI heads, the transform). Needs
torch and torchvision (tests/optional_torch.py explains how to install them);
without them it says so and exits.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import defaultdict

import numpy as np

try:  # torch before tinymrcnn: it then keeps its own OpenMP runtime and wait policy
    import torch  # noqa: F401  (tinymrcnn/kernels/cpu/__init__.py)
except ImportError:
    pass

from tinymrcnn import runtime
from tinymrcnn import torchvision_compat as tvc
from tinymrcnn.data.shapes import ShapesDataset

# (row, tinymrcnn StageTimer names, torchvision module paths): forward, then backward rows.
STAGES = (
    ("ResNet-50 body", ["backbone.body"], ["backbone.body"]),
    ("FPN", ["backbone.fpn"], ["backbone.fpn"]),
    ("RPN head", ["rpn.head"], ["rpn.head"]),
    ("box RoIAlign (MultiScaleRoIAlign)", ["roi_heads.box_roi_pool"], ["roi_heads.box_roi_pool"]),
    ("box head (TwoMLPHead)", ["roi_heads.box_head"], ["roi_heads.box_head"]),
    ("box predictor", ["roi_heads.box_predictor"], ["roi_heads.box_predictor"]),
    ("mask RoIAlign", ["roi_heads.mask_roi_pool"], ["roi_heads.mask_roi_pool"]),
    ("mask head + predictor", ["roi_heads.mask_head"], ["roi_heads.mask_head", "roi_heads.mask_predictor"]),
)
# the whole RPN and RoI-heads forwards, to find what their submodules leave out
OUTER = (
    ("RPN: anchors, proposal layer, targets, loss", ["rpn"], ["rpn"]),
    ("RoI heads: sampling, targets, losses", ["roi_heads"], ["roi_heads"]),
)


def torchvision_model(torch, size):
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.mask_rcnn import MaskRCNN as TorchvisionMaskRCNN
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
    model = TorchvisionMaskRCNN(backbone, num_classes=91, min_size=size, max_size=size)
    return model.train()


def batch(size, n):
    ds = ShapesDataset(n, image_size=size, seed=3)
    items = [ds[i] for i in range(n)]
    return [img for img, _ in items], [t for _, t in items]


# ------------------------------------------------------------------ torch stage timing


class TorchStages:
    """Forward and backward seconds per module path of a torch model (see the module docstring)."""

    def __init__(self, torch, model, paths):
        self.torch, self.seconds = torch, defaultdict(float)
        self.enter, self.leave, self.handles = {}, {}, []
        marker_cls = self._marker_class()
        for path in paths:
            module = model.get_submodule(path)
            self.handles.append(module.register_forward_pre_hook(self._pre(path, marker_cls), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post(path, marker_cls), with_kwargs=True))

    def _marker_class(self):
        stages = self

        class Marker(stages.torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, key):
                ctx.key = key
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                path, side = ctx.key
                now = time.perf_counter()
                if side == "out":
                    stages.enter[path] = min(stages.enter.get(path, now), now)
                else:
                    stages.leave[path] = max(stages.leave.get(path, now), now)
                return g, None

        return Marker

    def _wrap(self, value, key, marker_cls):
        torch = self.torch
        if isinstance(value, torch.Tensor):
            return marker_cls.apply(value, key) if value.requires_grad else value
        if isinstance(value, dict):
            return type(value)((k, self._wrap(v, key, marker_cls)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(self._wrap(v, key, marker_cls) for v in value)
        return value

    def _pre(self, path, marker_cls):
        def hook(module, args, kwargs):
            self.seconds[path, "forward", "t0"] = time.perf_counter()
            return self._wrap(args, (path, "in"), marker_cls), self._wrap(kwargs, (path, "in"), marker_cls)

        return hook

    def _post(self, path, marker_cls):
        def hook(module, args, kwargs, output):
            self.seconds[path, "forward"] += time.perf_counter() - self.seconds.pop((path, "forward", "t0"))
            return self._wrap(output, (path, "out"), marker_cls)

        return hook

    def step(self, model, images, targets):
        self.enter.clear()
        self.leave.clear()
        losses = model(images, targets)
        sum(losses.values()).backward()
        end = time.perf_counter()
        for path, t in self.enter.items():
            self.seconds[path, "backward"] += self.leave.get(path, end) - t

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=512, help="images are SIZE x SIZE, not resized (default 512)")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="BLAS threads for tinymrcnn (default: the preset's, MaskRCNNConfig.blas_threads: 0, one per core)",
    )
    args = ap.parse_args()
    try:
        import torch
        import torchvision  # noqa: F401

        tvm = torchvision_model(torch, args.size)
    except Exception as e:  # not installed, or its C ops fail to load
        print(f"torch/torchvision not importable ({type(e).__name__}: {str(e)[:100]}): nothing to compare with")
        return

    state = {k: v.detach().numpy().copy() for k, v in tvm.state_dict().items()}
    overrides = {"min_size": args.size, "max_size": args.size}
    if args.blas_threads is not None:
        overrides["blas_threads"] = args.blas_threads
    config = tvc.default_config(state, **overrides)
    model = tvc.model_from_torchvision(state, config=config, bn_eps=1e-5)
    images, targets = batch(args.size, args.images)
    t_images = [torch.from_numpy(im) for im in images]
    t_targets = [
        {
            "boxes": torch.from_numpy(t["boxes"]),
            "labels": torch.from_numpy(t["labels"].astype(np.int64)),
            "masks": torch.from_numpy(t["masks"].astype(np.uint8)),
        }
        for t in targets
    ]

    def ours():
        return runtime.compute_gradients(model, images, targets)

    def theirs():
        tvm.zero_grad()
        losses = tvm(t_images, t_targets)
        sum(losses.values()).backward()
        return {k: v.item() for k, v in losses.items()}

    with runtime.session(model.config):
        ours_losses, their_losses = ours(), theirs()  # warm-up: compiles the Numba kernels
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads); tinymrcnn BLAS threads "
            f"{model.config.blas_threads or f'0 (one per core: {os.cpu_count()})'}; {args.images} images {args.size}x{args.size}, "
            f"{sum(len(t['labels']) for t in targets)} objects, median of {args.repeats}"
        )
        print(
            "losses (first step):  "
            + "  ".join(f"{k.replace('loss_', '')} {ours_losses[k]:.3f}/{their_losses[k]:.3f}" for k in ours_losses)
            + "  (tinymrcnn/torchvision; they differ through the random sampling)"
        )

        times = {"ours": [], "theirs": []}
        for _ in range(args.repeats):
            for name, fn in (("ours", ours), ("theirs", theirs)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        t_ours, t_theirs = np.median(times["ours"]), np.median(times["theirs"])
        print(
            f"\ntraining step: tinymrcnn {t_ours:.2f} s, torchvision {t_theirs:.2f} s: "
            f"tinymrcnn takes {t_ours / t_theirs:.2f}x torchvision's time"
        )

        timer = runtime.StageTimer()
        t0 = time.perf_counter()
        with timer.watch(model):
            for _ in range(args.repeats):
                ours()
        staged_ours = (time.perf_counter() - t0) / args.repeats
        paths = sorted({p for _, _, ps in STAGES + OUTER for p in ps})
        stages = TorchStages(torch, tvm, paths)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            tvm.zero_grad()
            stages.step(tvm, t_images, t_targets)
        staged_theirs = (time.perf_counter() - t0) / args.repeats
        stages.remove()

    def ours_s(names, kind):
        methods = ("forward", "forward_train", "loss") if kind == "forward" else ("backward",)
        return sum(timer.seconds.get(f"{n} {m}", 0.0) for n in names for m in methods) / args.repeats

    def theirs_s(paths, kind):
        return sum(stages.seconds.get((p, kind), 0.0) for p in paths) / args.repeats

    rows = []
    for kind in ("forward", "backward"):
        for label, ours_names, their_paths in STAGES:
            rows.append((f"{label} {kind}", ours_s(ours_names, kind), theirs_s(their_paths, kind)))
    for label, ours_names, their_paths in OUTER:  # the outer stage minus its submodules
        inner = [s for s in STAGES if s[1][0].startswith(ours_names[0] + ".")]
        o = ours_s(ours_names, "forward") - sum(ours_s(s[1], "forward") for s in inner)
        t = theirs_s(their_paths, "forward") - sum(theirs_s(s[2], "forward") for s in inner)
        rows.append((label, o, t))
    rows.append(
        (
            "everything else (transform, ...)",
            staged_ours - sum(r[1] for r in rows),
            staged_theirs - sum(r[2] for r in rows),
        )
    )
    rows.append(("the instrumented step", staged_ours, staged_theirs))
    print(f"\n{'stage (ms per step, instrumented runs)':46s}{'tinymrcnn':>11s}{'torchvision':>13s}{'ratio':>8s}")
    for label, o, t in rows:
        ratio = f"{o / t:7.2f}x" if t > 1e-4 else "      -"
        print(f"{label:46s}{1000 * o:11.1f}{1000 * t:13.1f} {ratio}")


if __name__ == "__main__":
    main()
