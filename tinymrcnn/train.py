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

Data: the built-in shapes sets, or a COCO-format annotation file and image
folder (``coco_train_json``/``coco_train_images``) with a validation file or a
fixed held-out fraction of its images (``tinymrcnn/data/batches.py``,
docs/own_data.md). A new run's classes are the dataset's categories; with
``init`` it starts from another checkpoint's weights (``tinymrcnn/finetune.py``).

Files written to ``out_dir``:
    checkpoint.npz      latest checkpoint (atomic writes; a bad step never overwrites it)
    best.npz            the model with the best held-out mask AP so far (for evaluate and predict)
    metrics.jsonl       one JSON object per logged step / evaluation
    loss_curve.png      the five losses and their sum against steps
    ap_curve.png        mask and box AP on the held-out split against minutes
    .lock               held while a trainer runs in the folder (a second one is refused)

A run is never lost by accident: a folder that already holds a run is
refused unless ``resume`` (continue it) or ``overwrite`` (start again) is
given, and nothing is written before the arguments have been checked. Ctrl-C
or SIGTERM finishes the current step, saves a checkpoint at it and raises
:class:`TrainingInterrupted`; resuming repeats the uninterrupted run. Lines of
``metrics.jsonl`` logged after the checkpoint a run resumes from (and a torn
last line, from a process killed while writing) are dropped on resume, so no
step appears twice. A loss, gradient or intermediate that becomes NaN or inf
stops training with :class:`NonFiniteLossError` naming the step and the
quantity; the last good checkpoint is kept.

The first step of a process compiles the Numba kernels (about half a minute
of CPU time in a fresh install, then cached on disk) or loads them from the
cache. That pass runs once before the clock starts, as a warm-up whose
gradient is thrown away, so ``minutes`` counts training only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np

from . import runtime
from .checkpoint import atomic_write, remove_stale_temp_files
from .classes import label_map
from .config import MaskRCNNConfig
from .data.batches import TrainingView, batch_indices, load_batch, make_datasets, step_seeds
from .model.mask_rcnn import LOSS_NAMES, MaskRCNN
from .optim import SGD, AdamW, WarmupCosine, clip_grad_norm
from .parallel import WorkerPool, resolve_workers, shard


