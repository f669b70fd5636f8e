"""Mistakes and faults cost one clear line, never a run.

Every user mistake exits with status 2 and one ``tinymrcnn <command>: error:``
line, and leaves the files of an existing run byte-identical; Ctrl-C and
SIGTERM save a checkpoint at the current step; a kill during a save leaves a
loadable checkpoint; a diverging run names the step and the quantity.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinymrcnn.cli import UsageError, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--batch-size", "2", "--train-images", "4", "--val-images", "1", "--workers", "1"]


def cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``tinymrcnn argv...`` run in this process."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def snapshot(folder):
    return {name: Path(folder, name).read_bytes() for name in sorted(os.listdir(folder))}


def metric_lines(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step run of the shapes preset, and a few bad files next to it."""
    base = tmp_path_factory.mktemp("faults")
    out = str(base / "run")
    assert main(["train", "--out", out, "--iters", "2", *SMALL]) == 0
    (base / "random.npz").write_bytes(np.random.default_rng(0).bytes(5000))
    arrays = dict(np.load(os.path.join(out, "checkpoint.npz")))
    arrays["__json__/config"] = np.frombuffer(b'{"broken', dtype=np.uint8)
    np.savez(base / "badjson.npz", **arrays)
    import matplotlib.image as mpimg

    from tinymrcnn.data.shapes import ShapesDataset

    img, _ = ShapesDataset(1, seed=5)[0]
    mpimg.imsave(base / "photo.png", img.transpose(1, 2, 0))
    (base / "notanimage.png").write_text("hello")
    (base / "bad.json").write_text('{"images": [')
    (base / "nogt.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "photo.png", "height": 128, "width": 128}],
                "annotations": [],
                "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}, {"id": 3, "name": "triangle"}],
            }
        )
    )
    return {
        "RUN": out,
        "CKPT": os.path.join(out, "checkpoint.npz"),
        "BASE": str(base),
        "RANDOM": str(base / "random.npz"),
        "BADJSON": str(base / "badjson.npz"),
        "IMG": str(base / "photo.png"),
        "NOTIMG": str(base / "notanimage.png"),
    }


MISTAKES = [
    (["train", "--out", "RUN", "--iters", "3"], r"RUN already holds a run .*add --resume .* --overwrite"),
    (
        ["train", "--out", "RUN", "--overwrite", "--iters", "2", "--batch-size", "0"],
        r"argument --batch-size: must be >= 1, got 0",
    ),
    (["train", "--out", "RUN", "--overwrite", "--minutes", "0"], r"argument --minutes: must be .* > 0"),
    (["train", "--out", "RUN", "--overwrite", "--minutes", "-1"], r"argument --minutes: must be .* > 0"),
    (["train", "--out", "RUN", "--overwrite", "--iters", "0"], r"argument --iters: must be .* >= 1"),
    (["train", "--out", "RUN", "--overwrite", "--iters", "2", "--lr", "nan"], r"argument --lr: must be a finite"),
    (
        ["train", "--out", "RUN", "--overwrite", "--iters", "2", "--workers", "9999"],
        r"argument --workers: 9999 workers on \d+ CPU core",
    ),
    (
        ["train", "--out", "RUN", "--overwrite", "--iters", "2", "--train-images", "1"],
        r"argument --num-train-images: must be at least the batch size",
    ),
    (["train", "--out", "RUN", "--iters", "x"], r"argument --iters: invalid int value: 'x'"),
    (["train", "--out", "RUN", "--resume", "--overwrite"], r"--resume and --overwrite exclude each other"),
    (
        ["train", "--out", "RUN", "--resume", "--config", "torchvision_r50_fpn"],
        r"--config cannot be combined with --resume",
    ),
    (["train", "--out", "RUN", "--resume", "--iters", "2"], r"argument --iters: the run is already at step 2"),
    (["train", "--out", "BASE/none", "--resume"], r"--resume: no checkpoint at .*; start a new run"),
    (["train", "--out", "CKPT", "--iters", "2"], r"is a file, not a folder"),
    (["demo", "--out", "RUN", "--iters", "1"], r"already holds a run"),
    (["evaluate", "--checkpoint", "RANDOM"], r"argument --checkpoint: .*random.npz is not a checkpoint"),
    (["evaluate", "--checkpoint", "BADJSON"], r"argument --checkpoint: corrupt checkpoint .*unreadable metadata"),
    (["evaluate", "--checkpoint", "RUN"], r"argument --checkpoint: .* is a folder"),
    (["evaluate", "--checkpoint", "BASE/none.npz"], r"argument --checkpoint: no such file"),
    (["evaluate", "--checkpoint", "CKPT", "--seed", "3"], r"unrecognized arguments: --seed 3"),
    (["evaluate", "--checkpoint", "CKPT", "--images", "RUN"], r"--images needs --coco"),
    (
        ["evaluate", "--checkpoint", "CKPT", "--coco", "BASE/none.json", "--images", "RUN"],
        r"argument --coco: no such file",
    ),
    (
        ["evaluate", "--checkpoint", "CKPT", "--coco", "BASE/bad.json", "--images", "BASE"],
        r"argument --coco: .*bad.json: not valid JSON",
    ),
    (
        ["evaluate", "--checkpoint", "CKPT", "--coco", "BASE/nogt.json", "--images", "RUN"],
        r"argument --coco: .*photo.png: image file not found",
    ),
    (
        ["predict", "--checkpoint", "CKPT", "IMG", "--out", "BASE/pred", "--score-thresh", "2"],
        r"argument --score-thresh: must be in \[0, 1\]",
    ),
    (
        ["predict", "--checkpoint", "CKPT", "IMG", "BASE/missing.png", "--out", "BASE/pred"],
        r"no such image file: .*missing.png \(nothing was predicted\)",
    ),
    (["predict", "--checkpoint", "RANDOM", "IMG", "--out", "BASE/pred"], r"argument --checkpoint: .*not a checkpoint"),
    (["convert-torchvision", "BASE/none.pth", "BASE/out.npz"], r"argument input: no such file"),
]


