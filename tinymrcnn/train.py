"""The training loop: seeded, resumable, with progress, evaluation and plots.

One step = load a batch -> ``model.forward_train`` -> ``model.backward`` ->
clip the gradient norm -> optimizer step with the scheduled learning rate.

Reproducibility: every random choice of step ``s`` (which images, the
flips, the anchor and proposal samplers) comes from generators seeded with
``(seed, s)``. A run stopped after N steps and resumed therefore sees exactly
what an uninterrupted run sees at step N + 1, and the checkpoint only has to
hold the weights, the optimizer state and the step number.

Data parallel: with ``workers`` > 1 (by default one per CPU core, at most
one per image) each step's batch is split between that many processes and
their gradients are averaged (``tinymrcnn/parallel.py``); each worker's
random choices are then seeded with ``(seed, s, worker)``.

Two ways to say how long: ``iters`` (a step count; the learning-rate schedule
counts steps, and resuming is exact) or ``minutes`` alone (a time budget; the
cosine decay runs on the training clock, so it ends when the budget does,
however the speed of a step changes along the way). Training time counts
loading the batches and the steps, not the periodic evaluations.

Files written to ``out_dir``:
    checkpoint.npz      latest checkpoint (atomic writes; a bad step never overwrites it)
    metrics.jsonl       one JSON object per logged step / evaluation
    loss_curve.png      the five losses and their sum against steps
    ap_curve.png        mask and box AP on the held-out split against minutes
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from . import runtime
from .config import MaskRCNNConfig
from .data.batches import batch_indices, load_batch, make_datasets, step_seeds
from .model.mask_rcnn import LOSS_NAMES, MaskRCNN
from .optim import SGD, AdamW, WarmupCosine, clip_grad_norm
from .parallel import WorkerPool, resolve_workers, shard


@dataclass
class TrainConfig:
    out_dir: str = "runs/shapes"
    iters: int | None = None          # number of steps; None: as many as fit in `minutes`
    minutes: float | None = None      # wall-clock budget for training (evaluation not counted)
    batch_size: int = 4
    optimizer: str = "adamw"          # "adamw" or "sgd"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_iters: int = 100
    min_lr_factor: float = 0.02       # cosine decays to lr * this
    grad_clip: float = 10.0
    workers: int = 0                  # data-parallel processes (tinymrcnn/parallel.py); 0: one per core
    hflip: bool = True
    num_train_images: int = 4000
    num_val_images: int = 200
    dataset: str = "shapes"           # "shapes" or "shapes-hard"
    eval_every: int = 0               # steps between evaluations (0: only at the end)
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0

    def to_dict(self):
        return dataclasses.asdict(self)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; training stopped and the last good checkpoint was kept."""


def make_optimizer(model, cfg: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw or sgd)")


def train_step(model, optimizer, images, targets, lr: float, grad_clip: float | None, pool=None):
    """One step; returns the losses and the gradient norm before clipping.

    With a :class:`tinymrcnn.parallel.WorkerPool` (whose workers were handed
    their shards by ``pool.start_step``), ``images`` is this process's shard;
    the gradients of all shards are averaged before the update, and the
    losses returned are the shards' means.
    """
    loss_dict = runtime.compute_gradients(model, images, targets)
    if pool is not None:
        shards = [loss_dict] + pool.finish_step()     # drains the workers even after a NaN here
        loss_dict = {k: float(np.mean([d[k] for d in shards])) for k in loss_dict}
    bad = [k for k, v in loss_dict.items() if not math.isfinite(v)]   # (losses are >= 0: a mean keeps a NaN/inf)
    if bad:
        raise NonFiniteLossError(", ".join(f"{k}={loss_dict[k]}" for k in bad))
    params = [p for p in model.parameters() if p.requires_grad]
    norm = clip_grad_norm(params, grad_clip) if grad_clip else float("nan")
    optimizer.lr = lr
    optimizer.step()
    return loss_dict, norm


