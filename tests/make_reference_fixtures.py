"""Write tests/fixtures/*.npz: PyTorch's and torchvision's answers on fixed inputs.

tests/test_reference_fixtures.py compares tinymrcnn with these stored answers,
so the comparisons with torch also run where torch is not installed (CI).
Run from the repository root, in an environment where torch and torchvision
import (CPU builds are enough; torchvision must be built for that torch):

    PYTHONPATH=. python tests/make_reference_fixtures.py            # every family
    PYTHONPATH=. python tests/make_reference_fixtures.py nms conv   # some of them

and commit the changed files. Run it again after changing a case here: with
torch installed, test_reference_fixtures.py::test_fixtures_are_up_to_date
rebuilds every family in memory and fails while the stored files differ.

Every input comes from NumPy's default_rng with a fixed integer seed, so the
files are the same on every run. The cases, seeds, shapes and dtypes are those
of the live comparisons (test_conv, test_layers, test_losses, test_optim,
test_boxes, test_anchors, test_transforms, test_roi_align, test_roi_pool;
Linear's weights are drawn here, not by its init); on top of them: box coder,
IoU and anchors from torchvision itself (the live tests repeat its formulas in
torch), RoIAlign/RoIPool gradients and empty RoI lists, and torchvision's NMS
on test_nms.py's hand-built cases and random sets. A file holds the inputs and
torch's outputs and gradients, keyed "<case>.<name>"; parameters that are not
arrays (optimizer settings) are a JSON string. Nothing needs pickle:
np.load(path, allow_pickle=False) reads every file. torch is imported only
inside the builders, so this module imports without it (the tests take the
case lists from it).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def rng(seed):
    return np.random.default_rng(seed)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def import_torch():
    import torch

    return torch


def import_torchvision():
    import_torch()
    import torchvision  # noqa: F401
    import torchvision.ops

    return torchvision


def grads_of(torch, fn, *arrays, dy_seed=None, dy=None):
    """fn(*tensors) -> y; returns y, dy and the input gradients for loss = sum(y * dy)."""
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    y = fn(*ts)
    if dy is None:
        dy = rng(dy_seed).standard_normal(tuple(y.shape)).astype(arrays[0].dtype)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), dy, [t.grad.numpy() for t in ts]


# ----------------------------------------------------------------------------- conv
# tests/test_conv.py::test_against_torch: TORCH_CASES, _arrays(case, transposed), dy seed 9
CONV_CASES = [
    (2, 3, 7, 5, 4, 3, 1, 1),
    (3, 2, 9, 6, 3, 3, 2, 1),
    (2, 2, 8, 11, 3, 7, 2, 3),
    (1, 3, 7, 9, 2, 7, 1, 3),
    (3, 8, 14, 14, 8, 2, 2, 0),
    (2, 4, 10, 12, 5, 3, 1, 1),
]


def build_conv():
    """Per case i: x, b and the parameters once ("<i>.x"), then each op's weight, dy and torch's answers
    ("<i>.conv2d.w", ...). _arrays draws w with the same seed for both ops, in the op's own layout."""
    torch = import_torch()
    F = torch.nn.functional
    out = {}
    for i, (N, C, H, W, O, k, s, p) in enumerate(CONV_CASES):
        kh, kw = pair(k)
        out.update({f"{i}.stride": np.array(pair(s)), f"{i}.padding": np.array(pair(p))})
        for op, transposed in (("conv2d", False), ("conv_transpose2d", True)):
            r = rng(0)
            x = r.standard_normal((N, C, H, W))
            w = r.standard_normal((C, O, kh, kw) if transposed else (O, C, kh, kw))
            b = r.standard_normal(O)
            fn = F.conv_transpose2d if transposed else F.conv2d
            y, dy, (dx, dw, db) = grads_of(torch, lambda x, w, b: fn(x, w, b, stride=s, padding=p), x, w, b, dy_seed=9)
            key = f"{i}.{op}"
            out.update(
                {
                    f"{i}.x": x,
                    f"{i}.b": b,
                    f"{key}.w": w,
                    f"{key}.y": y,
                    f"{key}.dy": dy,
                    f"{key}.dx": dx,
                    f"{key}.dw": dw,
                    f"{key}.db": db,
                }
            )
    return out