@dataclass
class TrainConfig:
    out_dir: str = "runs/shapes"
    iters: int | None = None  # number of steps; None: as many as fit in `minutes`
    minutes: float | None = None  # wall-clock budget for training (evaluation not counted)
    batch_size: int = 4
    optimizer: str = "adamw"  # "adamw" or "sgd"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_iters: int = 100
    min_lr_factor: float = 0.02  # cosine decays to lr * this
    grad_clip: float = 10.0
    workers: int = 0  # data-parallel processes (tinymrcnn/parallel.py); 0: one per core
    hflip: bool = True
    num_train_images: int = 4000
    num_val_images: int = 200
    dataset: str = "shapes"  # "shapes" or "shapes-hard"; ignored with coco_train_json
    # A COCO-format training set (annotation file + image folder) instead of the shapes; its
    # validation set likewise, or (None) a fixed val_fraction of the training images held out.
    coco_train_json: str | None = None
    coco_train_images: str | None = None
    coco_val_json: str | None = None
    coco_val_images: str | None = None
    val_fraction: float = 0.1
    init: str | None = None  # start from this checkpoint's weights (fine-tuning; tinymrcnn.finetune)
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0

    def to_dict(self):
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field with an impossible value."""

        def bad(field, msg):
            raise ConfigError(field, f"{field} {msg}, got {getattr(self, field)!r}")

        if self.iters is None and self.minutes is None:
            raise ConfigError("iters", "give iters (steps) or minutes (a time budget)")
        if self.iters is not None and not (isinstance(self.iters, int) and self.iters >= 1):
            bad("iters", "must be a whole number of steps >= 1")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            bad("minutes", "must be a number of minutes > 0")
        for field in ("batch_size", "num_train_images", "num_val_images", "log_every"):
            if not getattr(self, field) >= 1:
                bad(field, "must be >= 1")
        for field in ("workers", "eval_every", "checkpoint_every", "warmup_iters"):
            if not getattr(self, field) >= 0:
                bad(field, "must be >= 0")
        for field in ("lr", "weight_decay", "momentum", "min_lr_factor"):
            v = getattr(self, field)
            if not (math.isfinite(v) and v >= 0) or (field == "lr" and v == 0):
                bad(field, "must be a finite number " + (">= 0" if field != "lr" else "> 0"))
        if self.grad_clip is not None and not self.grad_clip >= 0:
            bad("grad_clip", "must be >= 0 (0 or None: no clipping)")
        if self.optimizer not in ("adamw", "sgd"):
            bad("optimizer", "must be 'adamw' or 'sgd'")
        if self.dataset not in ("shapes", "shapes-hard"):
            bad("dataset", "must be 'shapes' or 'shapes-hard'")
        if self.num_train_images < self.batch_size and not self.coco_train_json:
            bad("num_train_images", f"must be at least the batch size ({self.batch_size})")
        if bool(self.coco_train_json) != bool(self.coco_train_images):
            raise ConfigError(
                "coco_train_json", "coco_train_json (annotation file) and coco_train_images (folder) go together"
            )
        if bool(self.coco_val_json) != bool(self.coco_val_images):
            raise ConfigError(
                "coco_val_json", "coco_val_json (annotation file) and coco_val_images (folder) go together"
            )
        if self.coco_val_json and not self.coco_train_json:
            raise ConfigError("coco_val_json", "coco_val_json is a validation set for coco_train_json; give that too")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            bad("val_fraction", "must be a fraction strictly between 0 and 1")


class ConfigError(ValueError):
    """A TrainConfig field with an impossible value; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class NonFiniteLossError(RuntimeError):
    """A loss, gradient or intermediate became NaN or inf; training stopped, the last good checkpoint was kept."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: a checkpoint was saved at ``step``; resume to continue."""

    def __init__(self, step: int, checkpoint: str, signum: int):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint}")


class RunExistsError(FileExistsError):
    """The output folder already holds a run and neither resume nor overwrite was asked for."""


class RunLockedError(RuntimeError):
    """Another trainer holds the output folder's lock."""


RUN_FILES = ("checkpoint.npz", "best.npz", "metrics.jsonl", "loss_curve.png", "ap_curve.png", "predictions.png")


def check_out_dir(out_dir: str, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an output folder that cannot be used as asked; reads, never writes."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or start it again")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir} is a file, not a folder; choose another --out")
    ckpt = os.path.join(out_dir, "checkpoint.npz")
    if resume:
        if not os.path.exists(ckpt):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}; start a new run without --resume")
    elif not overwrite:
        held = [f for f in ("checkpoint.npz", "metrics.jsonl") if os.path.exists(os.path.join(out_dir, f))]
        if held:
            raise RunExistsError(
                f"{out_dir} already holds a run ({', '.join(held)}); add --resume to continue "
                "it, --overwrite to start it again, or choose another --out"
            )
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {parent}; choose another --out")


@contextmanager
def run_lock(out_dir: str):
    """Hold ``out_dir/.lock`` for the duration; another holder raises RunLockedError.

    The operating system releases the lock when the process ends in any way
    (kill -9 included), so a stale lock file never blocks the next run.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = os.path.join(out_dir, ".lock")
    with open(path, "a+") as f:  # closing it releases the lock
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise RunLockedError(
                f"{out_dir} is in use by another training run (process {pid}); wait for it "
                "to end or choose another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


class _StopRequests:
    """While active, Ctrl-C / SIGTERM set ``signum`` instead of raising; a second one raises KeyboardInterrupt."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        os.write(
            2,
            b"\ninterrupt received: saving a checkpoint when the current step ends "
            b"(press Ctrl-C again to stop at once, without it)\n",
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self):
        """Back to the previous handlers: from now on Ctrl-C interrupts at once."""
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