@pytest.mark.parametrize(("argv", "message"), MISTAKES, ids=[" ".join(a[:4]) for a, _ in MISTAKES])
def test_a_mistake_is_one_line_and_touches_nothing(run, capsys, argv, message):
    def fill(a):
        for key in ("RUN", "CKPT", "BASE", "RANDOM", "BADJSON", "IMG"):
            if a == key or a.startswith(key + "/"):
                return run[key] + a[len(key) :]
        return a

    argv = [fill(a) for a in argv]
    before = snapshot(run["RUN"]), sorted(os.listdir(run["BASE"]))
    status, _, err = cli(capsys, *argv)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tinymrcnn {argv[0]}: error: "), lines[0]
    assert __import__("re").search(message.replace("RUN", __import__("re").escape(run["RUN"])), lines[0]), lines[0]
    assert "Traceback" not in err and "allow_pickle" not in err
    assert (snapshot(run["RUN"]), sorted(os.listdir(run["BASE"]))) == before


def test_cuda_without_a_gpu_is_one_line_and_makes_no_folder(run, capsys, monkeypatch, tmp_path):
    """--device cuda where numba.cuda finds no GPU: refused before the run's folder is made."""
    from tinymrcnn.kernels.cuda import device

    def no_gpu():
        raise RuntimeError("the GPU path was asked for, but no usable NVIDIA GPU and CUDA driver were found (test).")

    monkeypatch.setattr(device, "require_cuda", no_gpu)
    for argv in (
        ["train", "--out", tmp_path / "gpu_run", "--iters", "1", "--device", "cuda", *SMALL],
        ["predict", "--checkpoint", run["CKPT"], run["IMG"], "--out", tmp_path / "gpu_pred", "--device", "cuda"],
    ):
        status, _, err = cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert status == 1 and len(lines) == 1 and "no usable NVIDIA GPU" in lines[0], err
        assert not os.path.exists(argv[argv.index("--out") + 1])


def test_debug_shows_the_traceback(run, capsys, monkeypatch):
    with pytest.raises(UsageError, match="not a checkpoint"):
        main(["--debug", "evaluate", "--checkpoint", run["RANDOM"]])
    with pytest.raises(UsageError, match="not a checkpoint"):
        main(["evaluate", "--checkpoint", run["RANDOM"], "--debug"])
    monkeypatch.setenv("TINYMRCNN_DEBUG", "1")
    with pytest.raises(UsageError, match="not a checkpoint"):
        main(["evaluate", "--checkpoint", run["RANDOM"]])


