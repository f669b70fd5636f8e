"""The training loop: exact resume, non-finite losses, outputs; the CLI end to end."""

import json
import os

import numpy as np
import pytest

from tinymrcnn import MaskRCNNConfig
from tinymrcnn.model.mask_rcnn import MaskRCNN
from tinymrcnn.train import NonFiniteLossError, TrainConfig, schedule_progress, train


def small_model_config():
    return MaskRCNNConfig.shapes(
        stem_channels=8,
        stage_channels=(8, 16, 16, 16),
        fpn_channels=16,
        box_representation_size=32,
        mask_channels=16,
        mask_num_convs=1,
        rpn_pre_nms_top_n_train=100,
        rpn_post_nms_top_n_train=50,
        box_batch_size_per_image=16,
    )


def cfg(tmp_path, name, **kw):
    base = dict(
        out_dir=str(tmp_path / name),
        batch_size=2,
        num_train_images=8,
        num_val_images=3,
        checkpoint_every=3,
        warmup_iters=2,
        log_every=1,
        lr=1e-3,
        workers=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_resume_continues_exactly(tmp_path):
    full = train(cfg(tmp_path, "full", iters=5), small_model_config(), progress=False)
    train(cfg(tmp_path, "split", iters=3), small_model_config(), progress=False)
    resumed = train(cfg(tmp_path, "split", iters=5), resume=True, progress=False)
    a = [r["loss"] for r in full["history"][3:]]
    b = [r["loss"] for r in resumed["history"]]
    assert len(b) == 2
    np.testing.assert_allclose(b, a, rtol=1e-6)
    m1 = MaskRCNN.load(full["checkpoint"])
    m2 = MaskRCNN.load(resumed["checkpoint"])
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        np.testing.assert_allclose(q.data, p.data, rtol=1e-5, atol=1e-7, err_msg=n)
    for f in ("metrics.jsonl", "loss_curve.png", "ap_curve.png", "checkpoint.npz"):
        assert os.path.exists(os.path.join(tmp_path, "full", f)), f
    lines = [json.loads(l) for l in open(full["metrics"])]
    assert lines[-1]["eval"]["mask_AP"] >= 0.0


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    original = MaskRCNN.forward_train
    calls = {"n": 0}

    def flaky(self, images, targets):
        out = original(self, images, targets)
        calls["n"] += 1
        if calls["n"] == 4:  # (call 1 is the compile warm-up before step 1)
            out["loss_mask"] = float("nan")
        return out

    monkeypatch.setattr(MaskRCNN, "forward_train", flaky)
    c = cfg(tmp_path, "nan", iters=6, checkpoint_every=1)
    with pytest.raises(
        NonFiniteLossError,
        match=r"diverged at step 3: loss_mask=nan; the last good "
        r"checkpoint \(.*, step 2\) is kept",
    ):
        train(c, small_model_config(), progress=False)
    model, _, meta = MaskRCNN.load(os.path.join(c.out_dir, "checkpoint.npz"), return_extra=True)
    assert meta["train"]["step"] == 2


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg(tmp_path, "none", iters=2), resume=True, progress=False)


def test_cli_demo_train_evaluate_predict(tmp_path, capsys):
    from tinymrcnn.cli import main

    out = tmp_path / "demo"
    main(["demo", "--iters", "2", "--val-images", "3", "--out", str(out)])
    text = capsys.readouterr().out
    assert "mask" in text and "predictions.png" in text
    assert (out / "predictions.png").stat().st_size > 1000
    main(["evaluate", "--checkpoint", str(out / "checkpoint.npz"), "--num-images", "2"])
    assert "AP50" in capsys.readouterr().out
    import matplotlib.image as mpimg

    from tinymrcnn.data.shapes import ShapesDataset

    img, _ = ShapesDataset(1, seed=5)[0]
    mpimg.imsave(tmp_path / "photo.png", img.transpose(1, 2, 0))
    main(
        [
            "predict",
            "--checkpoint",
            str(out / "checkpoint.npz"),
            str(tmp_path / "photo.png"),
            "--out",
            str(tmp_path / "pred"),
        ]
    )
    assert (tmp_path / "pred" / "photo_pred.png").exists()


def test_time_budget_schedule_runs_on_the_clock(tmp_path):
    # --minutes alone: the cosine decay is the fraction of the budget left after warm-up
    c = cfg(tmp_path, "clock", minutes=1.0, warmup_iters=10)
    assert schedule_progress(c, 5, 3.0, None) is None  # warm-up counts steps
    assert schedule_progress(c, 10, 6.0, 6.0) == pytest.approx(0.0)
    assert schedule_progress(c, 300, 33.0, 6.0) == pytest.approx(0.5)  # (33 - 6) / (60 - 6)
    assert schedule_progress(c, 900, 60.0, 6.0) == pytest.approx(1.0)
    # with a step count the schedule counts steps (exact resume), even if minutes is given too
    assert schedule_progress(cfg(tmp_path, "steps", iters=50, minutes=1.0), 30, 40.0, 6.0) is None


def test_time_budget_run_stops_and_decays(tmp_path):
    out = train(
        cfg(tmp_path, "budget", minutes=0.05, warmup_iters=1, num_train_images=16), small_model_config(), progress=False
    )
    assert out["elapsed_s"] >= 3.0 and out["step"] >= 2
    lrs = [h["lr"] for h in out["history"][1:]]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # decays after warm-up
    assert lrs[-1] < 1e-3  # below the peak lr
    assert out["history"][-1]["elapsed_s"] >= 3.0  # stopped at the budget
