"""The whole model: finite-difference check of the full backward, over-fitting, options, bad input."""

import numpy as np
import pytest

import tinymrcnn.model.rpn as rpn_module
from tinymrcnn import MaskRCNN, MaskRCNNConfig
from tinymrcnn.gradcheck import numerical_gradient, relative_error
from tinymrcnn.model.mask_rcnn import LOSS_NAMES


def tiny_config(**kw):
    base = dict(
        block="basic",
        blocks_per_stage=(1, 1, 1, 1),
        stem_channels=4,
        stage_channels=(4, 8, 8, 8),
        norm="group",
        group_norm_groups=2,
        fpn_channels=4,
        anchor_sizes=(8, 16, 32, 64, 128),
        rpn_pre_nms_top_n_train=40,
        rpn_post_nms_top_n_train=16,
        rpn_batch_size_per_image=32,
        box_batch_size_per_image=12,
        box_positive_fraction=0.5,
        box_representation_size=8,
        box_roi_size=3,
        mask_roi_size=4,
        mask_num_convs=1,
        mask_channels=4,
        dtype="float64",
    )
    base.update(kw)
    return MaskRCNNConfig.shapes(**base)


def toy_batch(n=2, size=64, seed=0, dtype=np.float64):
    """Images with 1-2 filled rectangles / discs each, and their targets."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for _ in range(n):
        img = np.empty((3, size, size), dtype)
        img[:] = rng.uniform(0, 1, (3, 1, 1))
        boxes, labels, masks = [], [], []
        for j in range(2):
            cx, cy = rng.uniform(18, size - 18, 2)
            r = rng.uniform(8, 14)
            if j == 0:
                m = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r)
            else:
                m = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            for prev in masks:
                m &= ~prev.astype(bool)
            if m.sum() < 20:
                continue
            img[:, m] = rng.uniform(0, 1, (3, 1))
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(1 + j)
            masks.append(m.astype(np.uint8))
        images.append(img)
        targets.append(
            {"boxes": np.array(boxes, dtype), "labels": np.array(labels, np.int64), "masks": np.stack(masks)}
        )
    return images, targets


@pytest.fixture
def frozen_proposals(monkeypatch):
    """Hold the proposals fixed across calls (they are detached in the model: no gradient
    flows through them, so the loss must be differentiated with them held constant)."""
    cache = {}
    original = rpn_module.generate_proposals

    def fixed(*args, **kw):
        if "result" not in cache:
            cache["result"] = original(*args, **kw)
        return cache["result"]

    monkeypatch.setattr(rpn_module, "generate_proposals", fixed)
    return cache


def fd_config():
    """The tiny model, set so that every parameter gets gradient: a canonical RoI size of 16
    px spreads the RoIs of these 64-px images over P2..P5 (with 224 they all pool from P2),
    and sampling every anchor puts the RPN's loss on every level, P6 included."""
    return tiny_config(canonical_scale=16, rpn_batch_size_per_image=2048)


def fd_batch():
    """Two 64-px images whose objects span P2..P5 at a canonical size of 16 px: a 6-px square
    and a 14-px disc, a 26-px square and a 46 x 40 rectangle."""
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    shapes = [
        [(1, (xx > 8) & (xx < 14) & (yy > 8) & (yy < 14)), (2, (xx - 40) ** 2 + (yy - 40) ** 2 < 49)],
        [(1, (xx > 4) & (xx < 30) & (yy > 34) & (yy < 60)), (3, (xx > 14) & (xx < 60) & (yy > 2) & (yy < 30))],
    ]
    rng = np.random.default_rng(0)
    images, targets = [], []
    for objects in shapes:
        img = np.empty((3, 64, 64))
        img[:] = rng.uniform(0, 1, (3, 1, 1))
        masks = []
        for _, m in objects:
            m = m & ~np.any(masks, axis=0) if masks else m
            img[:, m] = rng.uniform(0, 1, (3, 1))
            masks.append(m)
        boxes = [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] for ys, xs in (np.nonzero(m) for m in masks)]
        images.append(img)
        targets.append(
            {
                "boxes": np.array(boxes, np.float64),
                "labels": np.array([c for c, _ in objects]),
                "masks": np.stack(masks).astype(np.uint8),
            }
        )
    return images, targets


