"""Move weights between torchvision's ``maskrcnn_resnet50_fpn`` and tinymrcnn.

With the :meth:`MaskRCNNConfig.torchvision_r50_fpn` preset, tinymrcnn's
modules have the same shapes as torchvision's and almost the same names
(``backbone.body.layer1.0.conv1.weight`` is spelled the same in both). The
differences, all in wrappers torchvision puts around a conv:

    tinymrcnn                                   torchvision >= 0.13          older torchvision
    backbone.fpn.inner_blocks.{i}.weight        ...inner_blocks.{i}.0.weight ...inner_blocks.{i}.weight
    backbone.fpn.layer_blocks.{i}.weight        ...layer_blocks.{i}.0.weight ...layer_blocks.{i}.weight
    rpn.head.conv.weight                        rpn.head.conv.0.0.weight     rpn.head.conv.weight
    roi_heads.mask_head.mask_fcn{k}.weight      roi_heads.mask_head.{k-1}.0.weight
                                                                             roi_heads.mask_head.mask_fcn{k}.weight
    roi_heads.mask_head.conv5_mask.weight       roi_heads.mask_predictor.conv5_mask.weight (both)
    roi_heads.mask_head.mask_fcn_logits.weight  roi_heads.mask_predictor.mask_fcn_logits.weight (both)

(and the same for ``.bias``). Everything else keeps its name. A BatchNorm2d
checkpoint's ``num_batches_tracked`` counters are dropped: FrozenBatchNorm2d
has none. Arrays keep their layout: tinymrcnn's Conv2d, ConvTranspose2d and
Linear weights are stored as PyTorch stores them.

The eps of FrozenBatchNorm2d
----------------------------
torchvision's FrozenBatchNorm2d computes ``x * w / sqrt(rv + eps) + ...``
with ``eps = 1e-5``, *except* for the pretrained COCO weights:
``maskrcnn_resnet50_fpn(weights=...)`` sets ``eps = 0`` on every
FrozenBatchNorm2d after loading them (``overwrite_eps(model, 0.0)``, kept for
backward compatibility with checkpoints trained before a bug fix). The eps is
not in the state dict, so the conversion must be told: ``bn_eps=0.0`` (the
default, right for the pretrained COCO weights and models fine-tuned from
them) or ``bn_eps=1e-5`` (a model built with ``weights=None``). tinymrcnn's
FrozenBatchNorm2d always uses its own eps (1e-5), so a different ``bn_eps`` is
folded into the weight, which gives the same per-channel scale:

    w' = w * sqrt(rv + eps_tinymrcnn) / sqrt(rv + bn_eps)
    => w' / sqrt(rv + eps_tinymrcnn) == w / sqrt(rv + bn_eps)   (to float32 rounding)

The export (:func:`to_torchvision_state_dict`) folds the other way for the eps
of the torchvision model that will load the weights (default 1e-5, a model
built with ``weights=None``).

Torch is imported only inside :func:`convert_checkpoint` (reading a ``.pth``).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict

import numpy as np

# COCO category names in torchvision's label order (index = COCO category id;
# "N/A" marks the ids COCO skips). The 91 outputs of the pretrained model.
COCO_CATEGORIES = (
    "background",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "N/A",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "N/A",
    "backpack",
    "umbrella",
    "N/A",
    "N/A",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "N/A",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "N/A",
    "dining table",
    "N/A",
    "N/A",
    "toilet",
    "N/A",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "N/A",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)

TORCHVISION_BN_EPS = 1e-5  # torchvision's FrozenBatchNorm2d default
PRETRAINED_BN_EPS = 0.0  # what maskrcnn_resnet50_fpn(weights=COCO_V1) sets

# tinymrcnn name -> (current torchvision name, older spellings...). Each rule is
# (pattern on the tinymrcnn name, function of the match giving the names).
_RULES = (
    (
        re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$"),
        lambda m: (f"backbone.fpn.{m[1]}.{m[2]}.0.{m[3]}", m[0]),
    ),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), lambda m: (f"rpn.head.conv.0.0.{m[1]}", m[0])),
    (
        re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"),
        lambda m: (f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}", m[0]),
    ),
    (
        re.compile(r"^roi_heads\.mask_head\.(conv5_mask|mask_fcn_logits)\.(weight|bias)$"),
        lambda m: (f"roi_heads.mask_predictor.{m[1]}.{m[2]}",),
    ),
    # Same name in both: the ResNet body, the RPN's 1x1 convs, the box head and predictor.
    (
        re.compile(
            r"^backbone\.body\.(conv1|bn1|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01]))\."
            r"(weight|bias|running_mean|running_var|num_batches_tracked)$"
        ),
        lambda m: (m[0],),
    ),
    (re.compile(r"^rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)$"), lambda m: (m[0],)),
    (re.compile(r"^roi_heads\.box_head\.(fc6|fc7)\.(weight|bias)$"), lambda m: (m[0],)),
    (re.compile(r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$"), lambda m: (m[0],)),
)

# Entries torchvision may have that carry nothing tinymrcnn computes with.
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")


def torchvision_names(name: str) -> tuple[str, ...]:
    """The torchvision names of one tinymrcnn state-dict entry: current first, then older ones.

    >>> torchvision_names("rpn.head.conv.weight")
    ('rpn.head.conv.0.0.weight', 'rpn.head.conv.weight')
    """
    for pattern, names in _RULES:
        m = pattern.match(name)
        if m:
            return names(m)
    raise ValueError(
        f"tinymrcnn entry {name!r} has no torchvision counterpart: the export covers the "
        "torchvision_r50_fpn preset's modules (ResNet body with BatchNorm, FPN, RPN head, "
        "box head and predictor, mask head and predictor)"
    )


def _as_numpy(value, name):
    if hasattr(value, "detach"):  # a torch tensor passed by mistake: accept it
        value = value.detach().cpu().numpy()
    a = np.asarray(value)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"state dict entry {name!r} is not a numeric array (got {type(value).__name__})")
    return a


def _strip_prefix(state: dict) -> dict:
    """DataParallel / DistributedDataParallel checkpoints prefix every name with ``module.``."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _fold_bn_eps(state: dict, eps_from: float, eps_to: float) -> None:
    """Rescale every BN weight in ``state`` (in place): w' / sqrt(rv + eps_to) = w / sqrt(rv + eps_from).

    ``state`` maps names to arrays; a BN layer is recognised by its
    ``<prefix>.running_var`` entry next to ``<prefix>.weight``.
    """
    if float(eps_from) == float(eps_to):
        return
    for name in list(state):
        if not name.endswith(".running_var"):
            continue
        prefix = name[: -len("running_var")]
        if prefix + "weight" not in state:
            continue
        rv = state[name].astype(np.float64)
        w = state[prefix + "weight"]
        if np.any(rv + eps_from <= 0):
            bad = int(np.sum(rv + eps_from <= 0))
            raise ValueError(
                f"{prefix}running_var has {bad} channel(s) with running_var + eps <= 0 "
                f"(eps={eps_from}); the layer divides by zero there"
            )
        folded = w.astype(np.float64) * np.sqrt(rv + eps_to) / np.sqrt(rv + eps_from)
        state[prefix + "weight"] = folded.astype(w.dtype)