_NON_FINITE = re.compile(r"(\w+) contains (\d+) non-finite value")


def _diverged(step, what, last_good, lr):
    kept = (
        f"the last good checkpoint ({last_good[1]}, step {last_good[0]}) is kept"
        if last_good
        else "no checkpoint was saved before it"
    )
    return NonFiniteLossError(
        f"training diverged at step {step}: {what}; {kept}. Try a lower learning rate (--lr, now {lr:g})"
    )


def make_optimizer(model, cfg: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw or sgd)")


class _Shards:
    """This process's shard (0) of each step's batch, and the next one loaded ahead.

    With data-parallel workers, ``train_step`` waits for their gradients after
    computing its own; the next step's shard is loaded in that wait instead of
    at the start of the next step (the workers do the same, ``parallel.py``).
    Which images a step takes, and their flips, depend only on the step, so
    loading ahead changes nothing in the run.
    """

    def __init__(self, train_set, cfg: TrainConfig, n_workers: int):
        self.train_set, self.cfg, self.n_workers = train_set, cfg, n_workers
        self.ahead = None  # (step, images, targets)

    def indices(self, step: int) -> list[np.ndarray]:
        """The image indices of step ``step``, one shard per worker."""
        return shard(batch_indices(len(self.train_set), self.cfg.batch_size, step, self.cfg.seed), self.n_workers)

    def load(self, step: int):
        cfg = self.cfg
        return load_batch(self.train_set, self.indices(step)[0], step, cfg.seed, cfg.hflip, 0, self.n_workers)

    def load_ahead(self, step: int) -> None:
        try:
            self.ahead = (step, *self.load(step))
        except Exception:  # loading ahead only saves time: an error shows when its step loads
            self.ahead = None

    def take(self, step: int):
        """(images, targets) of step ``step``: the ones loaded ahead, or loaded now."""
        ahead, self.ahead = self.ahead, None
        return ahead[1:] if ahead is not None and ahead[0] == step else self.load(step)


def train_step(model, optimizer, images, targets, lr: float, grad_clip: float | None, pool=None, while_waiting=None):
    """One step; returns the losses and the gradient norm before clipping.

    With a :class:`tinymrcnn.parallel.WorkerPool` (whose workers were handed
    their shards by ``pool.start_step``), ``images`` is this process's shard;
    the gradients of all shards are averaged before the update, and the
    losses returned are the shards' means. ``while_waiting`` (with a pool) is
    called between this shard's gradient and the workers': the training loop
    loads its next batch there.
    """
    loss_dict = runtime.compute_gradients(model, images, targets)
    if pool is not None:
        if while_waiting is not None:
            while_waiting()
        shards = [loss_dict] + pool.finish_step()  # drains the workers even after a NaN here
        loss_dict = {k: float(np.mean([d[k] for d in shards])) for k in loss_dict}
    bad = [k for k, v in loss_dict.items() if not math.isfinite(v)]  # (losses are >= 0: a mean keeps a NaN/inf)
    if bad:
        raise NonFiniteLossError(", ".join(f"{k}={loss_dict[k]}" for k in bad))
    params = [p for p in model.parameters() if p.requires_grad]
    norm = clip_grad_norm(params, grad_clip) if grad_clip else float("nan")
    optimizer.lr = lr
    optimizer.step()
    return loss_dict, norm


def evaluate_model(model, dataset, batch_size: int = 8) -> dict:
    """Mask and box COCO AP of ``model`` on ``dataset``.

    The model's classes are matched to the dataset's categories by name
    (:mod:`tinymrcnn.classes`; a category the model does not know raises
    :class:`~tinymrcnn.classes.ClassMismatchError` before any prediction);
    a dataset without ``class_names`` is taken to number them as the model.
    """
    from .classes import label_map, to_dataset_labels
    from .evaluate import coco_evaluate

    names = getattr(dataset, "class_names", None)
    mapping = None if names is None else label_map(model.config.class_names, names, _describe_dataset(dataset))
    preds = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        preds.extend(model.predict([img for img, _ in items]))
    if mapping is not None:
        preds = to_dataset_labels(preds, mapping)
    segm = coco_evaluate(preds, dataset, iou_type="segm")
    bbox = coco_evaluate(preds, dataset, iou_type="bbox")
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    return {**{f"mask_{k}": float(segm[k]) for k in keys}, **{f"box_{k}": float(bbox[k]) for k in keys}}