def whole_model_check(model, images, targets, mutate_fpn_grads=None, only=None):
    """Worst relative error per parameter between backward() and centred differences.

    ``mutate_fpn_grads`` rewires the gradients handed to the FPN's backward (a deliberate
    wiring mistake), to show that this check catches one; ``only`` limits the differences
    to the parameters whose names start with one of its prefixes.
    """
    rng = np.random.default_rng(0)
    # Zero-initialised norms switch residual branches off at start; perturb every
    # parameter so each one affects the loss (0.1: with 0.05 some backbone gradients
    # were small enough for rounding noise in the differences to reach 1e-5).
    for p in model.parameters():
        p.data = p.data + 0.1 * rng.standard_normal(p.data.shape)

    def loss():
        model.rng = np.random.default_rng(11)  # the same samples every call
        return sum(model.forward_train(images, targets).values())

    if mutate_fpn_grads is not None:
        fpn_backward = model.backbone.fpn.backward
        model.backbone.fpn.backward = lambda grads: fpn_backward(mutate_fpn_grads(grads))
    model.zero_grad()
    assert np.isfinite(loss())
    model.backward()
    assert model.roi_heads.box_roi_pool._caches == [] and model.backbone.body.conv1._caches == []
    worst, zero = {}, []
    for name, p in model.named_parameters():
        analytic = p.grad.copy()
        if not np.abs(analytic).max() > 0:
            zero.append(name)
        if only is not None and not name.startswith(only):
            continue
        all_idx = list(np.ndindex(*p.data.shape))
        pick = [all_idx[j] for j in rng.choice(len(all_idx), size=min(3, len(all_idx)), replace=False)]
        # Backbone gradients are ~1e-5 at this init while the loss is ~3: at h=1e-6
        # the difference is noise-limited (1e-5 relative), and at h=1e-4 a bias shift
        # moves a whole channel, so some ReLU input crosses 0. h=1e-5 sits between
        # (measured: <= 7e-7). Entries below 1e-3 of their tensor's largest are
        # compared against that scale.
        num = numerical_gradient(loss, p.data, 1e-5, pick)
        sel = tuple(np.array(pick).T)
        floor = max(1e-3 * float(np.abs(analytic).max()), 1e-12)
        worst[name] = relative_error(analytic[sel], num[sel], floor=floor)
    return worst, zero


def test_whole_model_backward_matches_finite_differences(frozen_proposals):
    model = MaskRCNN(fd_config(), seed=3)
    images, targets = fd_batch()
    pooled = {}
    for name in ("box_roi_pool", "mask_roi_pool"):
        pooler = getattr(model.roi_heads, name)
        pooler.map_levels = lambda rois, f=pooler.map_levels, name=name: pooled.setdefault(name, f(rois))
    worst, zero = whole_model_check(model, images, targets)
    assert set(pooled["box_roi_pool"]) == {2, 3, 4, 5} and len(set(pooled["mask_roi_pool"])) >= 2, pooled
    assert not zero, f"parameters with an all-zero gradient: {zero}"
    assert len(worst) == len(model.parameters())
    bad = {k: v for k, v in worst.items() if v > 1e-5}
    assert not bad, bad


def test_whole_model_check_catches_a_wrong_wiring(frozen_proposals):
    # drop dP6 and triple dP5: every stage is right on its own, the model's wiring is not
    images, targets = fd_batch()
    worst, _ = whole_model_check(
        MaskRCNN(fd_config(), seed=3),
        images,
        targets,
        lambda g: g[:3] + [3 * g[3], np.zeros_like(g[4])],
        only=("backbone.fpn.layer_blocks", "backbone.fpn.inner_blocks"),
    )
    bad = {k for k, v in worst.items() if v > 1e-5}
    assert "backbone.fpn.layer_blocks.3.weight" in bad and "backbone.fpn.inner_blocks.3.weight" in bad, bad


