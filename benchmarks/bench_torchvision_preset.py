"""predict() time of the torchvision_r50_fpn preset on one 800x1216 image, next to torch's.

    python benchmarks/bench_torchvision_preset.py [--repeats 2] [--size 800 1216]

Random weights: timings do not depend on the values, except through how many
boxes survive to the mask branch, so the classifier's bias is raised for a
few classes to make the box head return its full 100 detections, as on a
real photo (with plain random weights nothing passes the 0.05 score
threshold and the mask head and the paste would not run at all).

The torch column, in the same run:

* torchvision's ``maskrcnn_resnet50_fpn`` with the *same* weights, when
  torchvision is importable -- the full model, the same computation;
* otherwise tests/torch_reference.py (torch.nn.functional): backbone + FPN,
  the RPN head on every level, the box head on 1000 RoIs and the mask head on
  100 RoIs. No RoIAlign, anchors, proposals, NMS or paste (they need
  torchvision), so that column is a lower bound of torch's time.

Each number is the best of ``--repeats`` runs after one warm-up call (which
compiles the Numba kernels on a small image); the runs of the two libraries
alternate, so that load from other processes on a shared machine hits both
alike. Both use every core unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

try:  # torch before tinymrcnn: it then keeps its own OpenMP runtime and wait policy
    import torch  # noqa: F401  (tinymrcnn/kernels/cpu/__init__.py)
except ImportError:
    pass

from tinymrcnn import torchvision_compat as tvc
from tinymrcnn.config import MaskRCNNConfig
from tinymrcnn.model.mask_rcnn import MaskRCNN


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A (3, h, w) float32 image in [0, 1] with large blobs (not white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 1, (3, h // 32 + 1, w // 32 + 1))
    img = np.repeat(np.repeat(small, 32, axis=1), 32, axis=2)[:, :h, :w]
    return np.ascontiguousarray((0.8 * img + 0.2 * rng.uniform(0, 1, (3, h, w))).astype(np.float32))


def boost_classifier(state: dict) -> None:
    """Raise classes 1-3 so that random weights give confident detections (see the docstring)."""
    rng = np.random.default_rng(1)
    w = state["roi_heads.box_predictor.cls_score.weight"]
    state["roi_heads.box_predictor.cls_score.weight"] = (rng.standard_normal(w.shape) * 0.1).astype(np.float32)
    b = state["roi_heads.box_predictor.cls_score.bias"].copy()
    b[1:4] = (3.0, 2.5, 2.0)
    state["roi_heads.box_predictor.cls_score.bias"] = b


def torchvision_model(torch):
    try:
        from torchvision.models.detection import maskrcnn_resnet50_fpn
    except Exception as e:  # not installed, or its C ops fail to load
        print(f"torchvision not importable ({type(e).__name__}: {str(e)[:80]})")
        return None
    torch.manual_seed(0)
    try:
        # As maskrcnn_resnet50_fpn(weights=...) builds it: FrozenBatchNorm2d in the backbone.
        from torchvision.models import resnet50
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.models.detection.mask_rcnn import MaskRCNN as TorchvisionMaskRCNN
        from torchvision.ops.misc import FrozenBatchNorm2d

        backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
        return TorchvisionMaskRCNN(backbone, num_classes=91).eval()
    except ImportError:  # private helper moved: BatchNorm2d in eval mode
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"))
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for Numba, BLAS and torch (default: all cores)"
    )
    args = parser.parse_args()
    h, w = args.size

    try:
        import torch
    except ImportError:
        torch = None
    if args.threads:
        import numba

        numba.set_num_threads(args.threads)
        if torch is not None:
            torch.set_num_threads(args.threads)
        try:  # the convolutions' BLAS (SciPy's OpenBLAS) has its own pool
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.threads)
        except ImportError:
            print("threadpoolctl not installed: BLAS keeps its default threads (set OPENBLAS_NUM_THREADS)")

    tvm = torchvision_model(torch) if torch is not None else None
    if tvm is not None:
        state = {k: v.detach().numpy().copy() for k, v in tvm.state_dict().items()}
        boost_classifier(state)
        tvm.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        model = tvc.model_from_torchvision(state, bn_eps=1e-5)
    else:
        model = MaskRCNN(MaskRCNNConfig.torchvision_r50_fpn())
        state = model.state_dict()
        boost_classifier(state)
        model.load_state_dict(state)

    image = smooth_image(h, w)
    # Warm-up: compile every Numba kernel on a small input (the kernels do not depend on the size).
    tr = model.transform
    tr.min_size, tr.max_size = 128, 192
    model.predict([smooth_image(100, 150)])
    tr.min_size, tr.max_size = model.config.min_size, model.config.max_size

    import numba

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"numba threads {numba.get_num_threads()}"
        + (f", torch {torch.__version__} threads {torch.get_num_threads()}" if torch is not None else ", no torch")
    )
    print(
        f"image {h}x{w} (the preset resizes to short side 800, long side <= 1333), random weights, "
        f"best of {args.repeats}"
    )

    x, _, _ = model.transform([image], None, dtype=np.float32)
    jobs = {"ours": lambda: model.predict([image]), "ours_bb": lambda: model.eval().backbone(x)}
    if torch is not None:
        ximg = torch.from_numpy(image)
        if tvm is not None:
            il = tvm.transform([ximg])[0]
            jobs["torch"] = lambda: tvm([ximg])
            jobs["torch_bb"] = lambda: tvm.backbone(il.tensors)
            torch_name = "torchvision model(images):  "
            torch_note = "the same model and weights"
        else:
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
            from torch_reference import TorchReference

            ref = TorchReference(model.state_dict(), bn_eps=model.backbone.body.bn1.eps)
            xt = torch.from_numpy(x)
            rng = np.random.default_rng(0)
            box_feats = torch.from_numpy(rng.uniform(0, 1, (1000, 256, 7, 7)).astype(np.float32))
            mask_feats = torch.from_numpy(rng.uniform(0, 1, (100, 256, 14, 14)).astype(np.float32))

            def torch_stages():
                for p in ref.backbone_fpn(xt):
                    ref.rpn_head(p)
                ref.box_head(box_feats)
                ref.mask_head(mask_feats)

            jobs["torch"] = torch_stages
            jobs["torch_bb"] = lambda: ref.backbone_fpn(xt)
            torch_name = "torch.nn.functional stages:"
            torch_note = (
                "conv stages only: no RoIAlign/proposals/NMS/paste -- torchvision not importable, "
                "so a lower bound of torch's time"
            )
        with torch.no_grad():
            jobs["torch"]()  # warm-up

    # Interleaved repetitions: on a shared machine, background load then hits both libraries alike.
    times = {k: [] for k in jobs}
    outputs = {}
    for _ in range(args.repeats):
        for k, f in jobs.items():
            t0 = time.perf_counter()
            if k.startswith("torch"):
                with torch.no_grad():
                    outputs[k] = f()
            else:
                outputs[k] = f()
            times[k].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    model.train()

    def fmt(k):
        return f"{best[k]:7.2f} s (runs: {', '.join(f'{t:.2f}' for t in times[k])})"

    print(f"tinymrcnn predict():          {fmt('ours')}, {len(outputs['ours'][0]['boxes'])} detections")
    print(f"  backbone+FPN alone:         {fmt('ours_bb')}")
    if torch is None:
        print("torch is not installed: no comparison")
        return
    n_torch = f", {len(outputs['torch'][0]['boxes'])} detections" if tvm is not None else ""
    print(f"{torch_name}   {fmt('torch')}{n_torch}  -- {torch_note}")
    print(f"  backbone+FPN alone:         {fmt('torch_bb')}")
    print(
        f"ratio tinymrcnn / torch:      {best['ours'] / best['torch']:7.2f} x  "
        f"(backbone+FPN {best['ours_bb'] / best['torch_bb']:.2f} x)"
    )


if __name__ == "__main__":
    main()