def _list(items, limit=25):
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _map_from_torchvision(state_dict: dict, expected: dict, what: str) -> "OrderedDict[str, np.ndarray]":
    """Rename torchvision entries to the tinymrcnn names in ``expected`` (name -> (shape, dtype)).

    Collects every missing, unexpected, duplicated and mis-shaped entry and
    raises one ValueError that lists them all.
    """
    state = _strip_prefix(state_dict)
    out = OrderedDict()
    used, missing, duplicated, mis_shaped = set(), [], [], []
    for name, (shape, dtype) in expected.items():
        candidates = [n for n in torchvision_names(name) if n in state]
        if not candidates:
            missing.append(torchvision_names(name)[0])
            continue
        if len(candidates) > 1:
            duplicated.append(" and ".join(candidates))
        src = candidates[0]
        used.update(candidates)
        value = _as_numpy(state[src], src)
        if tuple(value.shape) != tuple(shape):
            mis_shaped.append(f"{src}: got {tuple(value.shape)}, expected {tuple(shape)}")
            continue
        out[name] = np.ascontiguousarray(value.astype(dtype, copy=False))
    unexpected = [k for k in state if k not in used and not _IGNORED.search(k)]
    if missing or unexpected or duplicated or mis_shaped:
        lines = [f"the torchvision state dict does not fit {what}:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {_list(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {_list(unexpected)}")
        if duplicated:
            lines.append(f"  given twice, old and new spelling ({len(duplicated)}): {_list(duplicated)}")
        if mis_shaped:
            lines.append(f"  mis-shaped ({len(mis_shaped)}): {_list(mis_shaped, 10)}")
        if any(".box_head.0." in k or re.search(r"\.fpn\.(inner|layer)_blocks\.\d+\.1\.", k) for k in unexpected):
            lines.append(
                "  (these names look like maskrcnn_resnet50_fpn_v2 -- conv box head, GroupNorm FPN -- "
                "which tinymrcnn does not implement; use maskrcnn_resnet50_fpn's weights)"
            )
        raise ValueError("\n".join(lines))
    return out


