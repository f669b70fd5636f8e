"""The ``tinymrcnn`` command: demo, train, evaluate, predict.

    tinymrcnn demo                      train on shapes for a few minutes, evaluate, draw
    tinymrcnn train --config shapes --out runs/NAME [--minutes M | --iters N] [--resume | --overwrite] [--workers N] [--device cuda]
    tinymrcnn train --coco TRAIN.json --images DIR [--val-coco VAL.json --val-image-dir DIR] [--init CKPT] --out runs/NAME
    tinymrcnn evaluate --checkpoint CKPT [--num-images N | --coco ANN.json --images DIR] [--device cpu]
    tinymrcnn predict --checkpoint CKPT IMAGE... --out DIR [--device cpu]

--device picks where the convolutions and RoIAlign run (MaskRCNNConfig.device,
docs/gpu.md); evaluate and predict default to the checkpoint's setting.
--workers splits each batch between that many processes (default: one per CPU
core, at most one per image; tinymrcnn/parallel.py).

Mistakes cost one line: a bad argument, a missing or unreadable file, an
output folder that holds a run exits with status 2 and
``tinymrcnn <command>: error: ...``, before anything is written. Any other
failure exits with status 1 and one line; ``--debug`` (or TINYMRCNN_DEBUG=1)
shows the Python traceback instead. Ctrl-C during training saves a checkpoint
at the current step and exits with status 130 (SIGTERM: 143).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings

import numpy as np

from . import runtime


class UsageError(Exception):
    """A user's mistake: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (status 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


WORKERS_HELP = (
    "data-parallel training processes, each on a share of every batch "
    "(default 0: one per CPU core, at most one per image)"
)


# TrainConfig field -> the train command's flag (argument dest = field name unless listed)
TRAIN_FLAGS = {
    "iters": "--iters",
    "minutes": "--minutes",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "seed": "--seed",
    "workers": "--workers",
    "eval_every": "--eval-every",
    "checkpoint_every": "--checkpoint-every",
    "num_train_images": "--num-train-images",
    "num_val_images": "--num-val-images",
    "dataset": "--dataset",
    "coco_train_json": "--coco",
    "coco_train_images": "--images",
    "coco_val_json": "--val-coco",
    "coco_val_images": "--val-image-dir",
    "val_fraction": "--val-fraction",
    "init": "--init",
}
_DEST = {"num_train_images": "train_images", "num_val_images": "val_images"}
PRESETS = ("shapes", "torchvision_r50_fpn")


