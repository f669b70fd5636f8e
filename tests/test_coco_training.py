"""Training on COCO-format data: mixed images train, the held-out split, best.npz, exact resume, bad input."""

import json
import os
import re

import numpy as np
import pytest
from coco_samples import coco_dict, write_coco
from test_faults import cli, snapshot
from test_train import small_model_config

from tinymrcnn.data import CocoDataset, ShapesDataset, export_to_coco
from tinymrcnn.data.batches import TrainingView, heldout_split, make_datasets
from tinymrcnn.model.mask_rcnn import MaskRCNN
from tinymrcnn.train import TrainConfig, train

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def mixed_coco(folder):
    """The hand-made COCO folder (RGB PNG, grey PNG, an unannotated JPEG, crowd regions, polygons and RLE)
    plus an RGBA PNG and a palette PNG, each with a polygon object."""
    from PIL import Image

    data = coco_dict()
    path, image_dir = write_coco(folder, data)
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (44, 56, 4), dtype=np.uint8), mode="RGBA").save(f"{image_dir}/rgba.png")
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).convert("P").save(f"{image_dir}/pal.png")
    data["images"] += [
        {"id": 11, "file_name": "rgba.png", "height": 44, "width": 56},
        {"id": 12, "file_name": "pal.png", "height": 48, "width": 48},
    ]
    square = [[8, 8, 30, 8, 30, 30, 8, 30]]
    data["annotations"] += [
        {"id": 100, "image_id": 11, "category_id": 3, "bbox": [8, 8, 22, 22], "segmentation": square},
        {"id": 101, "image_id": 12, "category_id": 7, "bbox": [8, 8, 22, 22], "segmentation": square},
    ]
    with open(path, "w") as f:
        json.dump(data, f)
    return path, image_dir


