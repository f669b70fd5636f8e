"""torchvision compatibility of the torchvision_r50_fpn preset (issue 9).

Three groups, from no dependency to the full reference:

1. No torch: the name mapping on synthetic state dicts with torchvision's
   names and shapes (current and pre-0.13 spellings), the error listing, the
   round trip, the FrozenBatchNorm eps folding, loading into the preset and
   running it, and the conversion command followed by ``tinymrcnn predict``.
2. torch only (skipped without torch): the converter reading a real ``.pth``,
   and the preset's backbone + FPN, RPN head, box head and mask head against
   the same computation written with torch.nn.functional
   (tests/torch_reference.py) from the same state dict.
3. torch + torchvision (skipped when ``import torchvision`` fails): torchvision's
   maskrcnn_resnet50_fpn with random weights, compared stage by stage: the
   transform, backbone + FPN (relative error <= 1e-4 in float32), RPN head
   outputs, anchors and proposals (the same boxes), box head outputs for the
   same proposals, mask logits for the same boxes, and the final detections.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest

from tinymrcnn import torchvision_compat as tvc
from tinymrcnn.config import MaskRCNNConfig
from tinymrcnn.model.mask_rcnn import MaskRCNN

REL_TOL = 1e-4  # float32 stages vs torch (the bound)


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# Facts about torchvision's maskrcnn_resnet50_fpn state dict (torchvision >= 0.13,
# FrozenBatchNorm2d): a sample of names with their shapes, and the entry count.
TORCHVISION_SAMPLE = {
    "backbone.body.conv1.weight": (64, 3, 7, 7),
    "backbone.body.bn1.running_var": (64,),
    "backbone.body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "backbone.body.layer1.0.downsample.1.bias": (256,),
    "backbone.body.layer2.0.conv2.weight": (128, 128, 3, 3),
    "backbone.body.layer3.5.bn3.running_mean": (1024,),
    "backbone.body.layer4.2.conv3.weight": (2048, 512, 1, 1),
    "backbone.fpn.inner_blocks.0.0.weight": (256, 256, 1, 1),
    "backbone.fpn.inner_blocks.3.0.weight": (256, 2048, 1, 1),
    "backbone.fpn.layer_blocks.2.0.bias": (256,),
    "rpn.head.conv.0.0.weight": (256, 256, 3, 3),
    "rpn.head.cls_logits.weight": (3, 256, 1, 1),
    "rpn.head.bbox_pred.bias": (12,),
    "roi_heads.box_head.fc6.weight": (1024, 256 * 7 * 7),
    "roi_heads.box_head.fc7.bias": (1024,),
    "roi_heads.box_predictor.cls_score.weight": (91, 1024),
    "roi_heads.box_predictor.bbox_pred.weight": (364, 1024),
    "roi_heads.mask_head.0.0.weight": (256, 256, 3, 3),
    "roi_heads.mask_head.3.0.bias": (256,),
    "roi_heads.mask_predictor.conv5_mask.weight": (256, 256, 2, 2),
    "roi_heads.mask_predictor.mask_fcn_logits.weight": (91, 256, 1, 1),
}
TORCHVISION_NUM_ENTRIES = 307  # 265 ResNet-50 body (FrozenBN: 4 buffers each) + 16 FPN + 6 RPN + 8 box + 12 mask


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def preset():
    """The torchvision_r50_fpn preset (random weights) and its state dict."""
    model = MaskRCNN(MaskRCNNConfig.torchvision_r50_fpn())
    return model, model.state_dict()


def random_like(state, seed=1):
    """Random values of the right shapes; BN statistics like a trained net's (positive variances)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in state.items():
        if k.endswith("running_var"):
            out[k] = rng.uniform(0.2, 2.0, v.shape).astype(np.float32)
        elif k.endswith("running_mean") or (k.endswith("bias") and ".bn" in k):
            out[k] = rng.normal(0.0, 0.1, v.shape).astype(np.float32)
        elif re.search(r"(\.bn\d|downsample\.1)\.weight$", k):
            out[k] = rng.uniform(0.3, 1.0, v.shape).astype(np.float32)
        else:
            fan_in = int(np.prod(v.shape[1:])) if v.ndim > 1 else 1
            out[k] = (rng.standard_normal(v.shape) / np.sqrt(fan_in)).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def tiny_state(preset):
    """A tinymrcnn-named state dict with random values, different from the model's."""
    return random_like(preset[1])


# ----------------------------------------------------------------------------- 1. names (no torch)
def test_every_preset_entry_has_its_torchvision_name(preset):
    _, state = preset
    tv = tvc.to_torchvision_state_dict(state, bn_eps=1e-5)
    assert len(tv) == len(state) == TORCHVISION_NUM_ENTRIES
    for name, shape in TORCHVISION_SAMPLE.items():
        assert name in tv, name
        assert tv[name].shape == shape, name


