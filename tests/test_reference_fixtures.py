"""tinymrcnn against PyTorch's and torchvision's answers stored in tests/fixtures/ (no torch needed).

The live comparisons (tests/test_conv.py, test_layers.py, test_losses.py,
test_optim.py, test_boxes.py, test_anchors.py, test_transforms.py,
test_roi_align.py, test_roi_pool.py) skip where torch is not installed, as in
CI. tests/make_reference_fixtures.py ran torch and torchvision on the same
cases once and stored inputs, outputs and gradients; the tests here check
tinymrcnn against those files with the live tests' tolerances, and
test_fixtures_are_up_to_date rebuilds the files in memory where torch is
installed, so they cannot drift from the script.
"""

from __future__ import annotations

import functools
import json

import make_reference_fixtures as ref
import numpy as np
import pytest
from optional_torch import import_torch, import_torchvision_ops

from tinymrcnn.data.segmentation import masks_to_boxes
from tinymrcnn.data.transforms import resize
from tinymrcnn.losses import mask_loss, mask_loss_softmax, sigmoid_bce_with_logits, smooth_l1, softmax_cross_entropy
from tinymrcnn.model.anchors import AnchorGenerator
from tinymrcnn.nn import (
    BatchNorm2d,
    FrozenBatchNorm2d,
    GroupNorm,
    Linear,
    MaxPool2d,
    Parameter,
    upsample_nearest,
    upsample_nearest_backward,
)
from tinymrcnn.nn.pooling import max_pool2d
from tinymrcnn.nn.upsample import nearest_source_index
from tinymrcnn.ops import (
    BoxCoder,
    batched_nms,
    box_iou,
    conv2d,
    conv2d_backward,
    conv_transpose2d,
    conv_transpose2d_backward,
    nms,
)
from tinymrcnn.ops.nms import nms_reference
from tinymrcnn.ops.roi_align import roi_align, roi_align_backward
from tinymrcnn.ops.roi_pool import roi_pool, roi_pool_backward
from tinymrcnn.optim import SGD, Adam, AdamW, WarmupMultiStep, clip_grad_norm

# ----------------------------------------------------------------------------- RoI calls
# Every call of roi_pool, roi_pool_backward and roi_align_backward goes through these three,
# written with the signatures those functions are getting:
#   roi_pool(x, rois, output_size, spatial_scale) -> y
#   roi_pool_backward(dy, x, rois, output_size, spatial_scale) -> dx
#   roi_align_backward(dy, x, rois, output_size, spatial_scale, sampling_ratio, aligned, mode) -> dx
# Once they have them, each body becomes the one direct call.


def roi_pool_y(x, rois, output_size, spatial_scale):
    return roi_pool(x, rois, output_size, spatial_scale)


def roi_pool_dx(dy, x, rois, output_size, spatial_scale):
    return roi_pool_backward(dy, x, rois, output_size, spatial_scale)