def _num_classes_of(state: dict) -> int:
    state = _strip_prefix(state)
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state:
        raise ValueError(
            f"cannot tell the number of classes: the state dict has no {key!r} "
            "(is it a Mask R-CNN state dict?); pass config= explicitly"
        )
    return int(np.shape(state[key])[0])


def default_config(state_dict: dict, **overrides):
    """The torchvision_r50_fpn preset with the state dict's number of classes.

    91 classes (the pretrained COCO model) get COCO's category names.
    """
    from .config import MaskRCNNConfig

    k = _num_classes_of(state_dict)
    names = COCO_CATEGORIES if k == len(COCO_CATEGORIES) else ("background",) + tuple(f"class_{i}" for i in range(1, k))
    cfg = dict(num_classes=k, class_names=names)
    cfg.update(overrides)
    return MaskRCNNConfig.torchvision_r50_fpn(**cfg)


def _model_bn_eps(model) -> float:
    from .nn import FrozenBatchNorm2d

    eps = {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)}
    if len(eps) > 1:
        raise ValueError(f"the model's FrozenBatchNorm2d layers use different eps values {sorted(eps)}")
    return eps.pop() if eps else TORCHVISION_BN_EPS


def _expected_entries(model) -> "OrderedDict[str, tuple]":
    return OrderedDict((k, (v.shape, v.dtype)) for k, v in model.state_dict().items())


def from_torchvision_state_dict(
    state_dict: dict, config=None, bn_eps: float = PRETRAINED_BN_EPS
) -> "OrderedDict[str, np.ndarray]":
    """torchvision's ``maskrcnn_resnet50_fpn().state_dict()`` (name -> ndarray) -> tinymrcnn's state dict.

    Args:
        state_dict: torchvision names (current or pre-0.13 spelling, optionally
            prefixed ``module.``) -> arrays. ``num_batches_tracked`` entries are ignored.
        config: the tinymrcnn config the result is for (default: the
            torchvision_r50_fpn preset with the state dict's number of classes).
        bn_eps: the eps torchvision's FrozenBatchNorm2d used with these weights:
            0.0 for the pretrained COCO weights (the default), 1e-5 for a model
            built with ``weights=None``. See the module docstring.

    Returns an OrderedDict in tinymrcnn's names, float32 (or the config's dtype),
    ready for ``MaskRCNN(config).load_state_dict``.

    Raises ValueError listing every missing, unexpected, duplicated or mis-shaped entry.
    """
    return _convert_into(_build_model(state_dict, config), state_dict, bn_eps)


def _build_model(state_dict, config):
    from .model.mask_rcnn import MaskRCNN

    return MaskRCNN(config if config is not None else default_config(state_dict))


def _convert_into(model, state_dict, bn_eps):
    what = (
        f"tinymrcnn's MaskRCNN ({model.config.block} backbone, {model.config.norm} norm, "
        f"num_classes={model.config.num_classes})"
    )
    out = _map_from_torchvision(state_dict, _expected_entries(model), what)
    _fold_bn_eps(out, eps_from=bn_eps, eps_to=_model_bn_eps(model))
    return out


def model_from_torchvision(state_dict: dict, config=None, bn_eps: float = PRETRAINED_BN_EPS):
    """A tinymrcnn MaskRCNN holding torchvision's weights.

    Args as :func:`from_torchvision_state_dict`. The default config is the
    torchvision_r50_fpn preset with as many classes as the state dict's box
    predictor (COCO's names for 91).
    """
    model = _build_model(state_dict, config)
    model.load_state_dict(_convert_into(model, state_dict, bn_eps), strict=True)
    return model