def _model_config(name: str, device: str | None = None):
    from .config import MaskRCNNConfig

    presets = {"shapes": MaskRCNNConfig.shapes, "torchvision_r50_fpn": MaskRCNNConfig.torchvision_r50_fpn}
    if name not in presets:
        raise UsageError(f"argument --config: unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]() if device is None else presets[name](device=device)


def _flag_error(e) -> UsageError:
    """A TrainConfig ConfigError, said with the command's flag."""
    flag = TRAIN_FLAGS.get(e.field)
    msg = str(e)
    if flag and msg.startswith(e.field + " "):
        msg = msg[len(e.field) + 1 :]
    return UsageError(f"argument {flag}: {msg}" if flag else msg)


def _check_workers(workers: int):
    from .parallel import available_cores

    cores = available_cores()
    if workers > cores:
        raise UsageError(
            f"argument --workers: {workers} workers on {cores} CPU core(s) would share the cores "
            f"and run slower; use at most {cores} (0: one per core)"
        )


def _read_checkpoint_meta(path: str, flag: str) -> dict:
    from .checkpoint import load_npz

    try:
        _, meta = load_npz(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{flag}: {e}") from None
    return meta


def _load_model(path: str, device: str | None):
    """MaskRCNN.load, with every problem of the file said as one line."""
    from .model.mask_rcnn import MaskRCNN

    if not os.path.exists(path):
        raise UsageError(f"argument --checkpoint: no such file: {path}")
    try:
        return MaskRCNN.load(path, device=device)
    except (ValueError, KeyError) as e:
        raise UsageError(f"argument --checkpoint: {e}") from None


def _train_config(args):
    """The run's TrainConfig: the flags given, the rest from the defaults (or, resuming, from the run)."""
    from dataclasses import fields

    from .train import ConfigError, TrainConfig

    given = {f: getattr(args, _DEST.get(f, f)) for f in TRAIN_FLAGS}
    given = {f: v for f, v in given.items() if v is not None}
    if args.resume:
        meta = _read_checkpoint_meta(os.path.join(args.out, "checkpoint.npz"), "--resume")
        state = meta.get("train")
        if not state or "config" not in state:
            raise UsageError(
                f"--resume: {os.path.join(args.out, 'checkpoint.npz')} holds no training state "
                "(a converted or final model?); start a new run with another --out"
            )
        names = {f.name for f in fields(TrainConfig)}
        base = {k: v for k, v in state["config"].items() if k in names}
        if "iters" in given or "minutes" in given:  # a new length replaces the old one
            base["iters"] = base["minutes"] = None
    else:
        base = {}
        if "iters" not in given and "minutes" not in given:
            base["minutes"] = 10.0
    base.update(given)
    base["out_dir"] = args.out
    cfg = TrainConfig(**base)
    try:
        cfg.validate()
    except ConfigError as e:
        raise _flag_error(e) from None
    _check_workers(cfg.workers)
    return cfg


def _print_ap_table(ev: dict, file=None):
    file = sys.stdout if file is None else file  # looked up now, not at import
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    print(f"{'':6s}" + "".join(f"{k:>8s}" for k in keys), file=file)
    for kind in ("mask", "box"):
        print(f"{kind:6s}" + "".join(f"{ev[f'{kind}_{k}']:8.3f}" for k in keys), file=file)


def _start_training(cfg, model_config, resume: bool, overwrite: bool):
    """train(), its refusals (run folder, lock, a finished run) said as one line."""
    from .classes import ClassMismatchError
    from .data.coco import CocoFormatError
    from .finetune import InitError
    from .train import ConfigError, RunExistsError, RunLockedError, check_out_dir, train

    try:
        check_out_dir(cfg.out_dir, resume, overwrite)
        return train(cfg, model_config, resume=resume, overwrite=overwrite)
    except ConfigError as e:
        raise _flag_error(e) from None
    except (RunExistsError, RunLockedError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        raise UsageError(str(e)) from None
    except (CocoFormatError, ClassMismatchError, InitError) as e:  # the data or --init checkpoint, before any write
        raise UsageError(str(e)) from None


def cmd_train(args):
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run, or start it again")
    if args.resume and args.config is not None:
        raise UsageError("--config cannot be combined with --resume: a resumed run keeps its checkpoint's model config")
    if args.resume and args.device is not None:
        raise UsageError("--device cannot be combined with --resume: a resumed run keeps its checkpoint's device")
    from .train import check_out_dir

    try:
        check_out_dir(args.out, args.resume, args.overwrite)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    _check_data_flags(args)
    cfg = _train_config(args)
    if args.resume:
        model_config = None
    elif args.init:  # the checkpoint's architecture (train() gives it the dataset's classes)
        from .finetune import read_checkpoint

        model_config = read_checkpoint(args.init)[1]
        if args.device is not None:
            model_config = model_config.replace(device=args.device)
    else:
        model_config = _model_config(args.config or "shapes", args.device)
    if args.freeze_stages is not None:
        model_config = model_config.replace(frozen_stages=args.freeze_stages)
    if args.min_size is not None or args.max_size is not None:
        model_config = model_config.replace(
            min_size=args.min_size if args.min_size is not None else model_config.min_size,
            max_size=args.max_size if args.max_size is not None else model_config.max_size,
        )
    summary = _start_training(cfg, model_config, args.resume, args.overwrite)
    print(f"trained {summary['step']} steps in {summary['elapsed_s'] / 60:.1f} min")
    _print_ap_table(summary["eval"])
    print(f"checkpoint: {summary['checkpoint']}\nmetrics:    {summary['metrics']}")
    best = summary.get("best")
    if best:
        print(f"best:       {best['checkpoint']} (step {best['step']}, held-out mask AP {best['mask_AP']:.3f})")
    return summary


def _check_data_flags(args):
    """The dataset flags of ``train`` go together as they should, and name files and folders that exist."""
    pairs = (
        ("--coco", "coco_train_json", "--images", "coco_train_images"),
        ("--val-coco", "coco_val_json", "--val-image-dir", "coco_val_images"),
    )
    for file_flag, file_dest, dir_flag, dir_dest in pairs:
        path, folder = getattr(args, file_dest), getattr(args, dir_dest)
        if path and not folder:
            raise UsageError(f"{file_flag} needs {dir_flag} DIR, the folder of the annotated images")
        if folder and not path:
            raise UsageError(f"{dir_flag} needs {file_flag} ANN.json, the annotation file of those images")
        if path and not os.path.isfile(path):
            raise UsageError(f"argument {file_flag}: no such file: {path}")
        if folder and not os.path.isdir(folder):
            raise UsageError(f"argument {dir_flag}: no such folder: {folder}")
    if args.coco_val_json and not args.coco_train_json and not args.resume:
        raise UsageError("--val-coco is the validation set of a --coco training set; give --coco too")
    if args.coco_train_json:
        for flag, dest in (
            ("--dataset", "dataset"),
            ("--num-train-images", "train_images"),
            ("--num-val-images", "val_images"),
        ):
            if getattr(args, dest) is not None:
                raise UsageError(
                    f"{flag} is for the built-in shapes sets; with --coco the annotation files say the images"
                )
    if args.val_fraction is not None and args.coco_val_json:
        raise UsageError("--val-fraction holds out training images when there is no --val-coco; give one or the other")
    if args.freeze_stages is not None:
        if args.resume:
            raise UsageError("--freeze-stages cannot be combined with --resume: a resumed run keeps its model config")
        if not 0 <= args.freeze_stages <= 5:
            raise UsageError(
                f"argument --freeze-stages: must be in 0..5 (0: train all; 1: the stem; k: the stem and "
                f"layer1..layer(k-1)), got {args.freeze_stages}"
            )
    for flag, value in (("--min-size", args.min_size), ("--max-size", args.max_size)):
        if value is not None and args.resume:
            raise UsageError(f"{flag} cannot be combined with --resume: a resumed run keeps its model config")
        if value is not None and value < 16:
            raise UsageError(f"argument {flag}: must be at least 16 pixels, got {value}")
    if args.min_size is not None and args.max_size is not None and args.max_size < args.min_size:
        raise UsageError(f"argument --max-size: must be >= --min-size ({args.min_size}), got {args.max_size}")
    if args.init is not None:
        if args.config is not None:
            raise UsageError("--config cannot be combined with --init: the model is the checkpoint's architecture")
        if args.resume:
            raise UsageError("--init starts a new run from a checkpoint's weights; --resume continues a run; give one")
        _read_checkpoint_meta(args.init, "argument --init")


def cmd_demo(args):
    from .data.shapes import ShapesDataset
    from .model.mask_rcnn import MaskRCNN
    from .train import TrainConfig
    from .viz.detections import plot_predictions_grid

    out = args.out
    from .train import ConfigError, check_out_dir

    cfg = TrainConfig(
        out_dir=out,
        minutes=None if args.iters else args.minutes,
        iters=args.iters,
        seed=args.seed,
        num_val_images=args.val_images,
        eval_every=args.eval_every,
        workers=args.workers,
    )
    try:
        cfg.validate()
    except ConfigError as e:
        raise _flag_error(e) from None
    _check_workers(cfg.workers)
    try:
        check_out_dir(out, False, args.overwrite)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    print(
        f"tinymrcnn demo: training the shapes preset from scratch for "
        f"{f'{args.iters} steps' if args.iters else f'{args.minutes:g} minutes'} "
        f"(batch {cfg.batch_size}, 128x128 images), then evaluating on {cfg.num_val_images} held-out images."
    )
    summary = _start_training(cfg, _model_config("shapes"), False, args.overwrite)
    print(
        f"\ntrained {summary['step']} steps in {summary['elapsed_s'] / 60:.1f} min; "
        f"held-out COCO AP ({cfg.num_val_images} images):"
    )
    _print_ap_table(summary["eval"])
    model = MaskRCNN.load(summary["checkpoint"])
    val = ShapesDataset.heldout(cfg.num_val_images)
    n = min(8, len(val))
    items = [val[i] for i in range(n)]
    with runtime.session(model.config):
        preds = model.predict([img for img, _ in items])
    grid = os.path.join(out, "predictions.png")
    plot_predictions_grid(
        [img for img, _ in items], preds, grid, class_names=model.config.class_names, targets=[t for _, t in items]
    )
    print("\nfiles:")
    for name in ("predictions.png", "loss_curve.png", "ap_curve.png", "checkpoint.npz", "metrics.jsonl"):
        p = os.path.join(out, name)
        if os.path.exists(p):
            print(f"  {p}")
    return summary


def _load_image(path):
    """A (3, H, W) float32 image in [0, 1]; ValueError if the file cannot be read as an image."""
    import matplotlib.image as mpimg

    try:
        img = mpimg.imread(path)
    except (OSError, ValueError, SyntaxError, RuntimeError) as e:  # Pillow/matplotlib raise many kinds
        raise ValueError(f"cannot read {path} as an image ({type(e).__name__}: {e})") from None
    if np.issubdtype(img.dtype, np.integer):
        img = img.astype(np.float32) / float(np.iinfo(img.dtype).max)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"{path}: not a 2-D image (shape {img.shape})")
    if img.shape[-1] < 3:  # grey, or grey + alpha
        img = np.repeat(img[..., :1], 3, axis=-1)
    img = img[..., :3]
    return np.ascontiguousarray(img.transpose(2, 0, 1).astype(np.float32))


def cmd_evaluate(args):
    from .train import evaluate_model

    if args.images and not args.coco:
        raise UsageError("--images needs --coco ANN.json (without --coco, evaluate uses the held-out shapes)")
    if args.coco and not args.images:
        raise UsageError("--coco needs --images DIR, the folder of the annotated images")
    if args.num_images < 1:
        raise UsageError(f"argument --num-images: must be >= 1, got {args.num_images}")
    if args.coco:
        if not os.path.isfile(args.coco):
            raise UsageError(f"argument --coco: no such file: {args.coco}")
        if not os.path.isdir(args.images):
            raise UsageError(f"argument --images: no such folder: {args.images}")
    model = _load_model(args.checkpoint, args.device)
    if args.coco:
        from .data.coco import CocoDataset

        try:
            ds = CocoDataset(args.coco, args.images)
        except (ValueError, OSError) as e:
            raise UsageError(f"argument --coco: {e}") from None
    else:
        from .data.shapes import ShapesDataset

        ds = ShapesDataset.heldout(args.num_images)
    from .classes import ClassMismatchError, label_map

    try:  # classes are matched by name; refused before any prediction
        label_map(model.config.class_names, ds.class_names, f"the dataset {args.coco}" if args.coco else "shapes")
    except ClassMismatchError as e:
        raise UsageError(f"argument --coco: {e}" if args.coco else f"{e} (give the model's data with --coco)") from None
    with warnings.catch_warnings(record=True) as caught, runtime.session(model.config):
        warnings.simplefilter("always")
        ev = evaluate_model(model, ds)
    _print_ap_table(ev)
    for note in dict.fromkeys(str(w.message) for w in caught if "no ground truth" in str(w.message)):
        print(f"tinymrcnn evaluate: note: {note}", file=sys.stderr)
    return ev


PREDICT_MAX_SIZE = 1333  # torchvision's cap on the long side


def _fit_for_prediction(img, config, max_size, path):
    """Shrink an image whose long side exceeds the limit, when the model does not resize itself.

    A preset with ``min_size`` (torchvision_r50_fpn) resizes every image to its
    limits; the shapes preset keeps the size it is given, so a 4000x4000 photo
    would cost gigabytes. The limit is ``--max-size``, else the config's
    ``max_size``, else 1333; detections are drawn on the shrunk image.
    """
    if config.min_size is not None and max_size is None:
        return img
    limit = max_size or config.max_size or PREDICT_MAX_SIZE
    h, w = img.shape[1:]
    if max(h, w) <= limit:
        return img
    from .ops.resize import interpolate_bilinear

    s = limit / max(h, w)
    size = (max(int(h * s), 1), max(int(w * s), 1))
    print(f"{path}: {w}x{h} shrunk to {size[1]}x{size[0]} (long side at most {limit}; --max-size)")
    return interpolate_bilinear(img, size)


def cmd_predict(args):
    from .viz.detections import save_prediction_image

    if not 0.0 <= args.score_thresh <= 1.0:
        raise UsageError(f"argument --score-thresh: must be in [0, 1] (a detection score), got {args.score_thresh}")
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"no such image file: {', '.join(missing)} (nothing was predicted)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"argument --out: {args.out} is a file, not a folder")
    if args.max_size is not None and args.max_size < 32:
        raise UsageError(f"argument --max-size: must be at least 32 pixels, got {args.max_size}")
    model = _load_model(args.checkpoint, args.device)
    runtime.check_device(model.config)  # before the folder is made
    os.makedirs(args.out, exist_ok=True)
    failed = []
    for path in args.images:
        try:
            img = _fit_for_prediction(_load_image(path), model.config, args.max_size, path)
            with runtime.session(model.config):
                pred = model.predict([img])[0]
        except ValueError as e:  # unreadable, or refused by the model's input checks
            print(f"tinymrcnn predict: error: {path}: {e}", file=sys.stderr)
            failed.append(path)
            continue
        dst = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0] + "_pred.png")
        save_prediction_image(img, pred, dst, class_names=model.config.class_names, score_thresh=args.score_thresh)
        print(f"{path}: {int((pred['scores'] >= args.score_thresh).sum())} detections -> {dst}")
    if failed:
        raise UsageError(
            f"{len(failed)} of {len(args.images)} image(s) could not be predicted (see above); the others were"
        )