def coco_cfg(tmp_path, name, path, image_dir, **kw):
    base = dict(
        out_dir=str(tmp_path / name),
        batch_size=2,
        checkpoint_every=2,
        warmup_iters=2,
        log_every=1,
        lr=1e-3,
        workers=1,
        coco_train_json=path,
        coco_train_images=image_dir,
        val_fraction=0.3,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_mixed_images_crowds_and_empty_images_train(tmp_path):
    path, image_dir = mixed_coco(str(tmp_path / "data"))
    lines = []
    cfg = coco_cfg(tmp_path, "run", path, image_dir, iters=4, eval_every=2)
    summary = train(cfg, small_model_config(), progress=False, log=lines.append)
    losses = [r["loss"] for r in summary["history"]]
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    assert any("2 of the 5 images" in line and "held out for validation" in line for line in lines), lines
    assert any("classes from the dataset: cat, bird, dog" in line for line in lines), lines
    model = MaskRCNN.load(summary["checkpoint"])
    assert model.config.class_names == ("background", "cat", "bird", "dog")  # sorted by category id: 3, 7, 12
    assert os.path.exists(tmp_path / "run" / "best.npz") and summary["best"]["step"] in (2, 4)


def test_cli_trains_mixed_images_resized(tmp_path, capsys):
    path, image_dir = mixed_coco(str(tmp_path / "data"))
    argv = ["--coco", path, "--images", image_dir, "--out", tmp_path / "run", "--iters", 2, "--batch-size", 2]
    status, out, err = cli(capsys, "train", *argv, "--workers", 1, "--min-size", 40, "--max-size", 64)
    assert status == 0, err
    model = MaskRCNN.load(str(tmp_path / "run" / "checkpoint.npz"))
    assert (model.config.min_size, model.config.max_size) == (40, 64)
    assert "trained 2 steps" in out  # (a NaN or inf loss would have stopped it)
    steps = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert all(np.isfinite(r["loss"]) for r in steps)


def test_training_view_drops_crowds_and_maps_names():
    class Named:
        class_names = ("b", "a")

        def __len__(self):
            return 1

        def __getitem__(self, i):
            t = {
                "boxes": np.zeros((3, 4), np.float32),
                "labels": np.array([1, 2, 1]),
                "masks": np.zeros((3, 5, 5), np.uint8),
                "iscrowd": np.array([0, 1, 0]),
                "image_id": 7,
            }
            return np.zeros((3, 5, 5), np.float32), t

    _, t = TrainingView(Named(), ("background", "a", "b"))[0]
    np.testing.assert_array_equal(t["labels"], [2, 2])  # dataset "b" (1) is the model's label 2
    assert t["masks"].shape == (2, 5, 5) and t["image_id"] == 7 and t["iscrowd"].tolist() == [0, 0]


def test_heldout_split_is_fixed_and_disjoint():
    a, b = heldout_split(50, 0.1)
    assert len(b) == 5 and not set(a) & set(b) and sorted([*a, *b]) == list(range(50))
    np.testing.assert_array_equal(heldout_split(50, 0.1)[1], b)


def test_validation_file(tmp_path):
    ds = ShapesDataset(6, image_size=64, seed=1, split="val")
    path = export_to_coco(ds, str(tmp_path / "train"))
    val = export_to_coco(ShapesDataset(2, image_size=64, seed=2, split="val"), str(tmp_path / "val"))
    cfg = coco_cfg(tmp_path, "x", path, str(tmp_path / "train/images"), iters=1)
    cfg.coco_val_json, cfg.coco_val_images = val, str(tmp_path / "val/images")
    train_set, val_set = make_datasets(cfg)
    assert len(train_set) == 6 and len(val_set) == 2 and isinstance(val_set, CocoDataset)


def test_a_validation_file_with_other_names_is_refused(tmp_path):
    path = export_to_coco(ShapesDataset(4, image_size=64, seed=1, split="val"), str(tmp_path / "train"))
    val = export_to_coco(ShapesDataset(2, image_size=64, seed=2, split="val"), str(tmp_path / "val"))
    data = json.load(open(val))
    data["categories"][2]["name"] = "wedge"
    json.dump(data, open(val, "w"))
    cfg = coco_cfg(tmp_path, "x", path, str(tmp_path / "train/images"), iters=1)
    cfg.coco_val_json, cfg.coco_val_images = val, str(tmp_path / "val/images")
    with pytest.raises(ValueError, match=r"validation file .*val/annotations\.json names the categories .*'wedge'"):
        make_datasets(cfg)


def test_resume_of_a_coco_run_repeats_the_uninterrupted_run(tmp_path):
    ds = ShapesDataset(8, image_size=64, seed=1, split="val")
    path = export_to_coco(ds, str(tmp_path / "data"))
    image_dir = str(tmp_path / "data" / "images")
    full = train(coco_cfg(tmp_path, "full", path, image_dir, iters=4), small_model_config(), progress=False)
    train(coco_cfg(tmp_path, "split", path, image_dir, iters=2), small_model_config(), progress=False)
    resumed = train(coco_cfg(tmp_path, "split", path, image_dir, iters=4), resume=True, progress=False)
    np.testing.assert_allclose(
        [r["loss"] for r in resumed["history"]], [r["loss"] for r in full["history"][2:]], rtol=1e-6
    )
    m1, m2 = MaskRCNN.load(full["checkpoint"]), MaskRCNN.load(resumed["checkpoint"])
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        np.testing.assert_allclose(q.data, p.data, rtol=1e-5, atol=1e-7, err_msg=n)
    assert full["eval"] == resumed["eval"]


# ------------------------------------------------------------------ bad input, from the command line


def _break(data, image_dir, what):
    if what == "missing image":
        os.remove(os.path.join(image_dir, "grey.png"))
    elif what == "unknown category":
        data["annotations"][2]["category_id"] = 99
    elif what == "short polygon":
        data["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]
    elif what == "wrong size":
        data["images"][0]["height"] = 61
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 5]  # (an RLE would say it first)
    return data


@pytest.mark.parametrize(
    "what,pattern",
    [
        ("missing image", r"grey\.png: image file not found \(images\[1\], id=2, .*instances\.json"),
        ("unknown category", r"instances\.json: annotations\[2\] \(id=3\): unknown category id 99"),
        ("short polygon", r"instances\.json: annotations\[0\] \(id=1\): segmentation polygon 0 must be .* 3 \(x, y\)"),
        ("wrong size", r"a\.png: image is 60x80 but .*instances\.json images\[0\] \(id=5\) says 61x80"),
        ("invalid json", r"instances\.json: not valid JSON"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_entry_and_touches_nothing(tmp_path, capsys, what, pattern):
    folder = str(tmp_path / "data")
    path, image_dir = write_coco(folder)
    if what == "invalid json":
        with open(path, "w") as f:
            f.write('{"images": [')
    else:
        data = _break(coco_dict(), image_dir, what)
        with open(path, "w") as f:
            json.dump(data, f)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    status, _, err = cli(capsys, "train", "--coco", path, "--images", image_dir, "--out", out, "--iters", 1)
    assert status == 2, err
    assert err.startswith("tinymrcnn train: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["--coco", "A"], r"--coco needs --images DIR"),
        (["--images", "."], r"--images needs --coco ANN\.json"),
        (["--coco", "nowhere.json", "--images", "."], r"argument --coco: no such file: nowhere\.json"),
        (["--coco", "ANN", "--images", ".", "--num-train-images", "5"], r"--num-train-images is for the built-in"),
        (["--val-coco", "ANN", "--val-image-dir", "."], r"--val-coco is the validation set of a --coco"),
        (["--coco", "ANN", "--images", ".", "--val-fraction", "1.5"], r"argument --val-fraction: must be a fraction"),
        (["--init", "nowhere.npz"], r"argument --init: checkpoint not found: nowhere\.npz"),
        (["--init", "ANN", "--config", "shapes"], r"--config cannot be combined with --init"),
        (["--freeze-stages", "9"], r"argument --freeze-stages: must be in 0\.\.5"),
        (["--min-size", "64", "--max-size", "32"], r"argument --max-size: must be >= --min-size \(64\), got 32"),
    ],
)
def test_bad_dataset_flags(tmp_path, capsys, argv, pattern):
    path, _ = write_coco(str(tmp_path))
    argv = [path if a == "ANN" else a for a in argv]
    status, _, err = cli(capsys, "train", "--out", tmp_path / "run", "--iters", 1, *argv)
    assert status == 2 and re.search(pattern, err), err
    assert not (tmp_path / "run").exists()