def _describe_dataset(dataset) -> str:
    path = getattr(dataset, "annotation_json", None)
    return f"the dataset {path}" if path else "the dataset"


def _save(model, optimizer, path, step, cfg, elapsed, warmup_end_s):
    extra = {f"optim/{k}": v for k, v in optimizer.state_dict().items()}
    meta = {"train": {"step": step, "config": cfg.to_dict(), "elapsed_s": elapsed, "warmup_end_s": warmup_end_s}}
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


def train(
    cfg: TrainConfig,
    model_config: MaskRCNNConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    log=print,
    overwrite: bool = False,
) -> dict:
    """Train (or resume) a model; returns a summary dict with the final metrics and paths.

    Everything is checked before anything is written: the config
    (:meth:`TrainConfig.validate`), the output folder (:func:`check_out_dir`:
    a folder holding a run needs ``resume`` or ``overwrite``), for
    ``resume`` the checkpoint, and the model's device. Raises :class:`TrainingInterrupted` after
    Ctrl-C/SIGTERM (a checkpoint at the current step is saved) and
    :class:`NonFiniteLossError` if training diverges.
    """
    cfg.validate()
    check_out_dir(cfg.out_dir, resume, overwrite)
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.npz")
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    start_step, elapsed, warmup_end_s = 0, 0.0, None
    if resume:
        model, extra, meta = MaskRCNN.load(ckpt_path, return_extra=True)
        state = meta.get("train")
        if not state:
            raise ValueError(f"{ckpt_path} holds no training state; cannot resume from it")
        start_step, elapsed = int(state["step"]), float(state["elapsed_s"])
        warmup_end_s = state.get("warmup_end_s")
        if cfg.iters is not None and cfg.iters <= start_step:
            raise ConfigError(
                "iters", f"the run is already at step {start_step}; give iters > {start_step} to train further"
            )
        if cfg.iters is None and elapsed >= cfg.minutes * 60.0:
            raise ConfigError(
                "minutes",
                f"the run has already trained {elapsed / 60:.2f} minutes; give minutes "
                f"> {elapsed / 60:.2f} to train further",
            )
        optimizer = make_optimizer(model, cfg)
        optimizer.load_state_dict({k[len("optim/") :]: v for k, v in extra.items() if k.startswith("optim/")})
        train_set, val_set = make_datasets(cfg, log=log)
    else:
        train_set, val_set = make_datasets(cfg, log=log)
        if cfg.init:  # the checkpoint's architecture, the dataset's classes
            from .finetune import init_from_checkpoint, read_checkpoint

            base = read_checkpoint(cfg.init)[1] if model_config is None else model_config
            model = MaskRCNN(_classes_of(base, train_set, log), seed=cfg.seed)
            init_from_checkpoint(model, cfg.init, log=log)
        else:
            model = MaskRCNN(_classes_of(model_config or MaskRCNNConfig.shapes(), train_set, log), seed=cfg.seed)
        optimizer = make_optimizer(model, cfg)
    train_set = TrainingView(train_set, model.config.class_names)  # refuses names the model does not know
    if getattr(val_set, "class_names", None) is not None:
        label_map(model.config.class_names, val_set.class_names, _describe_dataset(val_set))
    best_path = os.path.join(cfg.out_dir, "best.npz")
    best = _previous_best(best_path, start_step) if resume else None

    runtime.check_device(model.config)  # e.g. --device cuda without a GPU: before the folder is touched

    # -- from here on the folder is written to, under its lock
    os.makedirs(cfg.out_dir, exist_ok=True)
    with run_lock(cfg.out_dir), _StopRequests() as stops:
        check_out_dir(cfg.out_dir, resume, overwrite)  # again, under the lock: a run may have ended meanwhile
        for tmp in remove_stale_temp_files(cfg.out_dir):
            log(f"removed {tmp}, left by a process killed while saving")
        if resume:
            dropped = _trim_metrics(metrics_path, start_step)
            if dropped:
                log(
                    f"{metrics_path}: dropped {dropped} line(s) written after the checkpoint of step "
                    f"{start_step} (or torn by a kill)"
                )
        else:
            for name in RUN_FILES:  # overwrite: the old run goes only now
                if os.path.exists(os.path.join(cfg.out_dir, name)):
                    os.remove(os.path.join(cfg.out_dir, name))
            with open(metrics_path, "w"):
                pass
        run = _Run(cfg, model, optimizer, train_set, val_set, ckpt_path, metrics_path, best_path, progress, log, stops)
        return _train_loop(run, start_step, elapsed, warmup_end_s, resume, best)