def roi_align_dx(dy, x, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    return roi_align_backward(dy, x, rois, output_size, spatial_scale, sampling_ratio, aligned, mode)


# ----------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=None)
def load(name: str) -> dict:
    with np.load(ref.path_of(name), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def ragged(data, field):
    """The i-th piece of a field stored flat with its lengths (nms.npz)."""
    ends = np.cumsum(data[field + "_len"])
    return np.split(data[field], ends[:-1])


def rel(a, b):
    """Norm-wise relative difference max|a - b| / max|b| (tests/test_conv.py::_rel)."""
    scale = max(float(np.max(np.abs(b))), 1e-30) if np.size(b) else 1.0
    return float(np.max(np.abs(np.asarray(a, np.float64) - b))) / scale if np.size(b) else 0.0


def test_fixture_files_are_small_and_need_no_pickle():
    total = 0
    for name in ref.FAMILIES:
        total += ref.path_of(name).stat().st_size
        assert load(name), name  # np.load(allow_pickle=False) read it
    assert total < 2 * 2**20


def test_fixture_cases_are_the_live_tests_cases():
    """The script repeats the live tests' case lists; they must not drift apart."""
    import test_conv
    import test_layers
    import test_optim

    assert ref.CONV_CASES == test_conv.TORCH_CASES
    assert ref.POOL_CASES == test_layers.POOL_CASES
    assert ref.UPSAMPLE_CASES[:5] == [c for c in test_layers.UPSAMPLE_CASES if len(c[0]) == 4]
    assert ref.OPTIM_CASES == test_optim.TORCH_CASES


# ----------------------------------------------------------------------------- conv (float64)
CONV_OPS = {"conv2d": (conv2d, conv2d_backward), "conv_transpose2d": (conv_transpose2d, conv_transpose2d_backward)}


@pytest.mark.parametrize("op", list(CONV_OPS))
@pytest.mark.parametrize("case", range(len(ref.CONV_CASES)))
def test_conv(op, case):
    d = load("conv")
    fwd, bwd = CONV_OPS[op]
    x, b, w = d[f"{case}.x"], d[f"{case}.b"], d[f"{case}.{op}.w"]
    s, p = tuple(int(v) for v in d[f"{case}.stride"]), tuple(int(v) for v in d[f"{case}.padding"])
    assert x.dtype == np.float64
    assert rel(fwd(x, w, b, s, p), d[f"{case}.{op}.y"]) < 1e-12
    for got, name in zip(bwd(d[f"{case}.{op}.dy"], x, w, s, p), ("dx", "dw", "db")):
        assert rel(got, d[f"{case}.{op}.{name}"]) < 1e-12, name


# ----------------------------------------------------------------------------- max pooling, with ties


@pytest.mark.parametrize("inputs", ["normal", "ties"])
@pytest.mark.parametrize("case", range(len(ref.POOL_CASES)))
def test_maxpool(case, inputs):
    d = load("maxpool")
    key = f"{case}.{['normal', 'ties'].index(inputs)}"
    k, s, p = (tuple(int(v) for v in d[f"{key}.{n}"]) for n in ("kernel", "stride", "padding"))
    x = d[f"{key}.x"]
    m = MaxPool2d(k, s, p)
    np.testing.assert_array_equal(m(x), d[f"{key}.y"])
    np.testing.assert_array_equal(max_pool2d(x, k, s, p)[1], d[f"{key}.indices"])
    np.testing.assert_allclose(m.backward(d[f"{key}.dy"]), d[f"{key}.dx"], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- norms


def test_batchnorm():
    d = load("norms")
    C = int(d["batchnorm.C"])
    ours = BatchNorm2d(C, momentum=float(d["batchnorm.momentum"])).to_dtype(np.float64)
    ours.weight.data = d["batchnorm.weight"].copy()
    ours.bias.data = d["batchnorm.bias"].copy()
    for step in range(2):
        key = f"batchnorm.train{step}"
        ours.zero_grad()
        y = ours(d[f"{key}.x"])
        dx = ours.backward(d[f"{key}.dy"])
        np.testing.assert_allclose(y, d[f"{key}.y"], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dx, d[f"{key}.dx"], rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(ours.weight.grad, d[f"{key}.dweight"], rtol=1e-10)
        np.testing.assert_allclose(ours.bias.grad, d[f"{key}.dbias"], rtol=1e-10)
    sd = {k[len("batchnorm.state.") :]: v for k, v in d.items() if k.startswith("batchnorm.state.")}
    assert set(sd) == set(ours.state_dict())
    for k, v in sd.items():
        np.testing.assert_allclose(ours.state_dict()[k], v, rtol=1e-12)
    ours.eval()
    np.testing.assert_allclose(ours(d["batchnorm.eval.x"]), d["batchnorm.eval.y"], rtol=1e-10, atol=1e-12)
    BatchNorm2d(C).load_state_dict(sd)  # torch's state dict loads unchanged


@pytest.mark.parametrize("case", range(len(ref.GROUPNORM_CASES)))
def test_groupnorm(case):
    d = load("norms")
    key = f"groupnorm.{case}"
    x = d[f"{key}.x"]
    ours = GroupNorm(int(d[f"{key}.groups"]), x.shape[1]).to_dtype(np.float64)
    ours.weight.data = d[f"{key}.weight"].copy()
    ours.bias.data = d[f"{key}.bias"].copy()
    ours.zero_grad()
    np.testing.assert_allclose(ours(x), d[f"{key}.y"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours.backward(d[f"{key}.dy"]), d[f"{key}.dx"], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(ours.weight.grad, d[f"{key}.dweight"], rtol=1e-10)
    np.testing.assert_allclose(ours.bias.grad, d[f"{key}.dbias"], rtol=1e-10)
    assert list(ours.state_dict()) == list(d[f"{key}.state_keys"])


def test_frozen_batchnorm():
    d = load("norms")
    m = FrozenBatchNorm2d(d["frozen.x"].shape[1])
    m.load_state_dict({k: d[f"frozen.{k}"] for k in ("weight", "bias", "running_mean", "running_var")})
    assert d["frozen.x"].dtype == np.float32
    np.testing.assert_allclose(m(d["frozen.x"]), d["frozen.y"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.backward(d["frozen.dy"]), d["frozen.dx"], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- upsample, linear


@pytest.mark.parametrize("case", range(len(ref.UPSAMPLE_CASES)))
def test_upsample_nearest(case):
    d = load("layers")
    key = f"upsample.{case}"
    x, size = d[f"{key}.x"], tuple(int(v) for v in d[f"{key}.size"])
    assert x.dtype == np.float32  # torch's float32 index rule
    np.testing.assert_array_equal(upsample_nearest(x, size), d[f"{key}.y"])
    np.testing.assert_allclose(upsample_nearest_backward(d[f"{key}.dy"], x.shape), d[f"{key}.dx"], rtol=1e-5, atol=1e-5)


def test_upsample_index_rule_for_many_sizes():
    d = load("layers")
    pieces = iter(
        np.split(
            d["index_rule.index"],
            np.cumsum(
                [o for _ in range(int(d["index_rule.max_in"])) for o in range(1, int(d["index_rule.max_out"]) + 1)]
            )[:-1],
        )
    )
    for i in range(1, int(d["index_rule.max_in"]) + 1):
        for o in range(1, int(d["index_rule.max_out"]) + 1):
            np.testing.assert_array_equal(nearest_source_index(i, o), next(pieces), err_msg=f"in={i}, out={o}")


def test_linear():
    d = load("layers")
    m = Linear(6, 4).to_dtype(np.float64)
    m.weight.data = d["linear.weight"].copy()
    m.bias.data = d["linear.bias"].copy()
    m.zero_grad()
    np.testing.assert_allclose(m(d["linear.x"]), d["linear.y"], rtol=1e-12)
    np.testing.assert_allclose(m.backward(d["linear.dy"]), d["linear.dx"], rtol=1e-12)
    np.testing.assert_allclose(m.weight.grad, d["linear.dweight"], rtol=1e-12)
    np.testing.assert_allclose(m.bias.grad, d["linear.dbias"], rtol=1e-12)


# ----------------------------------------------------------------------------- losses


def check_loss(ours, d, key, grad_rtol=1e-10):
    assert ours[0] == pytest.approx(float(d[f"{key}.loss"]), rel=1e-12)
    np.testing.assert_allclose(ours[1], d[f"{key}.grad"], rtol=grad_rtol, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy(reduction):
    d = load("losses")
    y, cw = d["cross_entropy.y"], d["cross_entropy.class_weight"]
    check_loss(
        softmax_cross_entropy(d["cross_entropy.z"], y, weights=cw[np.where(y >= 0, y, 0)], reduction=reduction),
        d,
        f"cross_entropy.{reduction}",
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce(reduction):
    d = load("losses")
    check_loss(
        sigmoid_bce_with_logits(d["bce.x"], d["bce.target"], weights=d["bce.weight"], reduction=reduction),
        d,
        f"bce.{reduction}",
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", range(len(ref.SMOOTH_L1_BETAS)))
def test_smooth_l1_including_kinks(case, reduction):
    d = load("losses")
    key = f"smooth_l1.{case}"
    check_loss(
        smooth_l1(d[f"{key}.pred"], d[f"{key}.target"], beta=float(d[f"{key}.beta"]), reduction=reduction),
        d,
        f"{key}.{reduction}",
        grad_rtol=1e-12,
    )


def test_mask_losses():
    d = load("losses")
    logits, labels, targets = d["mask.logits"], d["mask.labels"], d["mask.targets"]
    check_loss(mask_loss(logits, labels, targets), d, "mask.sigmoid")
    check_loss(mask_loss_softmax(logits, labels, targets), d, "mask.softmax")


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize(
    "case", range(len(ref.OPTIM_CASES)), ids=[name + str(i) for i, (name, _) in enumerate(ref.OPTIM_CASES)]
)
def test_optimizer_step_by_step(case):
    d = load("optim")
    key = str(case)
    kw = json.loads(str(d[f"{key}.kwargs"]))
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    n = sum(1 for k in d if k.startswith(f"{key}.p") and k.endswith(".init"))
    params = [Parameter(d[f"{key}.p{i}.init"].copy()) for i in range(n)]
    opt = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[str(d[f"{key}.name"])](params, **kw)
    sched = WarmupMultiStep(kw["lr"], warmup_iters=3, warmup_factor=0.1, milestones=(5,))
    for t, lr in enumerate(d[f"{key}.lr"]):
        assert lr == pytest.approx(sched.lr_at(t), rel=1e-15)  # the live test's schedule
        opt.lr = float(lr)
        for i, p in enumerate(params):
            p.grad[...] = d[f"{key}.p{i}.grads"][t]
        opt.step()
        for i, p in enumerate(params):
            np.testing.assert_allclose(
                p.data, d[f"{key}.p{i}.after"][t], rtol=1e-12, atol=1e-14, err_msg=f"step {t}, parameter {i}"
            )


def test_clip_grad_norm():
    d = load("optim")
    params = [Parameter(d[f"clip.p{i}.init"].copy()) for i in range(2)]
    for i, p in enumerate(params):
        p.grad[...] = d[f"clip.p{i}.grad"]
    total = clip_grad_norm(params, float(d["clip.max_norm"]))
    assert total == pytest.approx(float(d["clip.total"]), rel=1e-12)
    for i, p in enumerate(params):
        np.testing.assert_allclose(p.grad, d[f"clip.p{i}.clipped"], rtol=1e-12)


# ----------------------------------------------------------------------------- boxes, anchors, resize


def test_box_iou_and_coder():
    d = load("boxes")
    a, b = d["a"], d["b"]
    np.testing.assert_array_equal(box_iou(a, b), d["iou"])
    coder = BoxCoder(tuple(float(v) for v in d["weights"]))
    np.testing.assert_allclose(coder.encode(b, a), d["encoded"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(coder.decode(d["codes"], a), d["decoded"], rtol=1e-6, atol=1e-4)


def test_anchors():
    d = load("anchors")
    gen = AnchorGenerator((tuple(int(s) for s in d["sizes"]),), (tuple(float(r) for r in d["ratios"]),))
    (ours,) = gen.anchors_per_level(tuple(int(v) for v in d["image"]), [tuple(int(v) for v in d["grid"])])
    np.testing.assert_array_equal(ours, d["anchors"])


def test_resize():
    d = load("resize")
    masks = d["masks"]
    target = {
        "boxes": masks_to_boxes(masks),
        "labels": np.arange(1, len(masks) + 1),
        "masks": masks,
        "area": masks.sum(axis=(1, 2)).astype(np.float32),
        "image_id": 7,
    }
    for i in range(len(ref.RESIZE_SIZES)):
        image, t = resize(d["x"], target, tuple(int(v) for v in d[f"{i}.size"]))
        # positions in float64 here, float32 in torch: values in [0, 1] may differ by one float32 ulp of ~50
        np.testing.assert_allclose(image, d[f"{i}.image"], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(t["masks"], d[f"{i}.masks"])


# ----------------------------------------------------------------------------- RoIAlign, RoIPool


@pytest.mark.parametrize(
    "case", range(len(ref.ROI_ALIGN_SETTINGS)), ids=[f"aligned={a}-sampling={s}" for a, s in ref.ROI_ALIGN_SETTINGS]
)
def test_roi_align(case):
    d = load("roi_align")
    x, rois = d["x"], d["rois"]
    size, scale = tuple(int(v) for v in d["output_size"]), float(d["spatial_scale"])
    aligned, sampling = bool(d[f"{case}.aligned"]), int(d[f"{case}.sampling_ratio"])
    assert x.dtype == np.float64 and len(rois) > 10  # outside, straddling, zero-size, inverted, huge
    y = roi_align(x, rois, size, scale, sampling, aligned)
    np.testing.assert_allclose(y, d[f"{case}.y"], rtol=1e-10, atol=1e-10)
    dx = roi_align_dx(d[f"{case}.dy"], x, rois, size, scale, sampling, aligned, "avg")
    np.testing.assert_allclose(dx, d[f"{case}.dx"], rtol=1e-10, atol=1e-10)
    empty = np.zeros((0, 5))
    y0 = roi_align(x, empty, size, scale, sampling, aligned)
    assert y0.shape == d[f"{case}.empty_y"].shape == (0, x.shape[1]) + size
    np.testing.assert_array_equal(
        roi_align_dx(y0, x, empty, size, scale, sampling, aligned, "avg"), d[f"{case}.empty_dx"]
    )


def test_roi_pool():
    d = load("roi_pool")
    x, rois = d["x"], d["rois"]
    size, scale = tuple(int(v) for v in d["output_size"]), float(d["spatial_scale"])
    assert x.dtype == np.float64 and len(rois) > 10
    np.testing.assert_allclose(roi_pool_y(x, rois, size, scale), d["y"])
    np.testing.assert_allclose(roi_pool_dx(d["dy"], x, rois, size, scale), d["dx"], rtol=1e-12, atol=1e-12)
    empty = np.zeros((0, 5))
    y0 = roi_pool_y(x, empty, size, scale)
    assert y0.shape == d["empty_y"].shape == (0, x.shape[1]) + size
    np.testing.assert_array_equal(roi_pool_dx(y0, x, empty, size, scale), d["empty_dx"])


# ----------------------------------------------------------------------------- NMS


def test_nms_and_batched_nms():
    d = load("nms")
    pieces = {f: ragged(d, f) for f in ("boxes64", "scores64", "boxes32", "scores32", "idxs", "keep", "keep_batched")}
    assert len(d["threshold"]) == len(ref.nms_cases())
    for i, (thr, is32) in enumerate(zip(d["threshold"], d["float32"])):
        bits = "32" if is32 else "64"
        boxes, scores = pieces["boxes" + bits][i], pieces["scores" + bits][i]
        msg = f"case {i}, threshold {thr}"
        keep = nms(boxes, scores, float(thr))
        assert keep.dtype == np.int64
        np.testing.assert_array_equal(keep, pieces["keep"][i], err_msg=msg)
        np.testing.assert_array_equal(nms_reference(boxes, scores, float(thr)), pieces["keep"][i], err_msg=msg)
        np.testing.assert_array_equal(
            batched_nms(boxes, scores, pieces["idxs"][i], float(thr)), pieces["keep_batched"][i], err_msg=msg
        )


# ----------------------------------------------------------------------------- the files are current


@pytest.mark.torch
@pytest.mark.parametrize("name", list(ref.FAMILIES))
def test_fixtures_are_up_to_date(name):
    """Where torch (and, for some families, torchvision) is installed: the script's answers now equal the file's."""
    import_torch()
    if ref.FAMILIES[name][1]:
        import_torchvision_ops()
    fresh, stored = ref.build(name), load(name)
    assert sorted(fresh) == sorted(stored), "the script makes other arrays: run tests/make_reference_fixtures.py"
    for k in stored:
        a, b = fresh[k], stored[k]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), k
        if a.dtype.kind == "f":  # another torch build may round the last bit differently
            assert rel(a, b) <= (1e-6 if a.dtype == np.float32 else 1e-12), k
        else:
            np.testing.assert_array_equal(a, b, err_msg=k)
