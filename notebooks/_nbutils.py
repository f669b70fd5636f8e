"""What the notebooks share: the mode switch and the trained toy model.

Notebooks 1, 3, 4, 7 and 8 look at one trained shapes model, and notebook 9
compares five settings of it. Training takes minutes, so each run is written
to ``notebooks/_run/<name>/`` (git ignores it) and a later notebook that asks
for the *same* run (same training settings, same model config, same number
of steps) loads the checkpoint instead of training again. Change a setting
and the run is trained afresh; delete ``notebooks/_run`` to start over.

Three modes, chosen with the environment variable TINYMRCNN_NOTEBOOK_MODE:

    default  the toy model trains once (800 steps of 4 images, a few minutes),
             then every notebook loads it; notebook 9 draws the recorded
             ablation results (notebooks/ablation_results.json) instead of
             training its 15 runs.
    full     as default, and notebook 9 trains its 15 runs (5 settings x 3
             seeds, about an hour on 2 cores) and writes its own results.
    test     tiny settings, what the test suite runs (TINYMRCNN_NOTEBOOK_SMALL=1
             means the same): a few small steps per training run. The models
             are as good as untrained, and every figure of one says
             "untrained (test mode)" in its title (:func:`titled`,
             :func:`label_figure`).

TINYMRCNN_NOTEBOOK_RUNS=DIR keeps the runs somewhere else (default notebooks/_run).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import matplotlib

from tinymrcnn import MaskRCNN, MaskRCNNConfig
from tinymrcnn.train import TrainConfig, read_metrics, train

MODES = ("default", "full", "test")


def _mode() -> str:
    mode = os.environ.get("TINYMRCNN_NOTEBOOK_MODE", "").strip().lower()
    if os.environ.get("TINYMRCNN_NOTEBOOK_SMALL") == "1" and mode in ("", "test"):
        return "test"
    if mode not in MODES + ("",):
        raise ValueError(f"TINYMRCNN_NOTEBOOK_MODE must be one of {', '.join(MODES)}, got {mode!r}")
    return mode or "default"


MODE = _mode()
SMALL = MODE == "test"
TEST_MODE_LABEL = "untrained (test mode)"
NOTEBOOK_DIR = Path(__file__).resolve().parent
RUN_DIR = Path(os.environ.get("TINYMRCNN_NOTEBOOK_RUNS") or NOTEBOOK_DIR / "_run")


def titled(title: str) -> str:
    """The title of a figure that shows what a trained model computes.

    In the test mode the toy model trains for 30 small steps: as good as
    untrained, so its detections, masks and scores mean little, and the title
    says so ("untrained (test mode)"). At full size the title is unchanged.
    """
    return f"{title} [{TEST_MODE_LABEL}]" if SMALL else title


def label_figure(fig) -> None:
    """In the test mode, add "untrained (test mode)" to the figure's title (its suptitle); else nothing."""
    if SMALL:
        current = fig.get_suptitle()
        fig.suptitle(f"{current} [{TEST_MODE_LABEL}]" if current else TEST_MODE_LABEL, color="firebrick")


def toy_train_config(**changes) -> TrainConfig:
    """The shared toy run: the shapes preset from scratch, AdamW, batch of images.

    Full size is 800 steps of 4 images (about the ``tinymrcnn demo`` budget);
    small is 30 steps of 2 images: enough for every loss to fall, not enough
    for good masks.
    """
    settings = (
        dict(iters=30, batch_size=2, warmup_iters=10, num_train_images=200, num_val_images=24)
        if SMALL
        else dict(iters=800, batch_size=4, warmup_iters=50, num_train_images=4000, num_val_images=200)
    )
    settings.update(log_every=1, checkpoint_every=0, seed=0)
    settings.update(changes)
    name = settings.pop("name", "toy")
    return TrainConfig(out_dir=str(RUN_DIR / (name + ("-small" if SMALL else ""))), **settings)


def _settings(train_config: dict) -> dict:
    """The training settings that make a run what it is (where it is saved does not)."""
    return {k: v for k, v in train_config.items() if k != "out_dir"}


def train_or_load(cfg: TrainConfig, model_config: MaskRCNNConfig | None = None, progress: bool = False):
    """Train ``cfg`` (see ``tinymrcnn.train.train``), or load it if that exact run is on disk.

    Returns (model, run) where run holds ``history`` (one dict of losses per
    step), ``eval`` (held-out mask and box AP at the end), ``checkpoint``
    (path) and ``trained_now`` (False when the checkpoint was reused).
    """
    model_config = model_config or MaskRCNNConfig.shapes()
    ckpt = Path(cfg.out_dir) / "checkpoint.npz"
    metrics = Path(cfg.out_dir) / "metrics.jsonl"
    trained_now = True
    if ckpt.exists() and metrics.exists():
        model, _, meta = MaskRCNN.load(str(ckpt), return_extra=True)
        state = meta.get("train", {})
        same = (
            json.loads(meta["config"]) == json.loads(model_config.to_json())
            and _settings(state.get("config", {})) == _settings(json.loads(json.dumps(cfg.to_dict())))
            and state.get("step") == cfg.iters
        )
        if same:
            trained_now = False
    if trained_now:
        with warnings.catch_warnings():  # tqdm.auto warns in a notebook without ipywidgets
            warnings.simplefilter("ignore")
            import tqdm.auto  # noqa: F401
        backend = matplotlib.get_backend()
        train(cfg, model_config, progress=progress, log=lambda *a: None)
        if matplotlib.get_backend() != backend:
            # train() draws its PNG curves after switching matplotlib to "Agg";
            # switch back so that the notebook's figures still show inline.
            import matplotlib.pyplot as plt

            plt.switch_backend(backend)
        model = MaskRCNN.load(str(ckpt))
    steps, evals = read_metrics(str(metrics))
    return model, {"history": steps, "eval": evals[-1]["eval"], "checkpoint": str(ckpt), "trained_now": trained_now}


def trained_toy_model():
    """The shared toy model and its run (trained on first use, then loaded)."""
    cfg = toy_train_config()
    model, run = train_or_load(cfg)
    how = "trained just now" if run["trained_now"] else "loaded from the earlier run"
    print(f"toy model: {cfg.iters} steps of {cfg.batch_size} images ({how}: {run['checkpoint']})")
    return model, cfg, run