def test_losses_have_torchvision_names_and_are_finite_without_objects():
    model = MaskRCNN(tiny_config(dtype="float32"), seed=0)
    images, targets = toy_batch(2, dtype=np.float32)
    targets[1] = {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int64),
        "masks": np.zeros((0, 64, 64), np.uint8),
    }
    losses = model.forward_train(images, targets)
    assert tuple(losses) == LOSS_NAMES
    assert all(np.isfinite(v) for v in losses.values())
    model.backward()
    assert all(np.isfinite(p.grad).all() for p in model.parameters())


def test_softmax_mask_loss_changes_only_the_mask_loss():
    images, targets = toy_batch(2, dtype=np.float32)
    out = {}
    for kind in ("sigmoid", "softmax"):
        model = MaskRCNN(tiny_config(dtype="float32", mask_loss_type=kind), seed=0)
        model.rng = np.random.default_rng(5)
        out[kind] = model.forward_train(images, targets)
    for k in LOSS_NAMES[:-1]:
        assert out["sigmoid"][k] == out["softmax"][k], k
    assert out["sigmoid"]["loss_mask"] != out["softmax"]["loss_mask"]


def test_mask_batch_size_per_image_caps_the_mask_branch():
    images, targets = toy_batch(2, dtype=np.float32)
    rois, other_losses = {}, {}
    for cap in (None, 2):
        model = MaskRCNN(tiny_config(dtype="float32", mask_batch_size_per_image=cap), seed=0)
        heads_forward = model.roi_heads.forward_train

        def recording_forward(*args, cap=cap, heads_forward=heads_forward, **kw):
            losses, grads, info = heads_forward(*args, **kw)
            rois[cap] = info["mask_rois"]
            return losses, grads, info

        model.roi_heads.forward_train = recording_forward
        model.rng = np.random.default_rng(5)
        losses = model.forward_train(images, targets)
        model.backward()
        assert np.isfinite(losses["loss_mask"])
        other_losses[cap] = {k: v for k, v in losses.items() if k != "loss_mask"}
    assert len(rois[None]) > 4 and len(rois[2]) == 4  # 2 images x at most 2 positives
    assert {tuple(r) for r in rois[2]} <= {tuple(r) for r in rois[None]}
    # the cap is drawn after every other sample: the other losses do not change
    assert other_losses[None] == other_losses[2]
    heads = MaskRCNN(tiny_config(dtype="float32", mask_batch_size_per_image=3), seed=0).roi_heads
    labels = np.array([0, 2, 0, 1, 1, 3, 0, 2])
    picked = heads.mask_positives(labels, np.random.default_rng(0))
    assert len(picked) == 3 and np.all(labels[picked] > 0) and np.all(np.diff(picked) > 0)
    assert np.array_equal(heads.mask_positives(labels[:4], np.random.default_rng(0)), [1, 3])  # <= cap: all
    with pytest.raises(ValueError, match="mask_batch_size_per_image"):
        tiny_config(mask_batch_size_per_image=0)


def test_cross_class_decay_reranks_before_the_top_n_cut():
    """One object scored as square (A) and as circle (C), another circle (B) elsewhere: the decay lowers C
    below B, and with two detections per image B takes C's place; without it C stays, as in torchvision."""
    proposals = [np.array([[10, 10, 50, 50], [60, 60, 100, 100], [12, 10, 52, 50]], np.float32)]
    probs = np.array([[0.06, 0.9, 0.04, 0.0], [0.45, 0.05, 0.5, 0.0], [0.1, 0.2, 0.7, 0.0]])  # bg, sq, ci, tri
    logits = np.log(np.maximum(probs, 1e-9)).astype(np.float32)
    deltas = np.zeros((3, 16), np.float32)  # every class's box is the proposal

    def detect(**overrides):
        heads = MaskRCNN(tiny_config(dtype="float32", box_detections_per_img=2, **overrides), seed=0).roi_heads
        (d,) = heads.postprocess_detections(logits, deltas, proposals, [(128, 128)])
        return d["labels"].tolist(), np.round(d["scores"].astype(np.float64), 4).tolist(), d["boxes"][:, 0].tolist()

    assert detect(box_cross_class_decay=1.0) == ([1, 2], [0.9, 0.7], [10, 12])  # NMS per class took only A as a square
    assert detect(box_cross_class_decay=0.2) == ([1, 2], [0.9, 0.5], [10, 60])
    with pytest.raises(ValueError, match="box_cross_class_decay"):
        tiny_config(box_cross_class_decay=1.5)