@dataclass
class _Run:
    """What a training run works with, fixed from its first step to its last."""

    cfg: TrainConfig
    model: MaskRCNN
    optimizer: object
    train_set: object
    val_set: object
    ckpt_path: str
    metrics_path: str
    best_path: str
    progress: bool
    log: object
    stops: object


def _train_loop(run: _Run, start_step: int, elapsed: float, warmup_end_s, resumed: bool, best):
    """Steps from ``start_step`` until the budget is spent, then the final checkpoint and evaluation."""
    from tqdm.auto import tqdm

    cfg, model, optimizer, train_set, val_set = run.cfg, run.model, run.optimizer, run.train_set, run.val_set
    ckpt_path, metrics_path, best_path, progress, log, stops = (
        run.ckpt_path,
        run.metrics_path,
        run.best_path,
        run.progress,
        run.log,
        run.stops,
    )
    budget = cfg.minutes * 60.0 if cfg.minutes is not None else None
    # (a run shorter than its warm-up just warms up: the decay would start after its end)
    schedule = WarmupCosine(
        cfg.lr,
        cfg.warmup_iters,
        None if cfg.iters is None else max(cfg.iters, cfg.warmup_iters + 1),
        cfg.lr * cfg.min_lr_factor,
    )

    # (on a GPU the default is one process: the workers would share the one device)
    n_workers = 1 if model.config.device == "cuda" and not cfg.workers else resolve_workers(cfg.workers, cfg.batch_size)
    step = start_step
    history = []
    batches = _Shards(train_set, cfg, n_workers)
    last_good = (start_step, ckpt_path) if resumed else None
    runtime.keep_freed_memory()
    with runtime.session(model.config, processes=n_workers), _data_parallel(model, n_workers, cfg) as pool:
        _compile_warm_up(model, pool, batches, cfg, n_workers, step, log)
        bar = tqdm(
            total=cfg.iters,
            initial=start_step,
            disable=not progress,
            dynamic_ncols=True,
            desc="train" if n_workers == 1 else f"train ({n_workers} workers)",
            unit="step",
        )
        while True:
            if stops.signum is not None:
                bar.close()
                _save(model, optimizer, ckpt_path, step, cfg, elapsed, warmup_end_s)
                raise TrainingInterrupted(step, ckpt_path, stops.signum)
            if cfg.iters is not None and step >= cfg.iters:
                break
            if budget is not None and elapsed >= budget:
                break
            if warmup_end_s is None and step >= cfg.warmup_iters:
                warmup_end_s = elapsed
            t0 = time.perf_counter()  # loading the batch counts as training time
            if pool is not None:  # workers 1.. take shards 1..; we take shard 0
                pool.start_step(step, batches.indices(step), batches.indices(step + 1))
            images, targets = batches.take(step)
            model.rng = np.random.default_rng(step_seeds(cfg.seed, step, 0, n_workers)[1])
            lr = schedule.lr_at(step, schedule_progress(cfg, step, elapsed, warmup_end_s))
            try:
                losses, gnorm = train_step(
                    model, optimizer, images, targets, lr, cfg.grad_clip, pool, partial(batches.load_ahead, step + 1)
                )
            except NonFiniteLossError as e:
                bar.close()
                raise _diverged(step + 1, str(e), last_good, cfg.lr) from None
            except (ValueError, RuntimeError) as e:  # a kernel's input check, here or in a worker
                m = _NON_FINITE.search(str(e))
                if m is None:
                    raise
                bar.close()
                raise _diverged(
                    step + 1, f"{m.group(1)} has {m.group(2)} NaN or inf value(s)", last_good, cfg.lr
                ) from None
            if cfg.grad_clip and not math.isfinite(gnorm):
                bar.close()
                raise _diverged(step + 1, f"the gradient norm is {gnorm}", last_good, cfg.lr)
            dt = time.perf_counter() - t0
            elapsed += dt
            step += 1
            if cfg.iters is None and budget is not None:  # time budget: the bar shows the steps still expected
                bar.total = step + int((budget - elapsed) * step / max(elapsed, 1e-9))
            record = {
                "step": step,
                "elapsed_s": round(elapsed, 3),
                "lr": lr,
                "grad_norm": float(gnorm),
                **losses,
                "loss": float(sum(losses.values())),
            }
            history.append(record)
            if step % cfg.log_every == 0 or step == 1:
                _append_jsonl(metrics_path, record)
            bar.update(1)
            if progress and (step % 5 == 0 or step == 1):
                bar.set_postfix(
                    {**{k.replace("loss_", ""): f"{v:.3f}" for k, v in losses.items()}, "s/step": f"{dt:.2f}"}
                )
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                if not _weights_finite(model):  # (caught above when the gradient is clipped)
                    bar.close()
                    raise _diverged(step, "the weights became NaN or inf", last_good, cfg.lr)
                _save(model, optimizer, ckpt_path, step, cfg, elapsed, warmup_end_s)
                last_good = (step, ckpt_path)
            if cfg.eval_every and step % cfg.eval_every == 0:
                ev = evaluate_model(model, val_set)
                _append_jsonl(metrics_path, {"step": step, "elapsed_s": round(elapsed, 3), "eval": ev})
                best = _keep_best(model, ev, step, best, best_path)
                log(f"step {step}  mask AP {ev['mask_AP']:.3f}  AP50 {ev['mask_AP50']:.3f}  box AP {ev['box_AP']:.3f}")
        bar.close()
    if not _weights_finite(model):
        raise _diverged(step, "the weights became NaN or inf", last_good, cfg.lr)
    _save(model, optimizer, ckpt_path, step, cfg, elapsed, warmup_end_s)
    if stops.signum is not None:  # (arrived during the last step)
        raise TrainingInterrupted(step, ckpt_path, stops.signum)
    stops.release()  # the checkpoint is saved: Ctrl-C may stop the evaluation
    final = evaluate_model(model, val_set)
    _append_jsonl(metrics_path, {"step": step, "elapsed_s": round(elapsed, 3), "eval": final})
    best = _keep_best(model, final, step, best, best_path)
    plot_training_curves(metrics_path, cfg.out_dir)
    return {
        "step": step,
        "elapsed_s": elapsed,
        "eval": final,
        "checkpoint": ckpt_path,
        "best": best,
        "metrics": metrics_path,
        "history": history,
    }