# ----------------------------------------------------------------------------- max pooling
# tests/test_layers.py::test_maxpool_matches_torch_including_ties: POOL_CASES, two inputs each
POOL_CASES = [
    (3, 2, 1, (2, 3, 9, 7)),
    (3, 2, 1, (1, 2, 8, 10)),
    (2, 2, 0, (2, 2, 6, 5)),
    (3, 1, 1, (1, 3, 5, 6)),
    (1, 2, 0, (2, 2, 7, 6)),
    (3, 3, 0, (1, 1, 9, 9)),
    ((3, 2), (2, 1), (1, 0), (2, 2, 7, 5)),
    (7, 1, 3, (1, 2, 7, 9)),
]


def build_maxpool():
    torch = import_torch()
    out = {}
    for i, (k, s, p, shape) in enumerate(POOL_CASES):
        inputs = (rng(0).standard_normal(shape), rng(1).integers(0, 3, shape).astype(float))  # ties
        for j, x in enumerate(inputs):
            xt = torch.tensor(x, requires_grad=True)
            yt, it = torch.nn.functional.max_pool2d(xt, k, s, p, return_indices=True)
            dy = rng(2).standard_normal(tuple(yt.shape))
            yt.backward(torch.tensor(dy))
            key = f"{i}.{j}"
            out.update(
                {
                    f"{key}.kernel": np.array(pair(k)),
                    f"{key}.stride": np.array(pair(s)),
                    f"{key}.padding": np.array(pair(p)),
                    f"{key}.x": x,
                    f"{key}.y": yt.detach().numpy(),
                    f"{key}.indices": it.numpy(),
                    f"{key}.dy": dy,
                    f"{key}.dx": xt.grad.numpy(),
                }
            )
    return out


# ----------------------------------------------------------------------------- norms
# tests/test_layers.py: test_batchnorm_matches_torch, test_groupnorm_matches_torch,
# test_frozen_batchnorm_matches_torch_formula (affine parameters as randomize_affine makes them)
GROUPNORM_CASES = [(2, (2, 6, 5, 4)), (6, (3, 6, 3, 3)), (1, (2, 4, 7))]


def affine(C, seed=1):
    r = rng(seed)
    return r.uniform(0.5, 1.5, C), r.standard_normal(C)


def build_norms():
    torch = import_torch()
    out = {}
    C = 3
    weight, bias = affine(C)
    ref = torch.nn.BatchNorm2d(C, momentum=0.2).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(weight))
        ref.bias.copy_(torch.tensor(bias))
    out.update(
        {
            "batchnorm.C": np.array(C),
            "batchnorm.momentum": np.array(0.2),
            "batchnorm.weight": weight,
            "batchnorm.bias": bias,
        }
    )
    for step in range(2):
        x = rng(10 + step).standard_normal((4, C, 5, 3)) * 2 + 1
        dy = rng(20 + step).standard_normal(x.shape)
        xt = torch.tensor(x, requires_grad=True)
        ref.weight.grad = None
        ref.bias.grad = None
        yt = ref(xt)
        yt.backward(torch.tensor(dy))
        key = f"batchnorm.train{step}"
        out.update(
            {
                f"{key}.x": x,
                f"{key}.dy": dy,
                f"{key}.y": yt.detach().numpy(),
                f"{key}.dx": xt.grad.numpy(),
                f"{key}.dweight": ref.weight.grad.numpy().copy(),
                f"{key}.dbias": ref.bias.grad.numpy().copy(),
            }
        )
    for name, v in ref.state_dict().items():
        out[f"batchnorm.state.{name}"] = v.numpy().copy()
    ref.eval()
    x = rng(30).standard_normal((2, C, 4, 4))
    out.update({"batchnorm.eval.x": x, "batchnorm.eval.y": ref(torch.tensor(x)).detach().numpy()})

    for i, (G, shape) in enumerate(GROUPNORM_CASES):
        weight, bias = affine(shape[1])
        ref = torch.nn.GroupNorm(G, shape[1]).double()
        with torch.no_grad():
            ref.weight.copy_(torch.tensor(weight))
            ref.bias.copy_(torch.tensor(bias))
        x = rng(8).standard_normal(shape) * 3
        dy = rng(9).standard_normal(shape)
        xt = torch.tensor(x, requires_grad=True)
        yt = ref(xt)
        yt.backward(torch.tensor(dy))
        key = f"groupnorm.{i}"
        out.update(
            {
                f"{key}.groups": np.array(G),
                f"{key}.weight": weight,
                f"{key}.bias": bias,
                f"{key}.x": x,
                f"{key}.dy": dy,
                f"{key}.y": yt.detach().numpy(),
                f"{key}.dx": xt.grad.numpy(),
                f"{key}.dweight": ref.weight.grad.numpy(),
                f"{key}.dbias": ref.bias.grad.numpy(),
                f"{key}.state_keys": np.array(list(ref.state_dict())),
            }
        )

    # torchvision.ops.misc.FrozenBatchNorm2d.forward, in float32
    C = 4
    r = rng(11)
    bufs = {
        "weight": r.uniform(0.5, 2, C),
        "bias": r.standard_normal(C),
        "running_mean": r.standard_normal(C),
        "running_var": r.uniform(0.1, 2, C),
    }
    bufs = {k: v.astype(np.float32) for k, v in bufs.items()}
    x = r.standard_normal((2, C, 3, 5)).astype(np.float32)
    dy = r.standard_normal(x.shape).astype(np.float32)
    t = {k: torch.tensor(v) for k, v in bufs.items()}
    scale = t["weight"] * (t["running_var"] + 1e-5).rsqrt()
    shift = t["bias"] - t["running_mean"] * scale
    y, _, (dx,) = grads_of(torch, lambda x: x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1), x, dy=dy)
    out.update({f"frozen.{k}": v for k, v in bufs.items()})
    out.update({"frozen.x": x, "frozen.dy": dy, "frozen.y": y, "frozen.dx": dx})
    return out