def evaluate_model(model, dataset, batch_size: int = 8) -> dict:
    """Mask and box COCO AP of ``model`` on ``dataset``."""
    from .evaluate import coco_evaluate
    preds = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        preds.extend(model.predict([img for img, _ in items]))
    segm = coco_evaluate(preds, dataset, iou_type="segm")
    bbox = coco_evaluate(preds, dataset, iou_type="bbox")
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    return {**{f"mask_{k}": float(segm[k]) for k in keys}, **{f"box_{k}": float(bbox[k]) for k in keys}}


def _save(model, optimizer, path, step, cfg, elapsed, warmup_end_s):
    extra = {f"optim/{k}": v for k, v in optimizer.state_dict().items()}
    meta = {"train": {"step": step, "config": cfg.to_dict(), "elapsed_s": elapsed,
                      "warmup_end_s": warmup_end_s}}
    model.save(path, extra_arrays=extra, extra_meta=meta)


def schedule_progress(cfg: TrainConfig, step: int, elapsed: float, warmup_end_s: float | None):
    """How far the cosine decay has got (0..1), or None to let the schedule count steps.

    With a step count (``iters``) the schedule is a function of the step alone,
    so a resumed run repeats an uninterrupted one exactly. With a time budget
    (``minutes`` only) the decay runs on the clock: u = training time since the
    warm-up ended / what was left of the budget then. Steps get slower as the
    RPN finds more objects (more RoIs reach the mask head), so a step count
    fixed from the first steps' speed would stop before the decay ends.
    """
    if cfg.iters is not None or step < cfg.warmup_iters or warmup_end_s is None:
        return None
    budget = cfg.minutes * 60.0
    return (elapsed - warmup_end_s) / max(budget - warmup_end_s, 1e-9)


def train(cfg: TrainConfig, model_config: MaskRCNNConfig | None = None, resume: bool = False,
          progress: bool = True, log=print) -> dict:
    """Train (or resume) a model; returns a summary dict with the final metrics and paths."""
    from tqdm.auto import tqdm
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.npz")
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    start_step, elapsed, warmup_end_s = 0, 0.0, None
    if resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        model, extra, meta = MaskRCNN.load(ckpt_path, return_extra=True)
        state = meta.get("train")
        if not state:
            raise ValueError(f"{ckpt_path} holds no training state; cannot resume from it")
        start_step, elapsed = int(state["step"]), float(state["elapsed_s"])
        warmup_end_s = state.get("warmup_end_s")
        optimizer = make_optimizer(model, cfg)
        optimizer.load_state_dict({k[len("optim/"):]: v for k, v in extra.items() if k.startswith("optim/")})
    else:
        model = MaskRCNN(model_config or MaskRCNNConfig.shapes(), seed=cfg.seed)
        optimizer = make_optimizer(model, cfg)
        with open(metrics_path, "w"):
            pass
    train_set, val_set = make_datasets(cfg)
    if cfg.iters is None and cfg.minutes is None:
        raise ValueError("give iters or minutes")
    budget = cfg.minutes * 60.0 if cfg.minutes is not None else None
    # (a run shorter than its warm-up just warms up: the decay would start after its end)
    schedule = WarmupCosine(cfg.lr, cfg.warmup_iters,
                            None if cfg.iters is None else max(cfg.iters, cfg.warmup_iters + 1),
                            cfg.lr * cfg.min_lr_factor)

    # (on a GPU the default is one process: the workers would share the one device)
    n_workers = 1 if model.config.device == "cuda" and not cfg.workers else \
        resolve_workers(cfg.workers, cfg.batch_size)
    step = start_step
    history = []
    bar = tqdm(total=cfg.iters, initial=start_step, disable=not progress, dynamic_ncols=True,
               desc="train" if n_workers == 1 else f"train ({n_workers} workers)", unit="step")
    last_good = None
    with runtime.session(model.config), _data_parallel(model, n_workers, cfg) as pool:
        while True:
            if cfg.iters is not None and step >= cfg.iters:
                break
            if budget is not None and elapsed >= budget:
                break
            if warmup_end_s is None and step >= cfg.warmup_iters:
                warmup_end_s = elapsed
            t0 = time.perf_counter()                     # loading the batch counts as training time
            idx = shard(batch_indices(len(train_set), cfg.batch_size, step, cfg.seed), n_workers)
            if pool is not None:
                pool.start_step(step, idx)               # workers 1.. take shards 1..; we take shard 0
            images, targets = load_batch(train_set, idx[0], step, cfg.seed, cfg.hflip, 0, n_workers)
            model.rng = np.random.default_rng(step_seeds(cfg.seed, step, 0, n_workers)[1])
            lr = schedule.lr_at(step, schedule_progress(cfg, step, elapsed, warmup_end_s))
            try:
                losses, gnorm = train_step(model, optimizer, images, targets, lr, cfg.grad_clip, pool)
            except NonFiniteLossError as e:
                bar.close()
                kept = f"; the last good checkpoint ({last_good}) is kept" if last_good else ""
                raise NonFiniteLossError(f"non-finite loss at step {step + 1}: {e}{kept}") from None
            dt = time.perf_counter() - t0
            elapsed += dt
            step += 1
            if cfg.iters is None and budget is not None:  # time budget: the bar shows the steps still expected
                bar.total = step + int((budget - elapsed) * step / max(elapsed, 1e-9))
            record = {"step": step, "elapsed_s": round(elapsed, 3), "lr": lr,
                      "grad_norm": float(gnorm), **losses, "loss": float(sum(losses.values()))}
            history.append(record)
            if step % cfg.log_every == 0 or step == 1:
                _append_jsonl(metrics_path, record)
            bar.update(1)
            if progress and (step % 5 == 0 or step == 1):
                bar.set_postfix({**{k.replace("loss_", ""): f"{v:.3f}" for k, v in losses.items()},
                                 "s/step": f"{dt:.2f}"})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                _save(model, optimizer, ckpt_path, step, cfg, elapsed, warmup_end_s)
                last_good = ckpt_path
            if cfg.eval_every and step % cfg.eval_every == 0:
                ev = evaluate_model(model, val_set)
                _append_jsonl(metrics_path, {"step": step, "elapsed_s": round(elapsed, 3), "eval": ev})
                log(f"step {step}  mask AP {ev['mask_AP']:.3f}  AP50 {ev['mask_AP50']:.3f}  "
                    f"box AP {ev['box_AP']:.3f}")
    bar.close()
    _save(model, optimizer, ckpt_path, step, cfg, elapsed, warmup_end_s)
    final = evaluate_model(model, val_set)
    _append_jsonl(metrics_path, {"step": step, "elapsed_s": round(elapsed, 3), "eval": final})
    plot_training_curves(metrics_path, cfg.out_dir)
    return {"step": step, "elapsed_s": elapsed, "eval": final, "checkpoint": ckpt_path,
            "metrics": metrics_path, "history": history}