def test_a_fault_is_one_line_with_status_1(run, capsys, monkeypatch):
    import tinymrcnn.train

    def boom(*a, **k):
        raise RuntimeError("something broke\nover two lines")

    monkeypatch.setattr(tinymrcnn.train, "evaluate_model", boom)
    status, _, err = cli(capsys, "evaluate", "--checkpoint", run["CKPT"], "--num-images", "1")
    assert status == 1
    assert err.strip() == (
        "tinymrcnn evaluate: error: RuntimeError: something broke over two lines (run with --debug for the traceback)"
    )


def test_evaluate_says_when_there_is_no_ground_truth(run, capsys):
    status, out, err = cli(
        capsys,
        "evaluate",
        "--checkpoint",
        run["CKPT"],
        "--coco",
        os.path.join(run["BASE"], "nogt.json"),
        "--images",
        run["BASE"],
    )
    assert status == 0 and "-1.000" in out
    assert err.strip().startswith("tinymrcnn evaluate: note: no ground truth: the 1 image(s) hold no")


def test_predict_does_every_image_it_can(run, capsys, tmp_path):
    out = tmp_path / "pred"
    status, _, err = cli(capsys, "predict", "--checkpoint", run["CKPT"], run["NOTIMG"], run["IMG"], "--out", out)
    assert status == 2
    assert (out / "photo_pred.png").exists() and not (out / "notanimage_pred.png").exists()
    assert "notanimage.png: cannot read" in err
    assert err.strip().splitlines()[-1] == (
        "tinymrcnn predict: error: 1 of 2 image(s) could not be predicted (see above); the others were"
    )


def test_predict_shrinks_a_huge_image(run, capsys, tmp_path):
    import matplotlib.image as mpimg

    big = np.zeros((2000, 1500, 3), np.float32)
    big[500:1500, 400:1200] = 0.8
    mpimg.imsave(tmp_path / "big.png", big)
    status, out, _ = cli(
        capsys, "predict", "--checkpoint", run["CKPT"], tmp_path / "big.png", "--out", tmp_path, "--max-size", "256"
    )
    assert status == 0
    assert "1500x2000 shrunk to 192x256" in out


def test_outputs_share_one_file_mode(run):
    modes = {
        name: os.stat(os.path.join(run["RUN"], name)).st_mode & 0o777
        for name in ("checkpoint.npz", "metrics.jsonl", "loss_curve.png", "ap_curve.png")
    }
    assert len(set(modes.values())) == 1, modes


def test_lock_refuses_a_second_trainer(run, capsys):
    from tinymrcnn.train import run_lock

    with run_lock(run["RUN"]):
        before = snapshot(run["RUN"])
        status, _, err = cli(capsys, "train", "--out", run["RUN"], "--resume", "--iters", "4")
        assert status == 2
        assert f"error: {run['RUN']} is in use by another training run (process {os.getpid()})" in err
        assert snapshot(run["RUN"]) == before