# ----------------------------------------------------------------------------- upsample, linear
# tests/test_layers.py: test_upsample_matches_torch, test_upsample_index_rule_matches_torch_for_many_sizes,
# test_linear_matches_torch (shapes; the weights are drawn here instead of by Linear's init)
UPSAMPLE_CASES = [
    ((2, 3, 4, 5), (8, 10)),
    ((1, 2, 3, 4), (7, 9)),
    ((1, 2, 2, 3), (6, 9)),
    ((2, 2, 5, 4), (3, 2)),
    ((1, 1, 3, 3), (3, 3)),
    ((1, 2, 13, 25), (25, 50)),
    ((2, 1, 21, 30), (133, 138)),
]
INDEX_RULE_MAX_IN, INDEX_RULE_MAX_OUT = 39, 89


def build_layers():
    torch = import_torch()
    F = torch.nn.functional
    out = {}
    for i, (shape, size) in enumerate(UPSAMPLE_CASES):
        x = rng(12).standard_normal(shape).astype(np.float32)
        xt = torch.tensor(x, requires_grad=True)
        yt = F.interpolate(xt, size=size, mode="nearest")
        dy = rng(13).standard_normal(tuple(yt.shape)).astype(np.float32)
        yt.backward(torch.tensor(dy))
        out.update(
            {
                f"upsample.{i}.x": x,
                f"upsample.{i}.size": np.array(size),
                f"upsample.{i}.y": yt.detach().numpy(),
                f"upsample.{i}.dy": dy,
                f"upsample.{i}.dx": xt.grad.numpy(),
            }
        )
    # torch's nearest source index for every (in, out) with 1 <= in <= 39, 1 <= out <= 89, concatenated
    rule = []
    for n_in in range(1, INDEX_RULE_MAX_IN + 1):
        for n_out in range(1, INDEX_RULE_MAX_OUT + 1):
            x = torch.arange(n_in, dtype=torch.float32).reshape(1, 1, 1, n_in)
            rule.append(F.interpolate(x, size=(1, n_out), mode="nearest").reshape(-1).long().numpy())
    out.update(
        {
            "index_rule.max_in": np.array(INDEX_RULE_MAX_IN),
            "index_rule.max_out": np.array(INDEX_RULE_MAX_OUT),
            "index_rule.index": np.concatenate(rule).astype(np.int8),
        }
    )

    bound = 1 / math.sqrt(6)
    w = rng(14).uniform(-bound, bound, (4, 6))
    b = rng(14).uniform(-bound, bound, 4)
    x = rng(15).standard_normal((5, 6))
    dy = rng(16).standard_normal((5, 4))
    y, _, (dx, dw, db) = grads_of(torch, lambda x, w, b: F.linear(x, w, b), x, w, b, dy=dy)
    out.update(
        {
            "linear.weight": w,
            "linear.bias": b,
            "linear.x": x,
            "linear.dy": dy,
            "linear.y": y,
            "linear.dx": dx,
            "linear.dweight": dw,
            "linear.dbias": db,
        }
    )
    return out