def test_images_of_different_sizes_are_padded():
    model = MaskRCNN(tiny_config(dtype="float32"), seed=0)
    a, ta = toy_batch(1, size=64, seed=1, dtype=np.float32)
    b, tb = toy_batch(1, size=96, seed=2, dtype=np.float32)
    losses = model.forward_train(a + b, ta + tb)
    assert all(np.isfinite(v) for v in losses.values())
    model.backward()
    preds = model.predict(a + b)
    assert preds[0]["masks"].shape[1:] == (64, 64) and preds[1]["masks"].shape[1:] == (96, 96)


def test_bad_input_is_named():
    model = MaskRCNN(tiny_config(dtype="float32"), seed=0)
    images, targets = toy_batch(1, dtype=np.float32)
    with pytest.raises(ValueError, match=r"labels must be in 1\.\.3"):
        t = dict(targets[0], labels=np.array([1, 4]))
        model.forward_train(images, [t])
    with pytest.raises(ValueError, match="masks must be"):
        t = dict(targets[0], masks=targets[0]["masks"][:, :32])
        model.forward_train(images, [t])
    with pytest.raises(ValueError, match=r"shape \(3, H, W\)"):
        model.predict([images[0][0]])
    with pytest.raises(ValueError, match="NaN"):
        bad = images[0].copy()
        bad[0, 0, 0] = np.nan
        model.predict([bad])
    with pytest.raises(ValueError, match="at least 32 pixels"):
        model.predict([np.zeros((3, 16, 64), np.float32)])
    with pytest.raises(ValueError, match="zero or negative size"):
        t = dict(targets[0], boxes=targets[0]["boxes"].copy())
        t["boxes"][0, 2] = t["boxes"][0, 0]
        model.forward_train(images, [t])


def test_checkpoint_round_trip_and_corrupt_file(tmp_path):
    model = MaskRCNN(tiny_config(dtype="float32"), seed=0)
    path = tmp_path / "m.npz"
    model.save(str(path))
    again = MaskRCNN.load(str(path))
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and np.array_equal(p1.data, p2.data)
    assert again.config == model.config
    bad = tmp_path / "bad.npz"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        MaskRCNN.load(str(bad))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    import zipfile

    with zipfile.ZipFile(tmp_path / "evil.npz", "w") as z:
        z.write(tmp_path / "obj.npy", "x.npy")
    with pytest.raises(ValueError, match="refusing checkpoint|not a tinymrcnn checkpoint"):
        MaskRCNN.load(str(tmp_path / "evil.npz"))


def test_overfits_two_images_and_recovers_the_masks():
    from tinymrcnn.data.shapes import ShapesDataset
    from tinymrcnn.optim import AdamW

    ds = ShapesDataset(2, seed=123)
    images, targets = zip(*[ds[i] for i in range(2)])
    model = MaskRCNN(MaskRCNNConfig.shapes(), seed=0)
    opt = AdamW([p for p in model.parameters()], lr=2e-3, weight_decay=0.0)
    first = None
    for step in range(300):
        if step == 250:  # the last 50 steps at a tenth of the rate, as a schedule's decay: at the
            opt.lr = 2e-4  # full rate one mask's IoU swung between 0.66 and 0.97 from step 150 to 350
        model.zero_grad()
        losses = model.forward_train(list(images), list(targets))
        total = sum(losses.values())
        first = total if first is None else first
        model.backward()
        opt.step()
    assert total < first / 10, (first, total)
    preds = model.predict(list(images))
    for pred, tgt in zip(preds, targets):
        for gt_mask, label in zip(tgt["masks"], tgt["labels"]):
            best = 0.0
            for m, l, s in zip(pred["masks"], pred["labels"], pred["scores"]):
                if l != label or s < 0.5:
                    continue
                b = m >= 0.5
                best = max(best, (b & (gt_mask > 0)).sum() / (b | (gt_mask > 0)).sum())
            assert best > 0.8, (label, best)
