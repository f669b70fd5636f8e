"""Fine-tuning: start a model for new classes from another model's weights.

``init_from_checkpoint(model, path)`` copies a tinymrcnn checkpoint (a
trained run, ``best.npz``, or a file made by ``tinymrcnn convert-torchvision``)
into a freshly built model whose classes are the new dataset's, as in
torchvision's fine-tuning tutorial: the backbone, FPN, RPN and the box and
mask heads keep their weights; the class-specific layers, whose shapes
depend on the number of classes, keep the new model's fresh initialisation:

    roi_heads.box_predictor.cls_score      (K class logits)
    roi_heads.box_predictor.bbox_pred      (4K box deltas)
    roi_heads.mask_head.mask_fcn_logits    (K mask logits)

When the checkpoint's class names are the new model's, in the same order,
those layers are kept too. The model must have the checkpoint's architecture
(:func:`finetune_config` makes its config); any other tensor whose name or
shape differs is an error.
"""

from __future__ import annotations

import numpy as np

CLASS_SPECIFIC = (
    "roi_heads.box_predictor.cls_score.",
    "roi_heads.box_predictor.bbox_pred.",
    "roi_heads.mask_head.mask_fcn_logits.",
)


class InitError(ValueError):
    """A checkpoint that cannot initialise the model (not a checkpoint, or another architecture)."""


def read_checkpoint(path: str) -> tuple[dict, "object"]:
    """(state dict, MaskRCNNConfig) of a tinymrcnn checkpoint; InitError naming the file otherwise."""
    from .checkpoint import load_npz
    from .config import MaskRCNNConfig

    try:
        arrays, meta = load_npz(path)
    except (FileNotFoundError, ValueError) as e:
        raise InitError(f"--init: {e}") from None
    if meta.get("format") != "tinymrcnn-checkpoint-v1" or "config" not in meta:
        raise InitError(f"--init: {path} is not a tinymrcnn checkpoint (no config/format entry)")
    try:
        config = MaskRCNNConfig.from_json(meta["config"])
    except (ValueError, TypeError) as e:
        raise InitError(f"--init: {path}: unreadable model config ({e})") from None
    return {k[len("model/") :]: v for k, v in arrays.items() if k.startswith("model/")}, config


def finetune_config(path: str, class_names, **overrides):
    """The checkpoint's model config with the new classes (background first) and ``overrides``."""
    _, config = read_checkpoint(path)
    names = tuple(class_names)
    return config.replace(num_classes=len(names), class_names=names, **overrides)


def is_class_specific(name: str) -> bool:
    return name.startswith(CLASS_SPECIFIC)


def init_from_checkpoint(model, path: str, log=print) -> dict:
    """Copy ``path``'s weights into ``model``; returns {"kept": [names], "reinitialised": [names]}.

    Reports through ``log`` how many tensors were kept and which were re-initialised.
    """
    state, config = read_checkpoint(path)
    same_classes = tuple(config.class_names) == tuple(model.config.class_names)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:

        def listed(names):
            return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")

        parts = [f"the model's {listed(missing)} not in it" if missing else "",
                 f"its {listed(unexpected)} not in the model" if unexpected else ""]  # fmt: skip
        raise InitError(f"--init: {path} is a model of another architecture: {'; '.join(p for p in parts if p)}")
    kept, fresh, new = [], [], {}
    for name, value in target.items():
        if is_class_specific(name) and not same_classes:
            fresh.append(name)
            new[name] = value
            continue
        if state[name].shape != value.shape:
            raise InitError(
                f"--init: {path}: {name} has shape {state[name].shape}, the model's is {value.shape} "
                "(a model of another architecture)"
            )
        kept.append(name)
        new[name] = np.asarray(state[name], dtype=value.dtype)
    model.load_state_dict(new, strict=True)
    old = list(config.class_names[1:])
    log(
        f"initialised from {path}: kept {len(kept)} tensors ({_by_part(kept)}); "
        + (
            f"re-initialised {len(fresh)} for the {model.config.num_classes - 1} new classes "
            f"(the checkpoint had {len(old)}): {', '.join(fresh)}"
            if fresh
            else "the classes are the checkpoint's, so its class-specific layers are kept too"
        )
    )
    return {"kept": kept, "reinitialised": fresh}


def _by_part(names) -> str:
    """``backbone.body 265, backbone.fpn 16, rpn 6, ...``: how many tensors of each part of the model."""
    counts = {}
    for name in names:
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("backbone", "roi_heads") else parts[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} {n}" for k, n in counts.items())