# ----------------------------------------------------------------------------- losses
# tests/test_losses.py: the four *_matches_torch tests, same seeds
SMOOTH_L1_BETAS = [1 / 9, 1.0, 0.0]


def build_losses():
    torch = import_torch()
    F = torch.nn.functional
    out = {}

    def loss_and_grad(fn, x, key):
        xt = torch.tensor(x, requires_grad=True)
        loss = fn(xt)
        loss.backward()
        out[f"{key}.loss"] = loss.detach().numpy()
        out[f"{key}.grad"] = xt.grad.numpy()

    z = rng(12).standard_normal((7, 5))
    y = np.array([0, 4, -1, 2, 2, -1, 1])
    cw = rng(13).uniform(0.5, 2, 5)
    out.update({"cross_entropy.z": z, "cross_entropy.y": y, "cross_entropy.class_weight": cw})
    for reduction in ("mean", "sum"):
        loss_and_grad(
            lambda t: F.cross_entropy(
                t, torch.tensor(y), weight=torch.tensor(cw), ignore_index=-1, reduction=reduction
            ),
            z,
            f"cross_entropy.{reduction}",
        )

    x = rng(14).standard_normal((4, 6)) * 5
    t = rng(15).uniform(0, 1, (4, 6))
    w = rng(16).uniform(0, 2, (4, 6))
    out.update({"bce.x": x, "bce.target": t, "bce.weight": w})
    for reduction in ("mean", "sum"):
        loss_and_grad(
            lambda a: F.binary_cross_entropy_with_logits(
                a, torch.tensor(t), weight=torch.tensor(w), reduction=reduction
            ),
            x,
            f"bce.{reduction}",
        )

    for i, beta in enumerate(SMOOTH_L1_BETAS):
        target = np.zeros(9)
        pred = np.array([-2.0, -beta, -0.05, 0.0, 0.05, beta, 2.0, 0.3, -0.7])  # both kinks
        out.update(
            {f"smooth_l1.{i}.beta": np.array(beta), f"smooth_l1.{i}.pred": pred, f"smooth_l1.{i}.target": target}
        )
        for reduction in ("mean", "sum"):
            loss_and_grad(
                lambda p: F.smooth_l1_loss(p, torch.tensor(target), beta=beta, reduction=reduction),
                pred,
                f"smooth_l1.{i}.{reduction}",
            )

    # tests/test_losses.py::mask_case(R=4, K=3, M=6, seed=17)
    r = rng(17)
    R = 4
    logits = r.standard_normal((R, 3, 6, 6)) * 2
    labels = r.integers(1, 3, R)
    targets = r.uniform(0, 1, (R, 6, 6))
    out.update({"mask.logits": logits, "mask.labels": labels, "mask.targets": targets})
    lt = torch.tensor(labels)
    # torchvision's maskrcnn_loss, given already-gathered targets
    loss_and_grad(
        lambda z: F.binary_cross_entropy_with_logits(z[torch.arange(R), lt], torch.tensor(targets)),
        logits,
        "mask.sigmoid",
    )
    # softmax version: cross-entropy with per-pixel class probabilities
    q = np.zeros_like(logits)
    q[:, 0] = 1 - targets
    q[np.arange(R), labels] += targets
    loss_and_grad(lambda z: F.cross_entropy(z, torch.tensor(q)), logits, "mask.softmax")
    return out


# ----------------------------------------------------------------------------- optimizers
# tests/test_optim.py: test_matches_torch_optim_step_by_step (TORCH_CASES), test_clip_grad_norm_matches_torch
OPTIM_CASES = [
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    ("SGD", dict(lr=0.1, momentum=0.0, weight_decay=0.0)),
    ("Adam", dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0)),
    ("Adam", dict(lr=0.01, weight_decay=1e-2)),
    ("AdamW", dict(lr=0.01, weight_decay=1e-1)),
]
OPTIM_STEPS = 8