def test_legacy_names():
    assert tvc.torchvision_names("backbone.fpn.inner_blocks.2.weight") == (
        "backbone.fpn.inner_blocks.2.0.weight",
        "backbone.fpn.inner_blocks.2.weight",
    )
    assert tvc.torchvision_names("rpn.head.conv.bias") == ("rpn.head.conv.0.0.bias", "rpn.head.conv.bias")
    assert tvc.torchvision_names("roi_heads.mask_head.mask_fcn4.weight") == (
        "roi_heads.mask_head.3.0.weight",
        "roi_heads.mask_head.mask_fcn4.weight",
    )
    assert tvc.torchvision_names("roi_heads.mask_head.conv5_mask.weight") == (
        "roi_heads.mask_predictor.conv5_mask.weight",
    )
    assert tvc.torchvision_names("backbone.body.layer3.4.bn2.running_mean") == (
        "backbone.body.layer3.4.bn2.running_mean",
    )
    with pytest.raises(ValueError, match="no torchvision counterpart"):
        tvc.torchvision_names("backbone.body.layer1.0.gn1.weight")


@pytest.mark.parametrize("legacy", [False, True], ids=["current-names", "pre-0.13-names"])
def test_round_trip(preset, tiny_state, legacy):
    model, _ = preset
    tv = tvc.to_torchvision_state_dict(tiny_state, bn_eps=1e-5, legacy_names=legacy)
    if legacy:
        assert "rpn.head.conv.weight" in tv and "roi_heads.mask_head.mask_fcn1.weight" in tv
    back = tvc._convert_into(model, tv, bn_eps=1e-5)
    assert list(back) == list(tiny_state)  # tinymrcnn's order
    for k, v in tiny_state.items():
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_mixed_spellings_module_prefix_and_bn_counters(preset, tiny_state):
    """Old and new spellings mixed, DataParallel's 'module.' prefix, BatchNorm2d's counters."""
    model, _ = preset
    tv = tvc.to_torchvision_state_dict(tiny_state, bn_eps=1e-5)
    old = tvc.to_torchvision_state_dict(tiny_state, bn_eps=1e-5, legacy_names=True)
    mixed = dict(tv)
    for new_name, old_name in (
        ("rpn.head.conv.0.0.weight", "rpn.head.conv.weight"),
        ("backbone.fpn.layer_blocks.1.0.bias", "backbone.fpn.layer_blocks.1.bias"),
        ("roi_heads.mask_head.2.0.weight", "roi_heads.mask_head.mask_fcn3.weight"),
    ):
        mixed[old_name] = mixed.pop(new_name)
        assert old_name in old
    mixed["backbone.body.bn1.num_batches_tracked"] = np.array(7)
    mixed["backbone.body.layer2.0.downsample.1.num_batches_tracked"] = np.array(7)
    mixed = {"module." + k: v for k, v in mixed.items()}
    back = tvc._convert_into(model, mixed, bn_eps=1e-5)
    for k, v in tiny_state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_errors_list_missing_unexpected_duplicated_and_mis_shaped(preset, tiny_state):
    model, _ = preset
    tv = tvc.to_torchvision_state_dict(tiny_state, bn_eps=1e-5)
    del tv["backbone.body.layer2.1.conv2.weight"]
    del tv["roi_heads.mask_predictor.mask_fcn_logits.bias"]
    tv["roi_heads.box_head.fc8.weight"] = np.zeros((3, 3), np.float32)
    tv["rpn.head.conv.weight"] = tv["rpn.head.conv.0.0.weight"]  # the same entry spelled twice
    tv["rpn.head.bbox_pred.weight"] = np.zeros((15, 256, 1, 1), np.float32)
    with pytest.raises(ValueError) as info:
        tvc._convert_into(model, tv, bn_eps=1e-5)
    msg = str(info.value)
    assert "missing (2): backbone.body.layer2.1.conv2.weight, roi_heads.mask_predictor.mask_fcn_logits.bias" in msg
    assert "unexpected (1): roi_heads.box_head.fc8.weight" in msg
    assert "rpn.head.conv.0.0.weight and rpn.head.conv.weight" in msg
    assert "rpn.head.bbox_pred.weight: got (15, 256, 1, 1), expected (12, 256, 1, 1)" in msg


def test_v2_checkpoint_is_recognised(preset, tiny_state):
    model, _ = preset
    tv = tvc.to_torchvision_state_dict(tiny_state, bn_eps=1e-5)
    tv["roi_heads.box_head.0.0.weight"] = np.zeros((256, 256, 3, 3), np.float32)
    with pytest.raises(ValueError, match="maskrcnn_resnet50_fpn_v2"):
        tvc._convert_into(model, tv, bn_eps=1e-5)