def _add_device_flag(parser, default: str):
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="where the convolutions and RoIAlign run (MaskRCNNConfig.device; "
        f"default: {default}); cuda needs an NVIDIA GPU and tinymrcnn[cuda]",
    )


def build_parser():
    p = _Parser(prog="tinymrcnn", description="Mask R-CNN from scratch in NumPy + Numba")
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of an error (also TINYMRCNN_DEBUG=1); may be given anywhere on the line",
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train on shapes, evaluate, draw predictions")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    d.add_argument("--minutes", type=float, default=8.0, help="training time budget (default 8)")
    d.add_argument("--iters", type=int, default=None, help="train this many steps instead of a time budget")
    d.add_argument("--val-images", type=int, default=200)
    d.add_argument(
        "--eval-every", type=int, default=500, help="steps between evaluations, for the AP curve (0: only at the end)"
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=0, help=WORKERS_HELP)
    d.set_defaults(func=cmd_demo)

    # (None: not given; a new run then takes TrainConfig's default, a resumed one its own setting)
    t = sub.add_parser(
        "train",
        help="train a model",
        description="Train a model into --out, on the built-in shapes or on a COCO-format dataset "
        "(--coco TRAIN.json --images DIR; docs/own_data.md). A folder that already holds a run is refused "
        "unless --resume (continue it with its own settings; flags given override "
        "them) or --overwrite (start again). Ctrl-C saves a checkpoint at the "
        "current step.",
    )
    t.add_argument("--config", default=None, choices=PRESETS, help="model preset (default shapes)")
    t.add_argument("--out", required=True)
    t.add_argument("--minutes", type=float, default=None, help="training time budget (default 10)")
    t.add_argument("--iters", type=int, default=None, help="train this many steps instead")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    t.add_argument("--batch-size", type=int, default=None, help="images per step (default 4)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3)")
    t.add_argument("--seed", type=int, default=None, help="(default 0)")
    t.add_argument("--workers", type=int, default=None, help=WORKERS_HELP)
    t.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 0: at the end)")
    t.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 200)")
    t.add_argument(
        "--num-train-images",
        "--train-images",
        dest="train_images",
        metavar="N",
        type=int,
        default=None,
        help="how many shapes images to train on (default 4000)",
    )
    t.add_argument(
        "--num-val-images",
        "--val-images",
        dest="val_images",
        metavar="N",
        type=int,
        default=None,
        help="how many held-out shapes images to evaluate on (default 200)",
    )
    t.add_argument("--dataset", default=None, choices=["shapes", "shapes-hard"], help="(default shapes)")
    t.add_argument(
        "--coco",
        dest="coco_train_json",
        metavar="TRAIN.json",
        default=None,
        help="train on a COCO-format annotation file instead of the shapes (needs --images)",
    )
    t.add_argument(
        "--images",
        "--image-dir",
        dest="coco_train_images",
        metavar="DIR",
        default=None,
        help="the folder of the images of --coco",
    )
    t.add_argument(
        "--val-coco",
        dest="coco_val_json",
        metavar="VAL.json",
        default=None,
        help="validation annotation file for --coco (needs --val-image-dir); "
        "default: hold out --val-fraction of the training images",
    )
    t.add_argument(
        "--val-image-dir",
        dest="coco_val_images",
        metavar="DIR",
        default=None,
        help="the folder of the images of --val-coco",
    )
    t.add_argument(
        "--val-fraction",
        metavar="F",
        type=float,
        default=None,
        help="with --coco and no --val-coco: the fraction of the training images held out (default 0.1; a fixed split)",
    )
    t.add_argument(
        "--init",
        metavar="CKPT",
        default=None,
        help="start from this checkpoint's weights (fine-tuning): every tensor whose shape fits is kept, "
        "the class-specific layers are re-initialised for the dataset's classes",
    )
    t.add_argument(
        "--freeze-stages",
        metavar="K",
        type=int,
        default=None,
        help="backbone stages not trained (MaskRCNNConfig.frozen_stages; 0: train all; 1: the stem; "
        "k: the stem and layer1..layer(k-1); default: the preset's or the --init checkpoint's)",
    )
    t.add_argument(
        "--min-size",
        type=int,
        metavar="PX",
        default=None,
        help="resize every image so its short side is PX (MaskRCNNConfig.min_size; default: the preset's, "
        "none for shapes: images are used at their size)",
    )
    t.add_argument(
        "--max-size", type=int, metavar="PX", default=None, help="cap on the long side after resizing (max_size)"
    )
    _add_device_flag(t, "the preset's (cpu)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="COCO AP of a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--dataset", default="shapes", choices=["shapes"])
    e.add_argument("--num-images", type=int, default=200, help="held-out shapes images (the split is fixed)")
    e.add_argument("--coco", default=None, help="COCO annotation JSON (needs --images)")
    e.add_argument("--images", default=None, help="image folder for --coco")
    _add_device_flag(e, "the checkpoint's")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="draw predictions on images")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("images", nargs="+")
    r.add_argument("--out", required=True)
    r.add_argument("--score-thresh", type=float, default=0.5, help="draw detections scoring at least this (0..1)")
    r.add_argument(
        "--max-size",
        type=int,
        default=None,
        help="shrink images whose long side is larger (default: the config's max_size, else 1333, "
        "for presets that do not resize)",
    )
    _add_device_flag(r, "the checkpoint's")
    r.set_defaults(func=cmd_predict)

    from .torchvision_compat import add_convert_parser

    add_convert_parser(sub)
    from .course.cli import add_course_parser

    add_course_parser(sub)
    return p