@contextmanager
def _data_parallel(model, n_workers: int, cfg: TrainConfig):
    """The worker pool of a data-parallel run (None for one worker).

    Each process then runs its Numba kernels on one thread: the cores are
    shared out between the workers, not inside each operation.
    """
    if n_workers == 1:
        yield None
        return
    import numba
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with WorkerPool(model, n_workers, cfg.to_dict()) as pool:
            yield pool
    finally:
        numba.set_num_threads(threads)


def _append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> tuple[list, list]:
    steps, evals = [], []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            (evals if "eval" in r else steps).append(r)
    return steps, evals


def plot_training_curves(metrics_path: str, out_dir: str) -> list[str]:
    """loss_curve.png (losses vs step) and, if evaluated, ap_curve.png (AP vs minutes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, evals = read_metrics(metrics_path)
    paths = []
    if steps:
        fig, ax = plt.subplots(figsize=(7, 4))
        s = [r["step"] for r in steps]
        for k in LOSS_NAMES + ("loss",):
            ax.plot(s, [r[k] for r in steps], label=k.replace("loss_", "") if k != "loss" else "total",
                    lw=2 if k == "loss" else 1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        ax.set_title("training losses")
        fig.tight_layout()
        p = os.path.join(out_dir, "loss_curve.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        t = [r["elapsed_s"] / 60 for r in evals]
        for k in ("mask_AP", "mask_AP50", "box_AP"):
            ax.plot(t, [r["eval"][k] for r in evals], marker="o", label=k)
        ax.set_xlabel("training minutes")
        ax.set_ylabel("AP on the held-out split")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        p = os.path.join(out_dir, "ap_curve.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