def test_export_needs_batchnorm_statistics():
    """The shapes preset (GroupNorm) has no counterpart in torchvision's ResNet: a clear error."""
    model = MaskRCNN(MaskRCNNConfig.shapes())
    with pytest.raises(ValueError, match="no running statistics"):
        tvc.to_torchvision_state_dict(model)


def test_not_a_state_dict():
    with pytest.raises(ValueError, match="cls_score"):
        tvc.default_config({"foo": np.zeros(3)})
    with pytest.raises(ValueError, match="not a numeric array"):
        tvc._as_numpy("text", "x")


def test_bn_eps_is_folded_into_the_weight(preset, tiny_state):
    """eps=0 (the pretrained COCO weights) becomes tinymrcnn's eps=1e-5 with the same scale."""
    model, _ = preset
    tv = tvc.to_torchvision_state_dict(tiny_state, bn_eps=1e-5)
    tv["backbone.body.bn1.running_var"] = np.full(64, 1e-4, np.float32)  # where eps matters
    back = tvc._convert_into(model, tv, bn_eps=0.0)
    for prefix in ("backbone.body.bn1.", "backbone.body.layer4.2.bn3.", "backbone.body.layer1.0.downsample.1."):
        w, rv = tv[prefix + "weight"], tv[prefix + "running_var"]
        want = w.astype(np.float64) / np.sqrt(rv.astype(np.float64))  # torchvision's scale, eps 0
        got = back[prefix + "weight"].astype(np.float64) / np.sqrt(back[prefix + "running_var"] + 1e-5)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for stat in ("bias", "running_mean", "running_var"):
            np.testing.assert_array_equal(back[prefix + stat], tv[prefix + stat])
    assert not np.array_equal(back["backbone.body.bn1.weight"], tv["backbone.body.bn1.weight"])
    np.testing.assert_array_equal(
        back["backbone.fpn.inner_blocks.0.weight"], tv["backbone.fpn.inner_blocks.0.0.weight"]
    )  # not a BN: untouched
    # the export folds back: exported for eps=0 gives the original weights
    again = tvc.to_torchvision_state_dict(back, bn_eps=0.0)
    np.testing.assert_allclose(again["backbone.body.bn1.weight"], tv["backbone.body.bn1.weight"], rtol=1e-6)
    tv["backbone.body.layer1.0.bn1.running_var"][0] = 0.0
    with pytest.raises(ValueError, match="running_var \\+ eps <= 0"):
        tvc._convert_into(model, tv, bn_eps=0.0)


def small_config(state, **kw):
    """The preset at a small input size, so a CPU test runs in seconds."""
    return tvc.default_config(state, **{"min_size": 64, "max_size": 96, **kw})