def _classes_of(model_config: MaskRCNNConfig, dataset, log) -> MaskRCNNConfig:
    """A new run's model config, with the dataset's categories as its classes (unless they are already)."""
    names = getattr(dataset, "class_names", None)
    if names is None or sorted(model_config.class_names[1:]) == sorted(names):
        return model_config
    log(f"classes from the dataset: {', '.join(names)} (+ background: {len(names) + 1} classes)")
    return model_config.replace(num_classes=len(names) + 1, class_names=("background", *names))


def _keep_best(model, ev: dict, step: int, best: dict | None, path: str | None) -> dict | None:
    """Save the model to ``best.npz`` when its held-out mask AP beats the best so far; the best so far."""
    if path is None or (best is not None and not ev["mask_AP"] > best["mask_AP"]):
        return best
    best = {"step": step, "mask_AP": ev["mask_AP"], "box_AP": ev["box_AP"], "checkpoint": path}
    model.save(path, extra_meta={"best": best})
    return best


def _previous_best(path: str, start_step: int) -> dict | None:
    """The best model a resumed run had kept, if it was evaluated no later than the checkpoint resumed from."""
    from .checkpoint import load_npz

    if not os.path.exists(path):
        return None
    try:
        best = load_npz(path)[1].get("best")
    except ValueError:
        return None
    return best if best and best.get("step", start_step + 1) <= start_step else None