def initial_params():
    r = rng(0)
    return [r.standard_normal((3, 4)), r.standard_normal(5)]


def warmup_multistep(base_lr, step, warmup_iters=3, warmup_factor=0.1, milestones=(5,), gamma=0.1):
    """The lr the live test takes from WarmupMultiStep(base_lr, 3, 0.1, (5,))."""
    a = min(step / warmup_iters, 1.0)
    return base_lr * (warmup_factor * (1 - a) + a) * gamma ** sum(step >= m for m in milestones)


def build_optim():
    torch = import_torch()
    out = {}
    for c, (name, kw) in enumerate(OPTIM_CASES):
        init = initial_params()
        theirs = [torch.nn.Parameter(torch.tensor(p.copy())) for p in init]
        topt = getattr(torch.optim, name)(theirs, **kw)
        lrs, grads, params = [], [[] for _ in init], [[] for _ in init]
        for t in range(OPTIM_STEPS):
            lr = warmup_multistep(kw["lr"], t)
            lrs.append(lr)
            for g in topt.param_groups:
                g["lr"] = lr
            for i, q in enumerate(theirs):
                g = rng(10 * t + i).standard_normal(tuple(q.shape))
                q.grad = torch.tensor(g)
                grads[i].append(g)
            topt.step()
            for i, q in enumerate(theirs):
                params[i].append(q.detach().numpy().copy())
        key = f"{c}"
        out.update(
            {f"{key}.name": np.array(name), f"{key}.kwargs": np.array(json.dumps(kw)), f"{key}.lr": np.array(lrs)}
        )
        for i, p in enumerate(init):
            out.update(
                {
                    f"{key}.p{i}.init": p,
                    f"{key}.p{i}.grads": np.stack(grads[i]),
                    f"{key}.p{i}.after": np.stack(params[i]),
                }
            )

    init = initial_params()
    theirs = [torch.nn.Parameter(torch.tensor(p.copy())) for p in init]
    for i, q in enumerate(theirs):
        g = rng(i).standard_normal(tuple(q.shape)) * 3
        q.grad = torch.tensor(g)
        out[f"clip.p{i}.grad"] = g
    total = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    out["clip.max_norm"] = np.array(0.5)
    out["clip.total"] = total.numpy()
    for i, q in enumerate(theirs):
        out[f"clip.p{i}.init"] = init[i]
        out[f"clip.p{i}.clipped"] = q.grad.numpy()
    return out


# ----------------------------------------------------------------------------- boxes, anchors
# tests/test_boxes.py::test_coder_and_iou_match_torchvision_formulas_in_torch, here with torchvision itself


def random_boxes(r, n, dtype=np.float64, size=50.0, zero_area=0.0):
    """tests/test_boxes.py::random_boxes, draw for draw."""
    xy = r.uniform(0, size, (n, 2))
    wh = r.uniform(0, size / 2, (n, 2))
    wh[r.random(n) < zero_area, r.integers(0, 2)] = 0.0
    return np.concatenate([xy, xy + wh], axis=1).astype(dtype)


def build_boxes():
    torch = import_torch()
    import_torchvision()
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.ops import box_iou

    r = rng(2)
    a = random_boxes(r, 64, np.float32) + np.float32([0, 0, 1, 1])
    b = random_boxes(r, 64, np.float32) + np.float32([0, 0, 1, 1])
    codes = r.normal(0, 3, (64, 8)).astype(np.float32)  # two boxes per row
    codes[::7, 2] = 60.0  # huge dw: clamped at log(1000 / 16)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    weights = (10.0, 10.0, 5.0, 5.0)
    coder = BoxCoder(weights, bbox_xform_clip=math.log(1000.0 / 16))
    return {
        "a": a,
        "b": b,
        "codes": codes,
        "weights": np.array(weights),
        "iou": box_iou(ta, tb).numpy(),
        "encoded": coder.encode_single(tb, ta).numpy(),  # targets b relative to proposals a
        "decoded": coder.decode_single(torch.from_numpy(codes), ta).numpy(),
    }