def test_model_from_torchvision_with_other_class_count_and_predict(tiny_state):
    """A 3-class torchvision state dict -> a 3-class preset model that runs end to end."""
    rng = np.random.default_rng(3)
    tv = tvc.to_torchvision_state_dict(tiny_state, bn_eps=1e-5)
    for name, shape in (
        ("roi_heads.box_predictor.cls_score.weight", (3, 1024)),
        ("roi_heads.box_predictor.bbox_pred.weight", (12, 1024)),
        ("roi_heads.mask_predictor.mask_fcn_logits.weight", (3, 256, 1, 1)),
    ):
        tv[name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    tv["roi_heads.box_predictor.cls_score.bias"] = np.array([0.0, 6.0, 5.0], np.float32)  # confident detections
    tv["roi_heads.box_predictor.bbox_pred.bias"] = np.zeros(12, np.float32)
    tv["roi_heads.mask_predictor.mask_fcn_logits.bias"] = np.zeros(3, np.float32)
    cfg = small_config(tv)
    assert cfg.num_classes == 3 and cfg.class_names == ("background", "class_1", "class_2")
    model = tvc.model_from_torchvision(tv, config=cfg, bn_eps=1e-5)
    state = model.state_dict()
    np.testing.assert_array_equal(state["rpn.head.conv.weight"], tv["rpn.head.conv.0.0.weight"])
    np.testing.assert_array_equal(
        state["roi_heads.mask_head.conv5_mask.bias"], tv["roi_heads.mask_predictor.conv5_mask.bias"]
    )
    img = np.random.default_rng(0).uniform(0, 1, (3, 48, 72)).astype(np.float32)
    (pred,) = model.predict([img])
    n = len(pred["boxes"])
    assert n > 0
    assert pred["boxes"].shape == (n, 4) and pred["masks"].shape == (n, 48, 72)
    assert set(pred["labels"].tolist()) <= {1, 2}
    assert np.all(pred["boxes"][:, 2] <= 72 + 1e-3) and np.all(pred["boxes"][:, 3] <= 48 + 1e-3)
    assert np.all((pred["masks"] >= 0) & (pred["masks"] <= 1))


def test_default_config_uses_coco_names(preset):
    _, state = preset
    cfg = tvc.default_config(tvc.to_torchvision_state_dict(state))
    assert cfg.num_classes == 91 and cfg.class_names[1] == "person" and cfg.class_names[90] == "toothbrush"
    assert cfg.min_size == 800 and cfg.max_size == 1333


# ----------------------------------------------------------------------------- the conversion command
def convert_parser():
    parser = argparse.ArgumentParser(prog="tinymrcnn")
    tvc.add_convert_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def write_png(path, h, w, seed=0):
    import matplotlib.image as mpimg

    rgb = np.random.default_rng(seed).uniform(0, 1, (h, w, 3))
    mpimg.imsave(path, rgb)


def test_convert_command_then_predict(tiny_state, tmp_path, capsys):
    """docs/torchvision.md's steps 2 and 3 on a synthetic state dict saved as .npz (no torch needed)."""
    from tinymrcnn import cli

    tv = tvc.to_torchvision_state_dict(tiny_state, bn_eps=0.0)
    np.savez(tmp_path / "tv.npz", **tv)
    args = convert_parser().parse_args(
        [
            "convert-torchvision",
            str(tmp_path / "tv.npz"),
            str(tmp_path / "m.npz"),
            "--min-size",
            "64",
            "--max-size",
            "96",
        ]
    )
    args.func(args)
    assert "next: tinymrcnn predict --checkpoint" in capsys.readouterr().out
    loaded = MaskRCNN.load(str(tmp_path / "m.npz"))
    assert loaded.config.min_size == 64 and loaded.config.class_names[1] == "person"
    for k, v in loaded.state_dict().items():
        np.testing.assert_allclose(v, tiny_state[k], rtol=2e-7, atol=0, err_msg=k)  # eps folded back and forth
    write_png(tmp_path / "photo.png", 50, 70)
    assert (
        cli.main(
            [
                "predict",
                "--checkpoint",
                str(tmp_path / "m.npz"),
                str(tmp_path / "photo.png"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert (tmp_path / "out" / "photo_pred.png").exists()


def test_convert_command_reports_bad_input(tmp_path):
    np.savez(tmp_path / "bad.npz", **{"roi_heads.box_predictor.cls_score.weight": np.zeros((91, 1024), np.float32)})
    args = convert_parser().parse_args(["convert-torchvision", str(tmp_path / "bad.npz"), str(tmp_path / "m.npz")])
    with pytest.raises(SystemExit, match="missing \\(306\\)"):
        args.func(args)
    assert not (tmp_path / "m.npz").exists()


def test_cli_wires_convert_torchvision():
    from tinymrcnn import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "convert-torchvision" not in sub.choices:
        pytest.skip("tinymrcnn/cli.py does not wire add_convert_parser yet")
    assert sub.choices["convert-torchvision"].get_default("func") is tvc._cmd_convert


def test_model_from_torchvision(tiny_state):
    tv = tvc.to_torchvision_state_dict(tiny_state, bn_eps=1e-5)
    model = tvc.model_from_torchvision(tv, config=small_config(tv))
    assert model.config.min_size == 64
    np.testing.assert_array_equal(
        model.state_dict()["roi_heads.box_head.fc6.weight"], tv["roi_heads.box_head.fc6.weight"]
    )


# ----------------------------------------------------------------------------- 2. torch only
def test_convert_checkpoint_reads_pth(tiny_state, tmp_path):
    torch = pytest.importorskip("torch")
    tv = tvc.to_torchvision_state_dict(tiny_state, bn_eps=1e-5)
    torch.save({k: torch.from_numpy(v) for k, v in tv.items()}, tmp_path / "plain.pth")
    model = tvc.convert_checkpoint(
        str(tmp_path / "plain.pth"), str(tmp_path / "m.npz"), bn_eps=1e-5, min_size=64, max_size=96
    )
    assert model.config.min_size == 64
    loaded = MaskRCNN.load(str(tmp_path / "m.npz")).state_dict()
    for k, v in tiny_state.items():
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)
    # a training checkpoint of torchvision's reference scripts keeps the weights under "model"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in tv.items()}, "epoch": 3}, tmp_path / "train.pth")
    read = tvc.load_torchvision_file(str(tmp_path / "train.pth"))
    assert read.keys() == tv.keys() and all(np.array_equal(read[k], tv[k]) for k in tv)
    torch.save({"model": "not weights", "w": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="'model' is a str, not a tensor"):
        tvc.load_torchvision_file(str(tmp_path / "odd.pth"))


@pytest.fixture(scope="module")
def torch_ref(preset, tiny_state):
    """The preset loaded with random weights, and the torch.nn.functional re-statement of it."""
    pytest.importorskip("torch")
    from torch_reference import TorchReference

    model, _ = preset
    model.load_state_dict(tiny_state)
    model.eval()
    return model, TorchReference(tiny_state, bn_eps=1e-5)


def test_backbone_fpn_matches_torch_functional(torch_ref):
    import torch

    model, ref = torch_ref
    x = np.random.default_rng(0).standard_normal((1, 3, 96, 160)).astype(np.float32)
    ours = model.backbone(x)
    with torch.no_grad():
        theirs = ref.backbone_fpn(torch.from_numpy(x))
    assert (
        [o.shape for o in ours]
        == [tuple(t.shape) for t in theirs]
        == [(1, 256, 24, 40), (1, 256, 12, 20), (1, 256, 6, 10), (1, 256, 3, 5), (1, 256, 2, 3)]
    )
    for level, (a, b) in enumerate(zip(ours, theirs)):
        assert rel_err(a, b.numpy()) <= REL_TOL, f"P{level + 2}"
    for level, p in enumerate(theirs):  # RPN head on every level, same input
        la, da = model.rpn.head(p.numpy())
        with torch.no_grad():
            lb, db = ref.rpn_head(p)
        assert rel_err(la, lb.numpy()) <= REL_TOL and rel_err(da, db.numpy()) <= REL_TOL, f"P{level + 2}"


def test_box_and_mask_heads_match_torch_functional(torch_ref):
    import torch

    model, ref = torch_ref
    rng = np.random.default_rng(1)
    box_feats = np.maximum(rng.standard_normal((5, 256, 7, 7)), 0).astype(np.float32)
    mask_feats = np.maximum(rng.standard_normal((3, 256, 14, 14)), 0).astype(np.float32)
    cls_a, box_a = model.roi_heads.box_predictor(model.roi_heads.box_head(box_feats))
    mask_a = model.roi_heads.mask_head(mask_feats)
    with torch.no_grad():
        cls_b, box_b = ref.box_head(torch.from_numpy(box_feats))
        mask_b = ref.mask_head(torch.from_numpy(mask_feats))
    assert cls_a.shape == (5, 91) and box_a.shape == (5, 364) and mask_a.shape == (3, 91, 28, 28)
    assert rel_err(cls_a, cls_b.numpy()) <= REL_TOL
    assert rel_err(box_a, box_b.numpy()) <= REL_TOL
    assert rel_err(mask_a, mask_b.numpy()) <= REL_TOL


# ----------------------------------------------------------------------------- 3. torch + torchvision
def import_torchvision():
    """torchvision, or a skip that says why (on a CPU-only torch its compiled ops may fail to load)."""
    pytest.importorskip("torch")
    try:
        import torchvision
        from torchvision.models.detection import maskrcnn_resnet50_fpn  # noqa: F401
        from torchvision.ops import nms, roi_align  # noqa: F401
    except Exception as e:  # ImportError, or RuntimeError from the C ops' registration
        pytest.skip(f"torchvision is not importable here: {type(e).__name__}: {e}")
    return torchvision


TV_MIN, TV_MAX = 256, 400  # small inputs keep the ResNet-50 comparison at a few seconds


@pytest.fixture(scope="module")
def tv_pair():
    """torchvision's maskrcnn_resnet50_fpn with random weights, and tinymrcnn loaded from its state dict.

    Built with weights=None, so its norm layers are BatchNorm2d in eval mode
    (the same affine map as FrozenBatchNorm2d, eps 1e-5); their statistics are
    randomised so that the map is not the identity. The classifier's bias is
    raised for classes 1-3 and its weights scaled up, so random weights still
    give detections above the 0.05 score threshold, with well separated scores.
    """
    import_torchvision()
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    tvm = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=TV_MIN, max_size=TV_MAX)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tvm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.2, 2.0, generator=gen)
                m.weight.uniform_(0.3, 1.0, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
        tvm.rpn.head.cls_logits.weight.normal_(0.0, 0.1, generator=gen)
        tvm.rpn.head.bbox_pred.weight.normal_(0.0, 0.02, generator=gen)
        tvm.roi_heads.box_predictor.cls_score.weight.normal_(0.0, 0.1, generator=gen)
        tvm.roi_heads.box_predictor.cls_score.bias[1:4] = torch.tensor([3.0, 2.5, 2.0])
        tvm.roi_heads.box_predictor.bbox_pred.weight.normal_(0.0, 0.01, generator=gen)
    tvm.eval()
    state = {k: v.detach().numpy().copy() for k, v in tvm.state_dict().items()}
    model = tvc.model_from_torchvision(
        state, config=tvc.default_config(state, min_size=TV_MIN, max_size=TV_MAX), bn_eps=1e-5
    )
    model.eval()
    rng = np.random.default_rng(5)
    images = [rng.uniform(0, 1, (3, 200, 300)).astype(np.float32), rng.uniform(0, 1, (3, 240, 180)).astype(np.float32)]
    return tvm, model, state, images


def test_tv_state_dict_names_and_export_load_into_torchvision(tv_pair):
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    tvm, model, state, _ = tv_pair
    real = {k: v.shape for k, v in state.items() if not k.endswith("num_batches_tracked")}
    exported = tvc.to_torchvision_state_dict(model, bn_eps=1e-5)
    assert {k: v.shape for k, v in exported.items()} == real
    for legacy in (False, True):
        fresh = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        sd = tvc.to_torchvision_state_dict(model, bn_eps=1e-5, legacy_names=legacy)
        result = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
        assert not result.unexpected_keys
        assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)  # BatchNorm2d's counters
        for k, v in fresh.state_dict().items():
            if not k.endswith("num_batches_tracked"):
                np.testing.assert_array_equal(v.numpy(), state[k], err_msg=k)


def tv_batch(tvm, images):
    import torch

    with torch.no_grad():
        return tvm.transform([torch.from_numpy(i) for i in images])[0]


def test_tv_transform(tv_pair):
    tvm, model, _, images = tv_pair
    il = tv_batch(tvm, images)
    x, sizes, _ = model.transform(images, None, dtype=np.float32)
    assert [tuple(s) for s in il.image_sizes] == [tuple(s) for s in sizes] == [(256, 384), (341, 256)]
    assert x.shape == tuple(il.tensors.shape) == (2, 3, 352, 384)
    # tinymrcnn computes the resize's sampling positions in float64, torch in float32: for a
    # ratio like 240 / 341 they differ in the 7th digit, hence not bit-equal pixels.
    assert rel_err(x[0], il.tensors[0].numpy()) <= 1e-6  # 200 / 256: an exact ratio
    assert rel_err(x, il.tensors.numpy()) <= REL_TOL


@pytest.fixture(scope="module")
def tv_features(tv_pair):
    import torch

    tvm, model, _, images = tv_pair
    il = tv_batch(tvm, images)
    with torch.no_grad():
        feats = list(tvm.backbone(il.tensors).values())
    return il, feats


def test_tv_backbone_fpn(tv_pair, tv_features):
    _, model, _, _ = tv_pair
    il, feats = tv_features
    ours = model.backbone(il.tensors.numpy())
    assert len(ours) == len(feats) == 5
    for level, (a, b) in enumerate(zip(ours, feats)):
        assert a.shape == tuple(b.shape)
        err = rel_err(a, b.numpy())
        assert err <= REL_TOL, f"P{level + 2}: relative error {err:.2e}"


def test_tv_pretrained_bn_eps(tv_pair, tv_features):
    """Like the pretrained COCO model (eps = 0 in every FrozenBatchNorm2d): the default bn_eps=0 matches.

    The stem's running variances are made small, where eps 1e-5 against 0 is a visible
    difference, so the check would catch a converter that ignored the eps.
    """
    import copy

    import torch

    tvm, _, _, _ = tv_pair
    il, _ = tv_features
    tv0 = copy.deepcopy(tvm)
    with torch.no_grad():
        tv0.backbone.body.bn1.running_var.uniform_(1e-4, 1e-3, generator=torch.Generator().manual_seed(2))
        for m in tv0.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eps = 0.0
        want = tv0.backbone.body.layer1(
            tv0.backbone.body.maxpool(
                tv0.backbone.body.relu(tv0.backbone.body.bn1(tv0.backbone.body.conv1(il.tensors)))
            )
        ).numpy()
    state = {k: v.detach().numpy().copy() for k, v in tv0.state_dict().items()}
    cfg = tvc.default_config(state, min_size=TV_MIN, max_size=TV_MAX)
    errors = {}
    for eps in (0.0, 1e-5):
        body = tvc.model_from_torchvision(state, config=cfg, bn_eps=eps).eval().backbone.body
        x = body.conv1(il.tensors.numpy())
        got = body.layer1(body.maxpool(body.relu(body.bn1(x))))
        errors[eps] = rel_err(got, want)
    assert errors[0.0] <= REL_TOL
    assert errors[1e-5] > 100 * REL_TOL  # the eps matters here: ignoring it would be caught


def test_tv_rpn_head_anchors_and_proposals(tv_pair, tv_features):
    import torch

    from tinymrcnn.model.proposals import generate_proposals
    from tinymrcnn.model.rpn import flatten_head_outputs

    tvm, model, _, _ = tv_pair
    il, feats = tv_features
    with torch.no_grad():
        tv_logits, tv_deltas = tvm.rpn.head(feats)
        tv_anchors = tvm.rpn.anchor_generator(il, feats)
        tv_props, _ = tvm.rpn(il, dict(zip("0123", feats[:4]), pool=feats[4]))
    feats_np = [f.numpy() for f in feats]
    flat_l, flat_d = [], []
    for p, lb, db in zip(feats_np, tv_logits, tv_deltas):
        la, da = model.rpn.head(p)
        assert rel_err(la, lb.numpy()) <= REL_TOL and rel_err(da, db.numpy()) <= REL_TOL
        fl, fd = flatten_head_outputs(lb.numpy(), db.numpy())
        flat_l.append(fl)
        flat_d.append(fd)
    anchors = model.rpn.anchor_generator.anchors_per_level(il.tensors.shape[-2:], [f.shape[-2:] for f in feats_np])
    np.testing.assert_array_equal(np.concatenate(anchors), tv_anchors[0].numpy())
    c = model.config
    # (a) tinymrcnn's proposal layer on torchvision's own head outputs: the same boxes, in the same order
    props, _, _ = generate_proposals(
        flat_l,
        flat_d,
        anchors,
        il.image_sizes,
        c.rpn_pre_nms_top_n_test,
        c.rpn_post_nms_top_n_test,
        c.rpn_nms_thresh,
        c.rpn_score_thresh,
        c.rpn_min_size,
        model.rpn.box_coder,
    )
    for a, b in zip(props, tv_props):
        assert a.shape == tuple(b.shape)
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-3)
    # (b) the whole RPN of tinymrcnn on the same features. Its head outputs differ from
    # torchvision's by float rounding (~1e-6 relative), so proposals whose scores tie to that
    # precision may swap places, or swap in and out at the top-1000 cut; nothing else may differ.
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    with torch.no_grad():
        obj, dl = concat_box_prediction_layers(list(tv_logits), list(tv_deltas))
        decoded = tvm.rpn.box_coder.decode(dl, tv_anchors).view(len(tv_anchors), -1, 4)
        per_level = [o[0].numel() for o in tv_logits]
        tv_boxes, tv_scores = tvm.rpn.filter_proposals(decoded, obj, il.image_sizes, per_level)
    for a, b in zip(tv_boxes, tv_props):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # the same steps as tvm.rpn
    ours, info = model.rpn.eval()(feats_np, il.image_sizes, il.tensors.shape[-2:])  # test-time top-n
    for a, sa, b, sb in zip(ours, info["proposal_scores"], tv_boxes, tv_scores):
        assert a.shape == tuple(b.shape)
        match_detections(a, sa, b.numpy(), sb.numpy(), atol=1e-3, score_tol=1e-5)


def match_detections(a, sa, b, sb, atol, score_tol, max_shift=3, max_unmatched=3):
    """Pair boxes a (n, 4) with scores sa (n,) in decreasing order to b, sb: (ia, ib) index arrays.

    Every box must have a counterpart within ``atol`` (max coordinate difference), in the
    same order up to swaps of near neighbours, except at most ``max_unmatched`` boxes at the
    end of either list whose scores tie the last kept score to ``score_tol`` (a top-N cut).
    """
    dist = np.abs(a[:, None, :] - b[None, :, :]).max(axis=2)  # (n, m)
    ia = np.flatnonzero(dist.min(axis=1) <= atol)
    ib = dist[ia].argmin(axis=1)
    assert len(np.unique(ib)) == len(ib), "two boxes matched the same counterpart"
    for s, unmatched in ((sa, np.setdiff1d(np.arange(len(a)), ia)), (sb, np.setdiff1d(np.arange(len(b)), ib))):
        assert len(unmatched) <= max_unmatched, f"{len(unmatched)} boxes have no counterpart"
        assert np.all(s[unmatched] <= s[-1] + score_tol), "an unmatched box is not at the top-N cut"
    assert np.abs(ia - ib).max(initial=0) <= max_shift, "the order differs beyond near ties"
    return ia, ib


def _rois(boxes):
    return np.concatenate(
        [np.concatenate([np.full((len(b), 1), i, np.float32), b], 1) for i, b in enumerate(boxes)]
    ).astype(np.float32)


def test_tv_box_head_on_the_same_proposals(tv_pair, tv_features):
    import torch

    tvm, model, _, _ = tv_pair
    il, feats = tv_features
    fdict = dict(zip("0123", feats[:4]), pool=feats[4])
    with torch.no_grad():
        props, _ = tvm.rpn(il, fdict)
        pooled = tvm.roi_heads.box_roi_pool(fdict, props, il.image_sizes)
        cls_b, box_b = tvm.roi_heads.box_predictor(tvm.roi_heads.box_head(pooled))
    props_np = [p.numpy() for p in props]
    ours_pooled = model.roi_heads.box_roi_pool([f.numpy() for f in feats[:4]], _rois(props_np))
    assert rel_err(ours_pooled, pooled.numpy()) <= REL_TOL
    cls_a, box_a = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled.numpy()))
    assert rel_err(cls_a, cls_b.numpy()) <= REL_TOL
    assert rel_err(box_a, box_b.numpy()) <= REL_TOL
    # post-processing on the same logits: the same detections
    with torch.no_grad():
        tv_boxes, tv_scores, tv_labels = tvm.roi_heads.postprocess_detections(cls_b, box_b, props, il.image_sizes)
    dets = model.roi_heads.postprocess_detections(cls_b.numpy(), box_b.numpy(), props_np, il.image_sizes)
    for d, b, s, l in zip(dets, tv_boxes, tv_scores, tv_labels):
        assert len(d["boxes"]) == len(b) > 0
        np.testing.assert_array_equal(d["labels"], l.numpy())
        np.testing.assert_allclose(d["scores"], s.numpy(), rtol=1e-5)
        np.testing.assert_allclose(d["boxes"], b.numpy(), rtol=0, atol=1e-3)