def _describe(e: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for an error that reached main()."""
    from .train import NonFiniteLossError

    if isinstance(e, UsageError):
        return 2, str(e)
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return 2, str(e)  # a path given on the command line, almost always
    if isinstance(e, NonFiniteLossError):
        return 1, str(e)
    if isinstance(e, MemoryError):
        return 1, "out of memory (try a smaller --batch-size, or smaller images)"
    text = " ".join(str(e).split()) or "(no message)"
    return 1, f"{type(e).__name__}: {text} (run with --debug for the traceback)"


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop: unwinds like Ctrl-C, so temporary files are removed."""


def _on_sigterm(signum, frame):
    raise _Terminated


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TINYMRCNN_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    args, extra = build_parser().parse_known_args(argv)
    prog = f"tinymrcnn {args.command}"
    if extra:
        hint = (
            " (evaluation has no randomness: the held-out split is fixed)"
            if args.command == "evaluate" and "--seed" in extra
            else f" (see {prog} --help)"
        )
        print(f"{prog}: error: unrecognized arguments: {' '.join(extra)}{hint}", file=sys.stderr)
        return 2
    from .train import TrainingInterrupted

    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command == "convert-torchvision" and not os.path.isfile(args.input):
            raise UsageError(f"argument input: no such file: {args.input}")
        args.func(args)
    except TrainingInterrupted as e:
        print(
            f"{prog}: interrupted at step {e.step}; checkpoint saved to {e.checkpoint}; continue with --resume",
            file=sys.stderr,
        )
        return 128 + e.signum
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"{prog}: interrupted; the last checkpoint saved (if any) is kept", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
    except Exception as e:
        if debug:
            raise
        status, msg = _describe(e)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return status
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return 0


if __name__ == "__main__":
    sys.exit(main())