def _weights_finite(model) -> bool:
    return all(np.isfinite(p.data).all() for p in model.parameters())


COMPILE_NOTICE_S = 3.0


def _compile_warm_up(model, pool, batches: _Shards, cfg, n_workers, step, log):
    """One forward and backward pass on step ``step``'s batch (all workers), the gradient thrown away.

    The first pass of a process compiles the Numba kernels, or loads them from
    the cache; doing it here keeps that time off the training clock and off
    the progress bar. Parameters, buffers and every random choice of the run
    are left as they were (each step reseeds the samplers).
    """
    timer = threading.Timer(
        COMPILE_NOTICE_S,
        log,
        args=("compiling kernels, first run only (Numba caches them for later runs); this can take minutes ...",),
    )
    timer.daemon = True
    timer.start()
    t0 = time.perf_counter()
    buffers = {k: v.copy() for k, v in model.state_dict().items()}
    if pool is not None:
        pool.start_step(step, batches.indices(step))
    images, targets = batches.load(step)
    model.rng = np.random.default_rng(step_seeds(cfg.seed, step, 0, n_workers)[1])
    try:
        runtime.compute_gradients(model, images, targets)
    finally:
        if pool is not None:
            pool.finish_step()
        timer.cancel()
    model.zero_grad()
    model.load_state_dict(buffers)
    dt = time.perf_counter() - t0
    if dt >= COMPILE_NOTICE_S:
        log(f"kernels ready in {dt:.0f} s (not counted in the training time)")


def _trim_metrics(path: str, last_step: int) -> int:
    """Keep the lines of ``metrics.jsonl`` up to ``last_step`` (a resumed run's checkpoint); drop torn ones.

    Returns how many lines were dropped; the file is rewritten atomically only then.
    """
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
                ok = line.endswith("\n") and int(r["step"]) <= last_step
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        with atomic_write(path, "w") as f:
            f.writelines(kept)
    return dropped


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
        with _ignoring_stop_signals():
            # The workers start with Ctrl-C and SIGTERM ignored (an ignored signal stays ignored
            # across exec): a Ctrl-C in a terminal reaches the whole process group, and only
            # this process decides when to stop -- after the step, with a checkpoint.
            pool = WorkerPool(model, n_workers, cfg.to_dict())
        with pool:
            yield pool
    finally:
        numba.set_num_threads(threads)


@contextmanager
def _ignoring_stop_signals():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _append_jsonl(path, record):
    # one write of a whole line: a kill can tear only the last line, which readers skip
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> tuple[list, list]:
    """(step records, evaluation records) of a ``metrics.jsonl``; a torn (unreadable) line is skipped."""
    steps, evals = [], []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
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
            ax.plot(
                s,
                [r[k] for r in steps],
                label=k.replace("loss_", "") if k != "loss" else "total",
                lw=2 if k == "loss" else 1,
            )
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        ax.set_title("training losses")
        paths.append(_save_figure(fig, os.path.join(out_dir, "loss_curve.png")))
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
        paths.append(_save_figure(fig, os.path.join(out_dir, "ap_curve.png")))
    return paths


def _save_figure(fig, path: str) -> str:
    """Write a figure as PNG atomically (a reader never sees half a file) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path