# tests/test_anchors.py::test_matches_torchvision_anchor_code_in_torch, here with torchvision's AnchorGenerator
ANCHOR_SIZES, ANCHOR_RATIOS = (24, 48, 96), (0.5, 1.0, 2.0, 3.0)
ANCHOR_GRID, ANCHOR_IMAGE = (5, 7), (83, 120)


def build_anchors():
    torch = import_torch()
    import_torchvision()
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    gen = AnchorGenerator((ANCHOR_SIZES,), (ANCHOR_RATIOS,))
    images = ImageList(torch.zeros((1, 3) + ANCHOR_IMAGE), [ANCHOR_IMAGE])
    (anchors,) = gen(images, [torch.zeros((1, 1) + ANCHOR_GRID)])
    return {
        "sizes": np.array(ANCHOR_SIZES),
        "ratios": np.array(ANCHOR_RATIOS),
        "grid": np.array(ANCHOR_GRID),
        "image": np.array(ANCHOR_IMAGE),
        "anchors": anchors.numpy(),
    }


# ----------------------------------------------------------------------------- resize
# tests/test_transforms.py::test_resize_matches_torch
RESIZE_SIZES = [(74, 106), (20, 31), (50, 50)]


def build_resize():
    torch = import_torch()
    F = torch.nn.functional
    r = rng(0)
    x = r.random((3, 37, 53)).astype(np.float32)
    masks = (r.random((2, 37, 53)) > 0.5).astype(np.uint8)
    out = {"x": x, "masks": masks}
    for i, size in enumerate(RESIZE_SIZES):
        out[f"{i}.size"] = np.array(size)
        out[f"{i}.image"] = F.interpolate(torch.from_numpy(x)[None], size=size, mode="bilinear", align_corners=False)[
            0
        ].numpy()
        out[f"{i}.masks"] = F.interpolate(torch.from_numpy(masks)[:, None].float(), size=size)[:, 0].byte().numpy()
    return out


# ----------------------------------------------------------------------------- RoIAlign, RoIPool
# The cases of the torchvision comparisons in tests/test_roi_align.py / test_roi_pool.py (seed 4), as
# they stood when the fixtures were made: the rows with NaN coordinates are drawn (so every later draw
# stays the same) and then dropped (the ops now refuse them); forward and backward, and no RoIs at all