def test_tv_mask_head_on_the_same_boxes(tv_pair, tv_features):
    import torch

    tvm, model, _, _ = tv_pair
    il, feats = tv_features
    fdict = dict(zip("0123", feats[:4]), pool=feats[4])
    with torch.no_grad():
        props, _ = tvm.rpn(il, fdict)
        boxes = [p[:40] for p in props]
        pooled = tvm.roi_heads.mask_roi_pool(fdict, boxes, il.image_sizes)
        logits_b = tvm.roi_heads.mask_predictor(tvm.roi_heads.mask_head(pooled))
    ours_pooled = model.roi_heads.mask_roi_pool([f.numpy() for f in feats[:4]], _rois([b.numpy() for b in boxes]))
    assert rel_err(ours_pooled, pooled.numpy()) <= REL_TOL
    logits_a = model.roi_heads.mask_head(pooled.numpy())
    assert logits_a.shape == tuple(logits_b.shape) == (80, 91, 28, 28)
    assert rel_err(logits_a, logits_b.numpy()) <= REL_TOL


def test_tv_final_detections(tv_pair):
    import torch

    tvm, model, _, images = tv_pair
    with torch.no_grad():
        theirs = tvm([torch.from_numpy(i) for i in images])
    ours = model.predict(images)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        n = len(b["boxes"])
        assert n > 0, "the fixture should produce detections"
        assert len(a["boxes"]) == n, f"image {i}: {len(a['boxes'])} detections, torchvision {n}"
        ia, ib = match_detections(
            a["boxes"], a["scores"], b["boxes"].numpy(), b["scores"].numpy(), atol=1e-2, score_tol=1e-5
        )
        np.testing.assert_array_equal(a["labels"][ia], b["labels"].numpy()[ib])
        np.testing.assert_allclose(a["scores"][ia], b["scores"].numpy()[ib], rtol=1e-4, atol=1e-6)
        masks_b = b["masks"][:, 0].numpy()
        assert a["masks"].shape == masks_b.shape == (n,) + images[i].shape[1:]
        assert np.abs(a["masks"][ia] - masks_b[ib]).max() <= 1e-3