def to_torchvision_state_dict(
    state, bn_eps: float = TORCHVISION_BN_EPS, legacy_names: bool = False, model_bn_eps: float | None = None
) -> "OrderedDict[str, np.ndarray]":
    """tinymrcnn's state dict (or a MaskRCNN) -> torchvision's names, for ``load_state_dict`` there.

    Args:
        state: ``model.state_dict()`` of a torchvision_r50_fpn-preset model, or the model.
        bn_eps: the eps of the torchvision FrozenBatchNorm2d layers that will use the
            weights: 1e-5 for a model built with ``weights=None`` (the default), 0.0 for one
            built with ``weights=COCO_V1``. Also right for a BatchNorm2d model in eval mode.
        legacy_names: use the pre-0.13 spellings (``inner_blocks.0.weight``,
            ``rpn.head.conv.weight``, ``mask_head.mask_fcn1.weight``).
        model_bn_eps: tinymrcnn's FrozenBatchNorm2d eps (default: the model's, or 1e-5 for a dict).

    Load in torch with ``model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.
    """
    from .nn import Module

    if isinstance(state, Module):
        if model_bn_eps is None:
            model_bn_eps = _model_bn_eps(state)
        state = state.state_dict()
    if model_bn_eps is None:
        model_bn_eps = TORCHVISION_BN_EPS
    norm_layers = [
        n[: -len("weight")] for n in state if re.match(r"^backbone\.body\.(.*\.)?(bn\d|downsample\.1)\.weight$", n)
    ]
    no_stats = [p for p in norm_layers if p + "running_var" not in state]
    if no_stats:
        raise ValueError(
            f"the backbone's norm layers have no running statistics ({no_stats[0]}*): "
            "torchvision's ResNet needs BatchNorm; the export covers models with norm='frozen_bn' "
            "or 'batch' (the torchvision_r50_fpn preset)"
        )
    out = OrderedDict()
    for name, value in state.items():
        names = torchvision_names(name)
        out[names[-1] if legacy_names else names[0]] = np.array(_as_numpy(value, name), copy=True)
    _fold_bn_eps(out, eps_from=model_bn_eps, eps_to=bn_eps)
    return out


# ---------------------------------------------------------------------------- files and the command line
def load_torchvision_file(path: str) -> dict:
    """Read a torchvision state dict: a ``.pth`` (needs torch) or an ``.npz`` of named arrays.

    A ``.pth`` may hold the state dict itself or a training checkpoint with the
    state dict under ``"model"`` (torchvision's reference scripts).
    """
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(
            f"reading {path} needs PyTorch (pip install torch). Without it, save the state dict "
            "as .npz where torch is installed: np.savez('weights.npz', "
            "**{k: v.numpy() for k, v in model.state_dict().items()})"
        ) from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.detach().cpu().numpy()
    return out


def convert_checkpoint(
    pth_path: str, npz_path: str, bn_eps: float = PRETRAINED_BN_EPS, config=None, **config_overrides
):
    """torchvision ``.pth`` (or ``.npz``) -> a tinymrcnn checkpoint ``.npz`` (``MaskRCNN.save``).

    ``config_overrides`` change the preset (e.g. ``min_size=512, max_size=853``
    for faster inference); ignored when ``config`` is given. Returns the model.
    """
    state = load_torchvision_file(pth_path)
    if config is None:
        config = default_config(state, **config_overrides)
    model = model_from_torchvision(state, config=config, bn_eps=bn_eps)
    model.save(npz_path)
    return model


def _cmd_convert(args) -> None:
    overrides = {}
    if args.min_size is not None:
        overrides["min_size"] = args.min_size
    if args.max_size is not None:
        overrides["max_size"] = args.max_size
    try:
        model = convert_checkpoint(args.input, args.output, bn_eps=args.bn_eps, **overrides)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"convert-torchvision: {e}") from None
    n = sum(v.size for v in model.state_dict().values())
    c = model.config
    print(
        f"{args.input} -> {args.output}: {n / 1e6:.1f}M values, {c.num_classes} classes, "
        f"resize {c.min_size}/{c.max_size}, FrozenBatchNorm eps of the source {args.bn_eps:g}"
    )
    print(f"next: tinymrcnn predict --checkpoint {args.output} IMAGE --out {os.path.join('out', '')}")


def add_convert_parser(subparsers):
    """Add ``tinymrcnn convert-torchvision IN.pth OUT.npz`` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "convert-torchvision",
        help="convert torchvision's maskrcnn_resnet50_fpn weights (.pth, or .npz of named arrays) to a "
        "tinymrcnn checkpoint",
        description="Reads torchvision's maskrcnn_resnet50_fpn state dict (a .pth needs PyTorch; an .npz of "
        "name -> array does not) and writes a tinymrcnn checkpoint for the torchvision_r50_fpn "
        "preset.",
    )
    p.add_argument("input", help="torchvision state dict: .pth (torch.save(model.state_dict())) or .npz")
    p.add_argument("output", help="tinymrcnn checkpoint to write (.npz)")
    p.add_argument(
        "--bn-eps",
        type=float,
        default=PRETRAINED_BN_EPS,
        help="eps of torchvision's FrozenBatchNorm2d for these weights: 0 for the pretrained COCO "
        "weights (default), 1e-5 for a model built with weights=None",
    )
    p.add_argument("--min-size", type=int, default=None, help="resize the short side to this (default 800)")
    p.add_argument("--max-size", type=int, default=None, help="cap on the long side (default 1333)")
    p.set_defaults(func=_cmd_convert)
    return p