def roi_align_case(r, n=2, c=3, h=9, w=11, k=24):
    """The RoIAlign case of the stored fixtures (the live test's random_case now puts boxes wholly
    outside the map where this one has its NaN rows)."""
    x = r.standard_normal((n, c, h, w))
    b = r.integers(0, n, k)
    xy = r.uniform(-4, 2 * w, (k, 2))
    wh = r.uniform(0.5, 2 * h, (k, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[0] = [4, 4, 10, 12]  # inside
    boxes[1] = [-6, -6, 8, 8]  # straddling the top-left corner
    boxes[2] = [2 * w - 4, 2 * h - 4, 2 * w + 10, 2 * h + 10]  # straddling bottom-right
    boxes[3] = [-40, -40, -20, -20]  # wholly outside
    boxes[4] = [5, 5, 5.05, 5.02]  # tiny
    boxes[5] = [-50, -50, 200, 250]  # huge
    boxes[6] = [6, 6, 6, 6]  # zero size
    boxes[7] = [9, 9, 3, 4]  # inverted
    boxes[8] = [np.nan, 2, 8, 8]  # NaN
    boxes[9] = [2, 2, 8, np.nan]
    rois = np.concatenate([b[:, None], boxes], axis=1)
    return x, rois[np.isfinite(rois).all(axis=1)]


def roi_pool_case(r, n=2, c=3, h=9, w=11, k=30):
    """The RoI pooling case of the stored fixtures (the live test's random_case now has a
    zero-height box where this one has its NaN row)."""
    x = r.standard_normal((n, c, h, w))
    b = r.integers(0, n, k)
    xy = r.uniform(-6, 2 * w, (k, 2))
    wh = r.uniform(0, 2 * h, (k, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[0] = [4, 4, 10, 12]
    boxes[1] = [-6, -6, 8, 8]
    boxes[2] = [-40, -40, -20, -20]  # wholly outside
    boxes[3] = [5, 5, 5, 5]  # zero size
    boxes[4] = [-50, -50, 200, 250]
    boxes[5] = [9, 9, 3, 4]  # inverted
    boxes[6] = [np.nan, 2, 8, 8]
    boxes[7] = [1, 1, 2.5, 3.5]  # exact halves
    rois = np.concatenate([b[:, None], boxes], axis=1)
    return x, rois[np.isfinite(rois).all(axis=1)]


ROI_OUTPUT_SIZE, ROI_SCALE = (3, 4), 0.5
ROI_ALIGN_SETTINGS = [(False, 2), (False, 0), (True, 2), (True, 0)]  # (aligned, sampling_ratio)


def build_roi_align():
    torch = import_torch()
    tv = import_torchvision()
    x, rois = roi_align_case(rng(4))
    out = {"x": x, "rois": rois, "output_size": np.array(ROI_OUTPUT_SIZE), "spatial_scale": np.array(ROI_SCALE)}
    empty = np.zeros((0, 5))
    for i, (aligned, sampling) in enumerate(ROI_ALIGN_SETTINGS):

        def fn(boxes):
            return lambda x: tv.ops.roi_align(x, torch.from_numpy(boxes), ROI_OUTPUT_SIZE, ROI_SCALE, sampling, aligned)

        y, dy, (dx,) = grads_of(torch, fn(rois), x, dy_seed=40 + i)
        y0, _, (dx0,) = grads_of(torch, fn(empty), x, dy_seed=0)
        out.update(
            {
                f"{i}.aligned": np.array(aligned),
                f"{i}.sampling_ratio": np.array(sampling),
                f"{i}.y": y,
                f"{i}.dy": dy,
                f"{i}.dx": dx,
                f"{i}.empty_y": y0,
                f"{i}.empty_dx": dx0,
            }
        )
    return out


def build_roi_pool():
    torch = import_torch()
    tv = import_torchvision()
    x, rois = roi_pool_case(rng(4))

    def fn(boxes):
        return lambda x: tv.ops.roi_pool(x, torch.from_numpy(boxes), ROI_OUTPUT_SIZE, ROI_SCALE)

    y, dy, (dx,) = grads_of(torch, fn(rois), x, dy_seed=50)
    y0, _, (dx0,) = grads_of(torch, fn(np.zeros((0, 5))), x, dy_seed=0)
    return {
        "x": x,
        "rois": rois,
        "output_size": np.array(ROI_OUTPUT_SIZE),
        "spatial_scale": np.array(ROI_SCALE),
        "y": y,
        "dy": dy,
        "dx": dx,
        "empty_y": y0,
        "empty_dx": dx0,
    }


# ----------------------------------------------------------------------------- NMS
# torchvision.ops.nms and batched_nms on the hand-built cases of tests/test_nms.py (ties, identical
# boxes, zero areas, IoU exactly at the threshold) and on random sets made as test_nms.random_set makes
# them. Ragged arrays are stored flat with their lengths: "<field>" and "<field>_len".
NMS_RANDOM_SETS = 300
NMS_THRESHOLDS = [0.0, 0.1, 0.3, 0.5, 0.7, 1.0]


def nms_random_set(r, dtype):
    """tests/test_nms.py::random_set, draw for draw."""
    n = int(r.integers(0, 25))
    xy = r.integers(0, 12, (n, 2)).astype(np.float64)
    wh = r.integers(0, 6, (n, 2)).astype(np.float64)
    if r.random() < 0.5:
        xy, wh = xy + r.random((n, 2)), wh + r.random((n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    if n > 1 and r.random() < 0.5:
        boxes[r.integers(0, n, n // 3)] = boxes[r.integers(0, n)]
    scores = r.integers(0, 4, n).astype(np.float64) if r.random() < 0.5 else r.random(n)
    return boxes.astype(dtype), scores.astype(dtype)


def nms_cases():
    """(boxes, scores, idxs, threshold) of every case, in order."""
    f32 = np.float32
    known = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 5]], f32)
    known_scores = np.array([0.9, 0.8, 0.3, 0.5], f32)
    cases = [(known, known_scores, np.zeros(4, np.int64), t) for t in (0.7, 0.5, 0.49, 1.0, 0.0)]
    same = np.array([[0, 0, 4, 4]] * 3 + [[10, 10, 12, 12]], np.float64)
    cases += [
        (same, np.full(4, 0.5), np.zeros(4, np.int64), 0.5),
        (same[::-1].copy(), np.full(4, 0.5), np.array([0, 1, 0, 1]), 0.5),
        (same, np.array([0.1, 0.5, 0.5, 0.2]), np.zeros(4, np.int64), 0.5),
    ]
    zero_area = np.array([[0, 0, 10, 10], [2, 2, 2, 8], [2, 2, 2, 8], [3, 3, 3, 3]], f32)
    cases.append((zero_area, np.array([0.1, 0.9, 0.8, 0.7], f32), np.zeros(4, np.int64), 0.0))
    grouped = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]], f32)
    grouped_scores = np.array([0.9, 0.8, 0.7, 0.95], f32)
    cases += [
        (grouped, grouped_scores, np.array([0, 1, 0, 1]), 0.5),
        (grouped, grouped_scores, np.array([0, 1, 2, 3]), 0.5),
    ]
    cases.append((np.zeros((0, 4), f32), np.zeros(0, f32), np.zeros(0, np.int64), 0.5))
    r = rng(0)
    for trial in range(NMS_RANDOM_SETS):
        dtype = np.float32 if trial % 2 else np.float64
        boxes, scores = nms_random_set(r, dtype)
        thr = float(NMS_THRESHOLDS[trial % len(NMS_THRESHOLDS)] if trial % 7 else r.random())
        cases.append((boxes, scores, r.integers(0, 3, len(boxes)), thr))
    return cases


def build_nms():
    torch = import_torch()
    tv = import_torchvision()
    fields = {"boxes64": [], "scores64": [], "boxes32": [], "scores32": [], "idxs": [], "keep": [], "keep_batched": []}
    thresholds, is32 = [], []
    for boxes, scores, idxs, thr in nms_cases():
        tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
        keep = tv.ops.nms(tb, ts, thr).numpy()
        keep_b = tv.ops.batched_nms(tb, ts, torch.from_numpy(idxs), thr).numpy()
        bits = "32" if boxes.dtype == np.float32 else "64"
        other = "64" if bits == "32" else "32"
        fields["boxes" + bits].append(boxes)
        fields["scores" + bits].append(scores)
        fields["boxes" + other].append(np.zeros((0, 4), np.dtype("float" + other)))
        fields["scores" + other].append(np.zeros(0, np.dtype("float" + other)))
        fields["idxs"].append(idxs.astype(np.int64))
        fields["keep"].append(keep.astype(np.int64))
        fields["keep_batched"].append(keep_b.astype(np.int64))
        thresholds.append(thr)
        is32.append(boxes.dtype == np.float32)
    out = {"threshold": np.array(thresholds), "float32": np.array(is32)}
    for name, parts in fields.items():
        out[name] = np.concatenate(parts)
        out[name + "_len"] = np.array([len(p) for p in parts])
    return out


# -----------------------------------------------------------------------------
# family name -> (builder, needs torchvision)
FAMILIES = {
    "conv": (build_conv, False),
    "maxpool": (build_maxpool, False),
    "norms": (build_norms, False),
    "layers": (build_layers, False),
    "losses": (build_losses, False),
    "optim": (build_optim, False),
    "boxes": (build_boxes, True),
    "anchors": (build_anchors, True),
    "resize": (build_resize, False),
    "roi_align": (build_roi_align, True),
    "roi_pool": (build_roi_pool, True),
    "nms": (build_nms, True),
}


def build(name: str) -> dict:
    """The arrays of one family's file, computed now (needs torch, and torchvision where FAMILIES says)."""
    builder, _ = FAMILIES[name]
    return {k: np.array(v) for k, v in builder().items()}


def path_of(name: str) -> Path:
    return FIXTURES / f"{name}.npz"


def main(argv=None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        print(f"unknown families {unknown}; choose from {list(FAMILIES)}", file=sys.stderr)
        return 2
    FIXTURES.mkdir(exist_ok=True)
    for name in names:
        arrays = build(name)
        np.savez_compressed(path_of(name), **arrays)
        print(
            f"{path_of(name).relative_to(FIXTURES.parent.parent)}: {len(arrays)} arrays, "
            f"{path_of(name).stat().st_size / 1024:.1f} KiB"
        )
    total = sum(p.stat().st_size for p in FIXTURES.glob("*.npz"))
    print(f"total {total / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