def test_tv_docs_steps(tmp_path, monkeypatch, capsys):
    """docs/torchvision.md step by step, with weights=None where the docs download the pretrained ones."""
    import_torchvision()
    import os

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "torchvision.md")).read()
    snippets = re.findall(r'python -c "\n(.*?)\n"', doc, flags=re.S)
    assert len(snippets) == 2 and all("weights='DEFAULT'" in code for code in snippets)
    monkeypatch.chdir(tmp_path)
    for code in snippets:  # step 1: .pth and .npz
        exec(code.replace("weights='DEFAULT'", "weights=None, weights_backbone=None"), {})
    for saved in ("maskrcnn_resnet50_fpn_coco.pth", "maskrcnn_resnet50_fpn_coco.npz"):
        args = convert_parser().parse_args(
            [
                "convert-torchvision",
                saved,
                "coco_r50_fpn.npz",
                "--bn-eps",
                "1e-5",
                "--min-size",
                "64",
                "--max-size",
                "96",
            ]
        )  # step 2
        args.func(args)
        assert "coco_r50_fpn.npz" in capsys.readouterr().out
    write_png(tmp_path / "photo.png", 60, 80)
    from tinymrcnn import cli

    assert cli.main(["predict", "--checkpoint", "coco_r50_fpn.npz", "photo.png", "--out", "out/"]) == 0  # step 3
    assert (tmp_path / "out" / "photo_pred.png").exists()