def test_resume_drops_a_torn_line_and_stale_temp_files_and_keeps_the_settings(run, capsys, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(run["RUN"], copy)
    with open(os.path.join(copy, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "elapsed_s": 1.0, "lr": 0.00')  # a kill while writing
    Path(copy, ".tmp-stale.npz").write_bytes(b"PK\x03\x04half")
    status, out, _ = cli(capsys, "train", "--out", copy, "--resume", "--iters", "3")
    assert status == 0
    assert "removed" in out and ".tmp-stale.npz" in out and "dropped 1 line" in out
    assert not [f for f in os.listdir(copy) if f.startswith(".tmp-")]
    lines = metric_lines(copy)  # (all readable)
    steps = [r["step"] for r in lines if "eval" not in r]
    assert steps == sorted(set(steps)) and lines[-1]["step"] == 3 and "eval" in lines[-1]
    from tinymrcnn.checkpoint import load_npz

    cfg = load_npz(os.path.join(copy, "checkpoint.npz"))[1]["train"]["config"]
    assert (cfg["batch_size"], cfg["num_train_images"], cfg["iters"]) == (2, 4, 3)  # the run's own settings


def test_overwrite_starts_again(run, capsys, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(run["RUN"], copy)
    status, _, _ = cli(capsys, "train", "--out", copy, "--overwrite", "--iters", "1", *SMALL)
    assert status == 0
    assert [r["step"] for r in metric_lines(copy)] == [1, 1]  # step 1, then its evaluation


def test_kill_during_a_checkpoint_save_leaves_the_checkpoint(run, capsys, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(run["RUN"], copy)
    ckpt = os.path.join(copy, "checkpoint.npz")
    before = Path(ckpt).read_bytes()
    # a save that stops half-way, then is killed with SIGKILL (no handler can run)
    code = (
        "import sys, time\nimport numpy as np\nfrom tinymrcnn import checkpoint as c\n"
        "arrays, meta = c.load_npz(sys.argv[1])\n"
        "def stalled(f, **kw):\n    f.write(b'PK' + bytes(1000)); f.flush(); print('saving', flush=True)\n"
        "    time.sleep(60)\n"
        "np.savez = stalled\nc.save_npz_atomic(sys.argv[1], arrays, meta)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, ckpt], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT}
    )
    assert proc.stdout.readline().strip() == "saving"
    proc.kill()
    proc.wait()
    assert [f for f in os.listdir(copy) if f.startswith(".tmp-")]  # the torn temporary file
    assert Path(ckpt).read_bytes() == before
    from tinymrcnn.model.mask_rcnn import MaskRCNN

    MaskRCNN.load(ckpt)
    status, out, _ = cli(capsys, "train", "--out", copy, "--resume", "--iters", "3")
    assert status == 0 and "left by a process killed while saving" in out
    assert not [f for f in os.listdir(copy) if f.startswith(".tmp-")]


def _train_in_background(out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "tinymrcnn.cli", "train", "--out", out, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


def _wait_for_first_step(proc, out):
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)


LONG = ["--iters", "6", "--batch-size", "2", "--train-images", "8", "--val-images", "1"]


def test_ctrl_c_on_two_workers_saves_and_resume_repeats_the_run(capsys, tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    assert main(["train", "--out", full, *LONG, "--workers", "2"]) == 0
    proc = _train_in_background(split, *LONG, "--workers", "2")
    _wait_for_first_step(proc, split)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    import re

    m = re.fullmatch(
        r"tinymrcnn train: interrupted at step (\d+); checkpoint saved to (.*); continue with "
        r"--resume",
        last,
    )
    assert m, err
    assert "Traceback" not in err
    assert not [f for f in os.listdir(split) if f.startswith(".tmp-")]
    from tinymrcnn.checkpoint import load_npz

    step = int(m.group(1))
    assert 1 <= step < 6 and load_npz(m.group(2))[1]["train"]["step"] == step
    assert main(["train", "--out", split, "--resume"]) == 0
    capsys.readouterr()
    a = [r for r in metric_lines(full) if "eval" not in r]
    b = [r for r in metric_lines(split) if "eval" not in r]
    assert [r["step"] for r in b] == [r["step"] for r in a]  # no step twice
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
    wa, wb = load_npz(os.path.join(full, "checkpoint.npz"))[0], load_npz(os.path.join(split, "checkpoint.npz"))[0]
    for k in wa:
        if k.startswith("model/"):
            np.testing.assert_allclose(wb[k], wa[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_sigterm_saves_too(tmp_path):
    out = str(tmp_path / "run")
    proc = _train_in_background(out, *LONG, "--workers", "1")
    _wait_for_first_step(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "continue with --resume" in err.strip().splitlines()[-1]
    from tinymrcnn.model.mask_rcnn import MaskRCNN

    MaskRCNN.load(os.path.join(out, "checkpoint.npz"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's overflow warnings on the way
def test_divergence_names_step_and_quantity_and_keeps_the_last_good_checkpoint(capsys, tmp_path):
    out = str(tmp_path / "run")
    status, _, err = cli(
        capsys, "train", "--out", out, "--iters", "10", "--lr", "1e6", "--checkpoint-every", "1", *SMALL
    )
    assert status == 1
    import re

    last = err.strip().splitlines()[-1]
    m = re.fullmatch(
        r"tinymrcnn train: error: training diverged at step (\d+): (.+); the last good checkpoint "
        r"\((.*), step (\d+)\) is kept\. Try a lower learning rate \(--lr, now 1e\+06\)",
        last,
    )
    assert m, err
    assert int(m.group(4)) == int(m.group(1)) - 1
    assert re.search(r"loss_\w+=|\w+ has \d+ NaN or inf value|gradient norm", m.group(2))
    from tinymrcnn.model.mask_rcnn import MaskRCNN

    model, _, meta = MaskRCNN.load(m.group(3), return_extra=True)
    assert meta["train"]["step"] == int(m.group(4))
    assert all(np.isfinite(p.data).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_no_checkpoint_with_non_finite_weights_is_saved_without_clipping(tmp_path):
    from tinymrcnn.model.mask_rcnn import MaskRCNN
    from tinymrcnn.train import NonFiniteLossError, TrainConfig, train

    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"),
        iters=10,
        lr=1e6,
        grad_clip=0.0,
        checkpoint_every=1,
        warmup_iters=0,
        batch_size=2,
        num_train_images=4,
        num_val_images=1,
        workers=1,
    )
    with pytest.raises(NonFiniteLossError, match=r"training diverged at step \d+: "):
        train(cfg, progress=False)
    ckpt = os.path.join(cfg.out_dir, "checkpoint.npz")
    if os.path.exists(ckpt):
        assert all(np.isfinite(p.data).all() for p in MaskRCNN.load(ckpt).parameters())


def test_compile_time_is_shown_and_not_counted(tmp_path, monkeypatch):
    import tinymrcnn.train as tr
    from tinymrcnn.model.mask_rcnn import MaskRCNN

    original, calls = MaskRCNN.forward_train, []

    def slow_first(self, images, targets):  # the first pass of a process: compiling
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.5)
        return original(self, images, targets)

    monkeypatch.setattr(MaskRCNN, "forward_train", slow_first)
    monkeypatch.setattr(tr, "COMPILE_NOTICE_S", 0.5)
    said = []
    cfg = tr.TrainConfig(
        out_dir=str(tmp_path / "run"), iters=1, batch_size=2, num_train_images=2, num_val_images=1, workers=1
    )
    summary = tr.train(cfg, progress=False, log=said.append)
    assert any(s.startswith("compiling kernels, first run only") for s in said), said
    assert any("not counted in the training time" in s for s in said), said
    assert summary["elapsed_s"] < 1.5


def test_model_input_checks():
    from tinymrcnn import MaskRCNNConfig
    from tinymrcnn.model.inputs import check_images, check_targets

    config = MaskRCNNConfig.shapes()
    img = np.full((3, 64, 64), 0.5, np.float32)
    check_images([img], config)
    with pytest.raises(ValueError, match=r"image 0 has values in \[127\.5, 127\.5\].*divide by 255"):
        check_images([img * 255], config)

    def target(**kw):
        masks = np.zeros((1, 64, 64), np.uint8)
        masks[0, 10:20, 10:20] = 1
        t = {"boxes": np.array([[10, 10, 20, 20]], np.float32), "labels": np.array([1]), "masks": masks}
        t.update(kw)
        return t

    check_targets([img], [target()], config)
    check_targets([img], [target(labels=np.array([2.0]), masks=target()["masks"].astype(bool))], config)
    check_targets([img], [target(boxes=np.array([[-5, -5, 20, 20]], np.float32))], config)  # partly outside
    with pytest.raises(ValueError, match=r"target 0: box 0 .* lies entirely outside the 64x64 image"):
        check_targets([img], [target(boxes=np.array([[70, 10, 80, 20]], np.float32))], config)
    with pytest.raises(ValueError, match=r"masks must hold only 0 and 1, got values 0, 255"):
        check_targets([img], [target(masks=target()["masks"] * 255)], config)
    with pytest.raises(ValueError, match=r"labels must be whole numbers"):
        check_targets([img], [target(labels=np.array([1.5]))], config)


def test_coco_evaluation_without_ground_truth_says_so():
    from tinymrcnn.evaluate import coco_evaluate

    class Empty:
        class_names = ("a",)

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return None, {
                "boxes": np.zeros((0, 4), np.float32),
                "labels": np.zeros(0, np.int64),
                "masks": np.zeros((0, 32, 32), np.uint8),
            }

    pred = {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros(0, np.int64),
        "scores": np.zeros(0),
        "masks": np.zeros((0, 32, 32), np.float32),
    }
    with pytest.warns(UserWarning, match="no ground truth"):
        ev = coco_evaluate([pred], Empty(), iou_type="segm")
    assert ev["AP"] == -1
