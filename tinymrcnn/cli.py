"""The ``tinymrcnn`` command: demo, train, evaluate, predict.

    tinymrcnn demo                      train on shapes for a few minutes, evaluate, draw
    tinymrcnn train --config shapes --out runs/NAME [--minutes M | --iters N] [--resume] [--workers N] [--device cuda]
    tinymrcnn evaluate --checkpoint CKPT [--dataset shapes | --coco ANN.json --images DIR] [--device cpu]
    tinymrcnn predict --checkpoint CKPT IMAGE... --out DIR [--device cpu]

--device picks where the convolutions and RoIAlign run (MaskRCNNConfig.device,
docs/gpu.md); evaluate and predict default to the checkpoint's setting.
--workers splits each batch between that many processes (default: one per CPU
core, at most one per image; tinymrcnn/parallel.py).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


WORKERS_HELP = ("data-parallel training processes, each on a share of every batch "
                "(default 0: one per CPU core, at most one per image)")


def _train_config(args):
    from .train import TrainConfig
    return TrainConfig(out_dir=args.out, iters=args.iters, minutes=args.minutes, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, eval_every=args.eval_every,
                       num_train_images=args.train_images, num_val_images=args.val_images,
                       dataset=args.dataset, checkpoint_every=args.checkpoint_every,
                       workers=args.workers)


def _model_config(name: str, device: str | None = None):
    from .config import MaskRCNNConfig
    presets = {"shapes": MaskRCNNConfig.shapes, "torchvision_r50_fpn": MaskRCNNConfig.torchvision_r50_fpn}
    if name not in presets:
        raise SystemExit(f"unknown config {name!r}; choose one of {', '.join(presets)}")
    return presets[name]() if device is None else presets[name](device=device)


def _print_ap_table(ev: dict, file=None):
    file = sys.stdout if file is None else file          # looked up now, not at import
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    print(f"{'':6s}" + "".join(f"{k:>8s}" for k in keys), file=file)
    for kind in ("mask", "box"):
        print(f"{kind:6s}" + "".join(f"{ev[f'{kind}_{k}']:8.3f}" for k in keys), file=file)


def cmd_train(args):
    from .train import NonFiniteLossError, train
    cfg = _train_config(args)
    if cfg.iters is None and cfg.minutes is None:
        cfg.minutes = 10.0
    if args.resume and args.device is not None:
        raise SystemExit("--device cannot be combined with --resume: a resumed run keeps its "
                         "checkpoint's device")
    try:
        summary = train(cfg, _model_config(args.config, args.device), resume=args.resume)
    except NonFiniteLossError as e:
        raise SystemExit(f"training stopped: {e}")
    print(f"trained {summary['step']} steps in {summary['elapsed_s'] / 60:.1f} min")
    _print_ap_table(summary["eval"])
    print(f"checkpoint: {summary['checkpoint']}\nmetrics:    {summary['metrics']}")
    return summary


def cmd_demo(args):
    from .data.shapes import ShapesDataset
    from .model.mask_rcnn import MaskRCNN
    from .train import TrainConfig, train
    from .viz.detections import plot_predictions_grid
    out = args.out
    cfg = TrainConfig(out_dir=out, minutes=args.minutes, iters=args.iters, seed=args.seed,
                      num_val_images=args.val_images, eval_every=args.eval_every, workers=args.workers)
    print(f"tinymrcnn demo: training the shapes preset from scratch for "
          f"{f'{args.iters} steps' if args.iters else f'{args.minutes:g} minutes'} "
          f"(batch {cfg.batch_size}, 128x128 images), then evaluating on {cfg.num_val_images} held-out images.")
    summary = train(cfg, _model_config("shapes"))
    print(f"\ntrained {summary['step']} steps in {summary['elapsed_s'] / 60:.1f} min; "
          f"held-out COCO AP ({cfg.num_val_images} images):")
    _print_ap_table(summary["eval"])
    model = MaskRCNN.load(summary["checkpoint"])
    val = ShapesDataset.heldout(cfg.num_val_images)
    n = min(8, len(val))
    items = [val[i] for i in range(n)]
    preds = model.predict([img for img, _ in items])
    grid = os.path.join(out, "predictions.png")
    plot_predictions_grid([img for img, _ in items], preds, grid, class_names=model.config.class_names,
                          targets=[t for _, t in items])
    print("\nfiles:")
    for name in ("predictions.png", "loss_curve.png", "ap_curve.png", "checkpoint.npz", "metrics.jsonl"):
        p = os.path.join(out, name)
        if os.path.exists(p):
            print(f"  {p}")
    return summary


def _load_image(path):
    import matplotlib.image as mpimg
    img = mpimg.imread(path)
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    return np.ascontiguousarray(img.transpose(2, 0, 1).astype(np.float32))


def cmd_evaluate(args):
    from .model.mask_rcnn import MaskRCNN
    from .train import evaluate_model
    model = MaskRCNN.load(args.checkpoint, device=args.device)
    if args.coco:
        from .data.coco import CocoDataset
        if not args.images:
            raise SystemExit("--coco needs --images DIR")
        ds = CocoDataset(args.coco, args.images)
    else:
        from .data.shapes import ShapesDataset
        ds = ShapesDataset.heldout(args.num_images)
    ev = evaluate_model(model, ds)
    _print_ap_table(ev)
    return ev


def cmd_predict(args):
    from .model.mask_rcnn import MaskRCNN
    from .viz.detections import save_prediction_image
    model = MaskRCNN.load(args.checkpoint, device=args.device)
    os.makedirs(args.out, exist_ok=True)
    for path in args.images:
        img = _load_image(path)
        pred = model.predict([img])[0]
        dst = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0] + "_pred.png")
        save_prediction_image(img, pred, dst, class_names=model.config.class_names,
                              score_thresh=args.score_thresh)
        print(f"{path}: {int((pred['scores'] >= args.score_thresh).sum())} detections -> {dst}")


def _add_device_flag(parser, default: str):
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where the convolutions and RoIAlign run (MaskRCNNConfig.device; "
                             f"default: {default}); cuda needs an NVIDIA GPU and tinymrcnn[cuda]")


def build_parser():
    p = argparse.ArgumentParser(prog="tinymrcnn", description="Mask R-CNN from scratch in NumPy + Numba")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train on shapes, evaluate, draw predictions")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--minutes", type=float, default=8.0, help="training time budget (default 8)")
    d.add_argument("--iters", type=int, default=None, help="train this many steps instead of a time budget")
    d.add_argument("--val-images", type=int, default=200)
    d.add_argument("--eval-every", type=int, default=500,
                   help="steps between evaluations, for the AP curve (0: only at the end)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=0, help=WORKERS_HELP)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a model")
    t.add_argument("--config", default="shapes")
    t.add_argument("--out", required=True)
    t.add_argument("--minutes", type=float, default=None)
    t.add_argument("--iters", type=int, default=None)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=0, help=WORKERS_HELP)
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=200)
    t.add_argument("--train-images", type=int, default=4000)
    t.add_argument("--val-images", type=int, default=200)
    t.add_argument("--dataset", default="shapes", choices=["shapes", "shapes-hard"])
    _add_device_flag(t, "the preset's (cpu)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="COCO AP of a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--dataset", default="shapes", choices=["shapes"])
    e.add_argument("--num-images", type=int, default=200)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--coco", default=None, help="COCO annotation JSON")
    e.add_argument("--images", default=None, help="image folder for --coco")
    _add_device_flag(e, "the checkpoint's")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="draw predictions on images")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("images", nargs="+")
    r.add_argument("--out", required=True)
    r.add_argument("--score-thresh", type=float, default=0.5)
    _add_device_flag(r, "the checkpoint's")
    r.set_defaults(func=cmd_predict)

    from .torchvision_compat import add_convert_parser
    add_convert_parser(sub)
    from .course.cli import add_course_parser
    add_course_parser(sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
