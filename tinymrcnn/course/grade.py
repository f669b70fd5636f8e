"""The autograder: run each exercise's checks against a student's copy and score it.

``grade(student_dir)`` builds every check's inputs and expected results in
*this* process, from the installed package (the solution), then runs the
student's functions in a separate interpreter (``runner.py`` with
``PYTHONPATH=student_dir``, one interpreter per exercise, so a crash or an
endless loop costs one exercise), and compares. A failed check says which
check, which output, which element, expected against got, and what the
difference looks like (a constant factor, the answer of a neighbouring
convention, a wrong shape), with a hint for the usual mistake. Nothing of
the solution's source is ever printed; expected *values* are.

The checks, per exercise (see the ``_checks_*`` functions):

* comparisons with the solution on small random inputs (float64, relative
  tolerance 1e-7), including the edge cases of docs/semantics.md;
* float64 finite-difference gradient checks (max relative error 1e-6):
  against the forward for a backward exercise, against the student's own
  loss for the mask loss;
* the known numbers: RoIAlign's known answers (detectron2's test, docs/semantics.md#roialign)
  and the 145 x 200 px RoI at stride 32 of docs/walkthrough.md;
* float32 in, float32 out.

This module is the instructor's: ``make-student`` leaves it (and the runner)
out of the student's copy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .exercises import EXERCISES, Exercise, select
from .make import find_regions
from .runner import DecodeError, read_value, write_value

RTOL, ATOL = 1e-7, 1e-9  # float64 comparisons with the solution
GRAD_RTOL = 1e-6  # finite-difference checks (COMMON standard)


class Fail(Exception):
    """Raised inside a judge: the check failed with this message."""


# ---------------------------------------------------------------------------
# Checks and their results
# ---------------------------------------------------------------------------
@dataclass
class Call:
    """One call of a student's function, executed by the runner."""

    target: str  # "module:qualname"
    args: tuple
    kwargs: dict
    init: tuple | None = None  # (args, kwargs) of the class, for a method
    numgrad: dict | None = None  # see runner.py


@dataclass
class Check:
    name: str
    calls: list[int]  # indices into the exercise's calls
    judge: Callable[[list], str | None]  # the calls' return values -> None or a failure message
    # Added to the failure message: (text, when) says it only when when(values) is true (a hint
    # is about one mistake; said for any failure it misleads).
    hint: str | tuple = ""


@dataclass
class CheckResult:
    name: str
    passed: bool
    message: str = ""
    error: tuple | None = None  # (type, message, where) when the student's code raised
    parts: tuple = ()  # the functions the check calls ("BoxCoder.decode")
    blocked_by: str | None = None  # a failing function these call: fix that first


@dataclass
class ExerciseResult:
    exercise: Exercise
    checks: list[CheckResult] = field(default_factory=list)
    note: str = ""  # e.g. a required exercise that fails

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.checks)

    @property
    def score(self) -> float:
        return 100.0 * self.passed / len(self.checks) if self.checks else 0.0


@dataclass
class Report:
    student_dir: str
    exercises: list[ExerciseResult]

    @property
    def total(self) -> float:
        """Mean of the exercise scores (each exercise counts equally), in percent."""
        return float(np.mean([e.score for e in self.exercises])) if self.exercises else 0.0

    def to_dict(self) -> dict:
        return {
            "student_dir": self.student_dir,
            "total": self.total,
            "exercises": [
                {
                    "name": e.exercise.name,
                    "passed": e.passed,
                    "checks": len(e.checks),
                    "score": e.score,
                    "note": e.note,
                    "results": [
                        {"check": c.name, "passed": c.passed, "message": c.message, "blocked_by": c.blocked_by}
                        for c in e.checks
                    ],
                }
                for e in self.exercises
            ],
        }


class _Builder:
    def __init__(self):
        self.calls: list[Call] = []
        self.checks: list[Check] = []

    def call(self, target, *args, init=None, numgrad=None, **kwargs) -> int:
        self.calls.append(Call(target, tuple(args), dict(kwargs), init, numgrad))
        return len(self.calls) - 1

    def check(self, name, calls, judge, hint=""):
        calls = [calls] if isinstance(calls, int) else list(calls)
        self.checks.append(Check(name, calls, judge, hint))


# ---------------------------------------------------------------------------
# Comparing a student's result with the expected one
# ---------------------------------------------------------------------------
def _g(v) -> str:
    return f"{v:.6g}" if isinstance(v, (float, np.floating)) else str(v)


def _index(idx) -> str:
    return "(" + ", ".join(str(int(i)) for i in idx) + ")" if len(idx) != 1 else f"({int(idx[0])},)"


def _describe(v) -> str:
    if isinstance(v, np.ndarray):
        return f"an array of shape {v.shape} ({v.dtype})"
    if isinstance(v, dict) and "__unplain__" in v:
        return f"a {v['__unplain__']} ({v['repr']})"
    if isinstance(v, (tuple, list)):
        return f"a {type(v).__name__} of {len(v)}"
    return f"{type(v).__name__} {v!r}"[:120]


def _as_array(v, what) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    if isinstance(v, (float, int, np.floating)) and not isinstance(v, bool):
        return np.asarray(v)
    raise Fail(f"{what}: expected an array, got {_describe(v)}")


def _item(v, i, n, names):
    if not isinstance(v, (tuple, list)) or len(v) != n:
        raise Fail(f"expected a tuple of {n} ({names}), got {_describe(v)}")
    return v[i]


def _constant_factor(e: np.ndarray, g: np.ndarray) -> float | None:
    """c if got == c * expected everywhere (c != 1), else None."""
    scale = np.max(np.abs(e)) if e.size else 0.0
    if scale == 0:
        return None
    big = np.abs(e) > 1e-6 * scale
    if not big.any() or np.any(np.abs(g[~big]) > 1e-6 * scale * 100):
        return None
    r = g[big] / e[big]
    c = float(np.median(r))
    if not np.isfinite(c) or c == 0 or abs(c - 1) < 1e-6:
        return None
    return c if np.all(np.abs(r - c) <= 1e-6 * abs(c)) else None


def diff_arrays(
    expected, got, what: str, rtol=RTOL, atol=ATOL, factor_hints=(), variants=(), shape_hints=(), check_dtype=True
) -> str | None:
    """None if ``got`` matches ``expected``, else a message that locates and explains the difference.

    factor_hints: [(c, text)]: said when got == c * expected.
    variants: [(label, array, text)]: said when got equals this other answer
        (a neighbouring convention, a classic mistake).
    shape_hints: [(shape, text)]: said when got has this shape.
    """
    e = np.asarray(expected)
    g = _as_array(got, what)
    if g.shape != e.shape:
        msg = f"{what} has shape {g.shape}, expected {e.shape}"
        for s, text in shape_hints:
            if tuple(s) == g.shape:
                msg += f" -- {text}"
        return msg
    if check_dtype and e.dtype.kind == "f" and g.dtype != e.dtype:
        return f"{what} has dtype {g.dtype}, expected {e.dtype} (the dtype of the inputs)"
    if g.dtype.kind not in "fiub":
        return f"{what} has dtype {g.dtype}, expected numbers"
    e64, g64 = e.astype(np.float64), g.astype(np.float64)
    both_nan = np.isnan(e64) & np.isnan(g64)
    ok = np.isclose(g64, e64, rtol=rtol, atol=atol) | both_nan
    if ok.all():
        return None
    with np.errstate(invalid="ignore"):
        excess = np.abs(g64 - e64) - (atol + rtol * np.abs(e64))
    excess = np.where(np.isnan(excess), np.inf, excess)
    excess[ok] = -np.inf
    idx = np.unravel_index(int(np.argmax(excess)), e.shape) if e.ndim else ()
    ev, gv = e64[idx], g64[idx]
    where = f" at element {_index(idx)}" if e.ndim else ""
    if e.ndim:
        msg = (
            f"{what}: {int((~ok).sum())} of {e.size} elements differ; the largest difference is"
            f"{where}: expected {_g(ev)}, got {_g(gv)}"
        )
    else:
        msg = f"{what}: expected {_g(ev)}, got {_g(gv)}"
    if not np.isfinite(gv) and np.isfinite(ev):
        msg += " -- got a non-finite value where the answer is finite"
    elif e.ndim and not np.any(g64) and np.any(e64):
        msg += " -- your result is all zeros"
    elif ev == 0 and e.ndim:
        msg += " -- this element should be exactly 0"
    else:
        c = _constant_factor(e64, g64)
        if c is not None:
            msg += f" -- wrong by a constant factor ~{c:.4g}"
            for f, text in factor_hints:
                if abs(c / f - 1) < 1e-3:
                    msg += f": {text}"
                    break
    for label, arr, text in variants:
        arr = np.asarray(arr, dtype=np.float64)
        if arr.shape == g64.shape and np.allclose(
            g64, arr, rtol=max(10 * rtol, 1e-6), atol=max(10 * atol, 1e-9), equal_nan=True
        ):
            msg += f" -- your result equals {label}: {text}"
            break
    return msg


def diff_gradcheck(numeric, got, what, forward) -> str | None:
    """A finite-difference check: max |a - n| / max(|a|, |n|, floor) <= 1e-6.

    floor = 1e-3 of the largest numeric entry, so that entries near zero are
    compared against the gradient's scale, not their own rounding noise.
    """
    n = np.asarray(numeric, dtype=np.float64)
    g = _as_array(got, what)
    if g.shape != n.shape:
        return f"{what} has shape {g.shape}, expected {n.shape}"
    a = g.astype(np.float64)
    floor = max(1e-3 * float(np.max(np.abs(n))) if n.size else 0.0, 1e-12)
    with np.errstate(invalid="ignore"):
        err = np.abs(a - n) / np.maximum(np.maximum(np.abs(a), np.abs(n)), floor)
    err = np.where(np.isnan(err), np.inf, err)
    worst = float(err.max()) if err.size else 0.0
    if worst <= GRAD_RTOL:
        return None
    idx = np.unravel_index(int(np.argmax(err)), n.shape)
    msg = (
        f"{what} disagrees with finite differences of {forward}: relative error {worst:.2g} "
        f"(allowed {GRAD_RTOL:g}) at element {_index(idx)}: finite differences give {_g(n[idx])}, "
        f"your gradient {_g(a[idx])}"
    )
    c = _constant_factor(n, a)
    if c is not None:
        msg += f" -- wrong by a constant factor ~{c:.4g}"
    return msg


def _judge_all(*parts):
    """A judge from several (call position, comparison) pairs: the first failure wins."""

    def judge(values):
        for pos, comp in parts:
            msg = comp(values[pos])
            if msg:
                return msg
        return None

    return judge


def _numgrad_parent(f, x, h=1e-6):
    from ..gradcheck import numerical_gradient

    return numerical_gradient(f, x, h=h)


# ---------------------------------------------------------------------------
# Exercise 1: conv2d backward
# ---------------------------------------------------------------------------
def _checks_conv2d_backward(b: _Builder, rng: np.random.Generator):
    from ..ops.conv import conv2d_backward_reference as solution
    from ..ops.conv import conv2d_reference as forward

    T = "tinymrcnn.ops.conv:conv2d_backward_reference"
    names = "dx, dweight, dbias"

    def case(x_shape, w_shape, stride, padding, dtype=np.float64):
        x = rng.standard_normal(x_shape).astype(dtype)
        w = rng.standard_normal(w_shape).astype(dtype)
        dy = rng.standard_normal(forward(x, w, None, stride, padding).shape).astype(dtype)
        return (dy, x, w, stride, padding), solution(dy, x, w, stride, padding)

    args, exp = case((2, 3, 5, 6), (4, 3, 3, 3), 1, 0)
    c = b.call(T, *args)

    def shapes(v):
        for i, (name, e) in enumerate(zip(("dx", "dweight", "dbias"), exp)):
            got = _as_array(_item(v[0], i, 3, names), name)
            if got.shape != e.shape:
                return f"{name} has shape {got.shape}, expected {e.shape} (the shape of {('x', 'weight', 'bias')[i]})"
        return None

    b.check("returns (dx, dweight, dbias) shaped like (x, weight, bias)", c, shapes)
    for i, name in enumerate(("dx", "dweight", "dbias")):
        b.check(
            f"{name}, stride 1, no padding",
            c,
            lambda v, i=i, name=name: diff_arrays(exp[i], _item(v[0], i, 3, names), name),
        )

    args2, exp2 = case((1, 2, 7, 6), (3, 2, 2, 3), (2, 1), (1, 2))
    c2 = b.call(T, *args2)
    padded = (1, 2, 7 + 2, 6 + 4)

    def stride1_right(v):  # the hint is about stride and padding: only when stride 1 works
        d2, d1 = _as_array(_item(v[0], 0, 3, names), "dx"), _item(v[1], 0, 3, names)
        return d2.shape == exp2[0].shape and diff_arrays(exp[0], d1, "dx") is None

    b.check(
        "dx, stride (2, 1), padding (1, 2), 2x3 kernel",
        [c2, c],
        lambda v: diff_arrays(
            exp2[0],
            _item(v[0], 0, 3, names),
            "dx",
            shape_hints=[(padded, "that is the padded input's shape: crop the padding off dx")],
        ),
        hint=(
            "your stride-1 dx is right, so look at stride and padding: output pixel a reads "
            "input rows a*s + i - p for the taps i",
            stride1_right,
        ),
    )
    b.check(
        "dweight, stride (2, 1), padding (1, 2), 2x3 kernel",
        c2,
        lambda v: diff_arrays(exp2[1], _item(v[0], 1, 3, names), "dweight"),
    )

    dy, x, w, s, p = args2
    num_x = _numgrad_parent(lambda: float(np.sum(dy * forward(x, w, None, s, p))), x)
    num_w = _numgrad_parent(lambda: float(np.sum(dy * forward(x, w, None, s, p))), w)
    b.check(
        "finite differences of conv2d (float64, relative error <= 1e-6)",
        c2,
        _judge_all(
            (0, lambda v: diff_gradcheck(num_x, _item(v, 0, 3, names), "dx", "conv2d")),
            (0, lambda v: diff_gradcheck(num_w, _item(v, 1, 3, names), "dweight", "conv2d")),
        ),
    )

    args3, exp3 = case((1, 2, 4, 5), (2, 2, 3, 3), 1, 1, np.float32)
    c3 = b.call(T, *args3)
    b.check(
        "float32 in, float32 out (stride 1, padding 1)",
        c3,
        lambda v: next(
            (
                m
                for m in (
                    diff_arrays(exp3[i], _item(v[0], i, 3, names), n, rtol=1e-4, atol=1e-5)
                    for i, n in enumerate(("dx", "dweight", "dbias"))
                )
                if m
            ),
            None,
        ),
    )


# ---------------------------------------------------------------------------
# Exercise 2: the box coder
# ---------------------------------------------------------------------------
def _random_boxes(rng, n, lo=0.0, hi=60.0, smin=4.0, smax=40.0):
    xy = rng.uniform(lo, hi, (n, 2))
    wh = rng.uniform(smin, smax, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def _checks_box_coder(b: _Builder, rng: np.random.Generator):
    from ..ops.boxes import BoxCoder

    E, D = "tinymrcnn.ops.boxes:BoxCoder.encode", "tinymrcnn.ops.boxes:BoxCoder.decode"
    g, p = _random_boxes(rng, 8), _random_boxes(rng, 8)
    one = np.array([0.0, 0.0, 1.0, 1.0])
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        coder = BoxCoder(weights)
        exp = coder.encode(g, p)
        variants = [
            (
                "the deltas of Detectron's legacy '+1' box sizes",
                coder.encode(g + one, p + one),
                "a box is x2 - x1 wide, with no +1 (docs/semantics.md#box-coding)",
            ),
            (
                "encode(proposals, reference_boxes), the arguments swapped",
                coder.encode(p, g),
                "the deltas measure the reference box relative to the proposal: divide by the proposal's size",
            ),
        ]
        if weights != (1.0, 1.0, 1.0, 1.0):
            variants.append(
                (
                    "the deltas with weights (1, 1, 1, 1)",
                    BoxCoder().encode(g, p),
                    "multiply by self.weights = (wx, wy, ww, wh)",
                )
            )
        c = b.call(E, g, p, init=((weights,), {}))
        b.check(
            f"encode, weights {tuple(int(w) for w in weights)}",
            c,
            lambda v, exp=exp, variants=variants: diff_arrays(exp, v[0], "deltas", variants=variants),
        )

    deltas = rng.normal(0, 0.5, (8, 4))
    exp = BoxCoder().decode(deltas, p)
    c = b.call(D, deltas, p, init=(((1.0, 1.0, 1.0, 1.0),), {}))
    b.check("decode, one box per row, weights (1, 1, 1, 1)", c, lambda v: diff_arrays(exp, v[0], "boxes"))

    w10 = (10.0, 10.0, 5.0, 5.0)
    deltas3 = rng.normal(0, 1.0, (8, 12))
    exp3 = BoxCoder(w10).decode(deltas3, p)
    c = b.call(D, deltas3, p, init=((w10,), {}))
    b.check(
        "decode, 3 boxes per row (one per class), weights (10, 10, 5, 5)",
        c,
        lambda v: diff_arrays(
            exp3,
            v[0],
            "boxes",
            shape_hints=[((8, 4), "deltas (N, 4k) decode to (N, 4k): one box per group of 4")],
            variants=[
                (
                    "the boxes with weights (1, 1, 1, 1)",
                    BoxCoder().decode(deltas3, p),
                    "divide the deltas by self.weights first",
                )
            ],
        ),
    )

    big = rng.normal(0, 0.3, (6, 4))
    big[::2, 2] = 6.0  # dw above log(1000/16) = 4.135
    big[1::2, 3] = 9.0
    expc = BoxCoder().decode(big, p[:6])
    c = b.call(D, big, p[:6], init=(((1.0, 1.0, 1.0, 1.0),), {}))
    b.check(
        "decode clamps dw and dh at bbox_xform_clip",
        c,
        lambda v: diff_arrays(
            expc,
            v[0],
            "boxes",
            variants=[
                (
                    "the unclamped boxes",
                    BoxCoder(bbox_xform_clip=math.inf).decode(big, p[:6]),
                    "clamp dw and dh from above at self.bbox_xform_clip = log(1000/16) before exp()",
                )
            ],
        ),
    )

    d = BoxCoder(w10).encode(g, p)
    c = b.call(D, d, p, init=((w10,), {}))
    b.check(
        "decode(encode(g, p), p) gives g back (weights (10, 10, 5, 5))",
        c,
        lambda v: diff_arrays(g, v[0], "decoded boxes", rtol=1e-9, atol=1e-9),
    )

    g32, p32 = g.astype(np.float32), p.astype(np.float32)
    e32 = BoxCoder(w10).encode(g32, p32)
    d32 = BoxCoder(w10).decode(e32, p32)
    ce, cd = b.call(E, g32, p32, init=((w10,), {})), b.call(D, e32, p32, init=((w10,), {}))
    b.check(
        "float32 boxes give float32 deltas and boxes",
        [ce, cd],
        _judge_all(
            (0, lambda v: diff_arrays(e32, v, "encode's deltas", rtol=1e-5, atol=1e-5)),
            (1, lambda v: diff_arrays(d32, v, "decode's boxes", rtol=1e-5, atol=1e-4)),
        ),
    )


# ---------------------------------------------------------------------------
# Exercise 3: the proposal layer
# ---------------------------------------------------------------------------
STAGE_HINTS = {
    "topk": "keep the pre_nms_top_n highest logits of each level separately (a level with fewer "
    "anchors keeps all of them)",
    "decoded": "decoding keeps every top-k candidate",
    "clipped": "clipping keeps every top-k candidate",
    "remove_small": "remove a box when its width or its height, after clipping, is < min_size",
    "score_thresh": "keep a box when sigmoid(logit) >= score_thresh: a probability, not the logit",
    "nms": "NMS at nms_thresh, separately on each level: batched_nms(boxes, scores, levels, nms_thresh)",
    "final": "keep the post_nms_top_n best boxes over all levels",
}


def _one_box_kept(v) -> bool:
    """The per-level NMS case kept one box of the two (NMS over all levels at once)."""
    return len(v[0][0][0]) == 1


def _checks_proposals(b: _Builder, rng: np.random.Generator):
    from ..model.anchors import AnchorGenerator
    from ..model.proposals import PROPOSAL_STAGES
    from ..model.proposals import generate_proposals as solution

    T = "tinymrcnn.model.proposals:generate_proposals"
    gen = AnchorGenerator(sizes=((16,), (32,)), aspect_ratios=((0.5, 1.0, 2.0),) * 2)
    anchors = gen.anchors_per_level((48, 48), [(6, 6), (3, 3)], dtype=np.float64)
    obj = [rng.normal(0, 2, (2, a.shape[0])) for a in anchors]
    dlt = [rng.normal(0, 0.3, (2, a.shape[0], 4)) for a in anchors]
    sizes = [(48, 48), (40, 44)]

    def case(label, objectness, deltas, anchors, image_sizes, hint="", **kw):
        kw["trace"] = True  # the records are graded too
        boxes, scores, records = solution(objectness, deltas, anchors, image_sizes, **kw)
        c = b.call(T, objectness, deltas, anchors, image_sizes, **kw)
        n = len(image_sizes)

        def judge_boxes(v):
            out = v[0]
            if not isinstance(out, (tuple, list)) or len(out) != 3:
                return f"expected (boxes, scores, records), got {_describe(out)}"
            for i in range(n):
                for what, exp, got in (("boxes", boxes, out[0]), ("scores", scores, out[1])):
                    if not isinstance(got, (list, tuple)) or len(got) != n:
                        return f"{what} must be a list with one array per image ({n}), got {_describe(got)}"
                    g_i = _as_array(got[i], f"image {i}: {what}")
                    if g_i.ndim >= 1 and exp[i].ndim >= 1 and g_i.shape[0] != exp[i].shape[0]:
                        return (
                            f"image {i}: you kept {g_i.shape[0]} proposals, the answer has "
                            f"{exp[i].shape[0]} (the counts per stage show where they part)"
                        )
                    msg = diff_arrays(exp[i], g_i, f"image {i}: {what}")
                    if msg:
                        return msg
            return None

        def judge_counts(v):
            out = v[0]
            recs = _item(out, 2, 3, "boxes, scores, records")
            if not isinstance(recs, (list, tuple)) or len(recs) != n:
                return f"records must be a list with one dict per image ({n}), got {_describe(recs)}"
            for i in range(n):
                if not isinstance(recs[i], dict) or not isinstance(recs[i].get("counts"), dict):
                    return f"records[{i}] must be a dict with a 'counts' dict ({{stage: count}})"
                got = recs[i]["counts"]
                for stage in PROPOSAL_STAGES:
                    want = records[i]["counts"][stage]
                    if stage not in got:
                        return f"records[{i}]['counts'] has no entry for stage {stage!r}"
                    if got[stage] != want:
                        return (
                            f"image {i}: {got[stage]} boxes after stage {stage!r}, expected {want} "
                            f"(the stages before agree) -- {STAGE_HINTS[stage]}"
                        )
            return None

        b.check(f"{label}: boxes and scores", c, judge_boxes, hint=hint)
        b.check(f"{label}: boxes left after each stage (records[i]['counts'])", c, judge_counts)

    case(
        "2 images, 2 levels, top 20 per level, NMS 0.7",
        obj,
        dlt,
        anchors,
        sizes,
        pre_nms_top_n=20,
        post_nms_top_n=15,
        nms_thresh=0.7,
        score_thresh=0.0,
        min_size=1e-3,
    )
    case(
        "score threshold 0.55, min_size 8, NMS 0.5",
        obj,
        dlt,
        anchors,
        sizes,
        pre_nms_top_n=30,
        post_nms_top_n=12,
        nms_thresh=0.5,
        score_thresh=0.55,
        min_size=8.0,
    )
    # Two nearly identical boxes on different levels: NMS per level keeps both.
    a0, a1 = np.array([[10.0, 10.0, 30.0, 30.0]]), np.array([[11.0, 11.0, 31.0, 31.0]])
    case(
        "NMS runs per level (two overlapping boxes on different levels)",
        [np.array([[2.0]]), np.array([[1.0]])],
        [np.zeros((1, 1, 4)), np.zeros((1, 1, 4))],
        [a0, a1],
        [(48, 48)],
        hint=(STAGE_HINTS["nms"], _one_box_kept),
        pre_nms_top_n=5,
        post_nms_top_n=5,
        nms_thresh=0.7,
        score_thresh=0.0,
        min_size=1e-3,
    )


# ---------------------------------------------------------------------------
# Exercise 4: RoIAlign forward
# ---------------------------------------------------------------------------
def _taps_map(taps, height, width, what):
    if not isinstance(taps, (list, tuple)):
        raise Fail(f"{what}: expected a list of (row, col, weight) taps, got {_describe(taps)}")
    m = np.zeros((height, width))
    for t in taps:
        if not isinstance(t, (list, tuple)) or len(t) != 3:
            raise Fail(f"{what}: a tap must be (row, col, weight), got {_describe(t)}")
        r, c, w = t
        if not (0 <= int(r) < height and 0 <= int(c) < width):
            raise Fail(f"{what}: tap (row {r}, col {c}) is outside the {height}x{width} map")
        m[int(r), int(c)] += float(w)
    return m


def _fmt_taps(m):
    nz = [(int(r), int(c), m[r, c]) for r, c in zip(*np.nonzero(m))]
    return "[]" if not nz else "{" + ", ".join(f"({r}, {c}): {w:.4g}" for r, c, w in nz) + "}"


def _rand_rois(rng, k, n_images, size, lo=-2.0, smin=2.0, smax=14.0):
    boxes = _random_boxes(rng, k, lo, size, smin, smax)
    return np.concatenate([rng.integers(0, n_images, (k, 1)).astype(np.float64), boxes], axis=1)


HALF_PIXEL = (
    "check the half-pixel offset (docs/semantics.md#roialign): offset = 0.5 if aligned else 0, "
    "subtracted from the scaled box"
)


def _blog_points_misplaced(v) -> bool:
    """The blog case's points have the right shapes and count but not the right places."""
    ys, xs, count = v[0]
    ys, xs = np.asarray(ys, dtype=np.float64), np.asarray(xs, dtype=np.float64)
    return ys.shape == (3, 2) and xs.shape == (3, 2) and int(count) == 4 and bool(np.all(np.isfinite(ys)))


def _nan_box_sampled(v) -> bool:
    """A NaN box got sampling points or a count other than 1."""
    ys, xs, count = v[0]
    return np.asarray(ys).ndim != 2 or np.asarray(ys).shape[1] != 0 or np.asarray(xs).shape[1] != 0 or count != 1


def _avg_over_samples_inside(x, rois, output_size, scale, sr, aligned):
    """RoIAlign with the classic slip: each bin divided by its samples *inside* the map, not by count."""
    from ..checks import pair
    from ..ops.roi_align import bilinear_reference, roi_sample_points

    ph_, pw_ = pair(output_size, "output_size")
    out = np.zeros((len(rois), x.shape[1], ph_, pw_), x.dtype)
    H, W = x.shape[2:]
    for k, roi in enumerate(rois):
        feat = x[int(roi[0])]
        ys, xs, _ = roi_sample_points(roi[1:], (ph_, pw_), scale, sr, aligned)
        for p in range(ph_):
            for q in range(pw_):
                taps = [bilinear_reference(y, xx, H, W) for y in ys[p] for xx in xs[q]]
                inside = [t for t in taps if t]
                if inside:
                    out[k, :, p, q] = sum(sum(w * feat[:, r, c] for r, c, w in t) for t in inside) / len(inside)
    return out


def _nonzero_where_zero(expected):
    """A condition: the student's array is non-finite, or non-zero where ``expected`` is exactly zero."""

    def when(v):
        g = np.asarray(v[0], dtype=np.float64)
        return g.shape == expected.shape and bool(np.any(~np.isfinite(g)) or np.any((expected == 0) & (g != 0)))

    return when


def _checks_roi_align_forward(b: _Builder, rng: np.random.Generator):
    from ..ops.roi_align import bilinear_reference, roi_align_reference, roi_sample_points
    from ..viz.roi import BLOG_BOX, BLOG_FEATURE_SIZE, BLOG_OUTPUT, BLOG_STRIDE

    SP = "tinymrcnn.ops.roi_align:roi_sample_points"
    BI = "tinymrcnn.ops.roi_align:bilinear_reference"
    RA = "tinymrcnn.ops.roi_align:roi_align_reference"
    names = "ys, xs, count"

    def points_judge(exp):
        def judge(v):
            out = v[0]
            for i, what in enumerate(("ys", "xs")):
                msg = diff_arrays(
                    exp[i],
                    _item(out, i, 3, names),
                    what,
                    check_dtype=False,
                    shape_hints=[
                        ((exp[i].shape[0],), "keep two dimensions, (bins, points per bin): .reshape(ph_, grid_h)")
                    ],
                )
                if msg:
                    return msg
            cnt = _item(out, 2, 3, names)
            if not isinstance(cnt, (int, np.integer)) or int(cnt) != exp[2]:
                return f"count is {cnt!r}, expected {exp[2]} (max(grid_h * grid_w, 1))"
            return None

        return judge

    blog_args = (BLOG_BOX, BLOG_OUTPUT, 1.0 / BLOG_STRIDE, 2, False)
    b.check(
        "roi_sample_points: the walkthrough's 200 x 145 px RoI at stride 32, 3x3 bins, 2x2 points",
        b.call(SP, *blog_args),
        points_judge(roi_sample_points(*blog_args)),
        hint=(
            "the RoI covers 6.25 x 4.53 cells (width x height) and a bin 2.08 x 1.51 cells; "
            "its 2 x 2 points sit at (i + 0.5) / 2 of the bin, not at thirds",
            _blog_points_misplaced,
        ),
    )
    box = (3.3, 1.2, 20.7, 15.1)
    exp = roi_sample_points(box, (3, 4), 0.5, -1, True)
    c = b.call(SP, box, (3, 4), 0.5, -1, True)
    other = roi_sample_points(box, (3, 4), 0.5, -1, False)

    def aligned_judge(v):
        msg = points_judge(exp)(v)
        if msg and points_judge(other)(v) is None:
            msg += f" -- your points are those of aligned=False: {HALF_PIXEL}"
        return msg

    b.check("roi_sample_points: adaptive grid, aligned=True, (3, 4) bins", c, aligned_judge)
    nan_box = (float("nan"), 2.0, 9.0, 8.0)
    b.check(
        "roi_sample_points: a NaN box gets no sampling points (adaptive grid)",
        b.call(SP, nan_box, (2, 3), 1.0, -1, False),
        points_judge(roi_sample_points(nan_box, (2, 3), 1.0, -1, False)),
        hint=(
            "with an adaptive grid, grid = ceil(roi / pooled) only for 0 < roi / pooled; "
            "NaN and empty boxes get grid 0 (and count 1)",
            _nan_box_sampled,
        ),
    )

    H, W = 4, 5
    groups = {
        "bilinear_reference: points inside the map": [(1.3, 2.6), (0.0, 0.0), (2.5, 0.25)],
        "bilinear_reference: edges, out of range and NaN": [
            (-0.5, 2.2),
            (3.2, 1.0),
            (1.0, 4.6),
            (3.7, 4.9),
            (4.5, 1.0),
            (-1.5, 2.0),
            (2.0, 5.01),
            (float("nan"), 1.0),
        ],
    }
    for label, pts in groups.items():
        calls = [b.call(BI, y, x, H, W) for y, x in pts]

        def judge(vals, pts=pts):
            for (y, x), got in zip(pts, vals):
                where = f"at (y, x) = ({y}, {x}) on a {H}x{W} map"
                exp_map = _taps_map(bilinear_reference(y, x, H, W), H, W, where)
                got_map = _taps_map(got, H, W, where)
                if not np.allclose(exp_map, got_map, rtol=1e-12, atol=1e-12):
                    return f"{where}: expected taps {_fmt_taps(exp_map)}, got {_fmt_taps(got_map)}"
            return None

        b.check(label, calls, judge)

    x25 = np.arange(25, dtype=np.float64).reshape(1, 1, 5, 5)
    roi = np.array([[0.0, 1.0, 1.0, 3.0, 3.0]])
    known = {al: roi_align_reference(x25, roi, 4, 1.0, -1, al) for al in (False, True)}
    for al in (False, True):
        b.check(
            f"RoIAlign's known answer (detectron2's test), aligned={al}",
            b.call(RA, x25, roi, 4, 1.0, -1, al),
            lambda v, al=al: diff_arrays(
                known[al], v[0], "output", variants=[(f"the aligned={not al} answer", known[not al], HALF_PIXEL)]
            ),
        )

    xb = rng.standard_normal((1, 2, BLOG_FEATURE_SIZE, BLOG_FEATURE_SIZE))
    rb = np.array([[0.0, *BLOG_BOX]])
    eb = roi_align_reference(xb, rb, BLOG_OUTPUT, 1.0 / BLOG_STRIDE, 2, False)
    b.check(
        "the walkthrough's RoI on a random 16x16 map, 3x3 output, 2x2 samples per bin",
        b.call(RA, xb, rb, BLOG_OUTPUT, 1.0 / BLOG_STRIDE, 2, False),
        lambda v: diff_arrays(eb, v[0], "output"),
    )

    x = rng.standard_normal((2, 3, 9, 11))
    rois = _rand_rois(rng, 5, 2, 18.0)
    for sr, al in ((2, False), (-1, True)):
        e = roi_align_reference(x, rois, (3, 2), 0.5, sr, al)
        o = roi_align_reference(x, rois, (3, 2), 0.5, sr, not al)
        b.check(
            f"random map, 5 RoIs on 2 images, scale 0.5, sampling_ratio {sr}, aligned={al}",
            b.call(RA, x, rois, (3, 2), 0.5, sr, al),
            lambda v, e=e, o=o, al=al: diff_arrays(
                e, v[0], "output", variants=[(f"the aligned={not al} answer", o, HALF_PIXEL)]
            ),
        )

    out_rois = np.array([[0, -6.0, -5.0, 4.0, 3.0], [1, 8.0, 6.0, 16.0, 12.0], [0, 30.0, 30.0, 40.0, 40.0]])
    e = roi_align_reference(x, out_rois, 3, 1.0, 2, False)
    inside = _avg_over_samples_inside(x, out_rois, 3, 1.0, 2, False)
    b.check(
        "RoIs partly and wholly outside the map",
        b.call(RA, x, out_rois, 3, 1.0, 2, False),
        lambda v: diff_arrays(
            e,
            v[0],
            "output",
            variants=[
                (
                    "each bin averaged over its samples inside the map",
                    inside,
                    "a sample outside the map contributes 0 but still counts in count (docs/semantics.md#roialign)",
                )
            ],
        ),
    )

    odd = np.array([[0, 5.0, 5.0, 5.0, 5.0], [1, 7.0, 2.0, 3.0, 4.0]])
    eo = roi_align_reference(x, odd, 2, 1.0, -1, True)
    none = np.zeros((0, 5))
    en = roi_align_reference(x, none, 2, 1.0, -1, True)
    b.check(
        "an empty box, an inverted box and no RoIs at all (K = 0)",
        [b.call(RA, x, odd, 2, 1.0, -1, True), b.call(RA, x, none, 2, 1.0, -1, True)],
        _judge_all((0, lambda v: diff_arrays(eo, v, "output")), (1, lambda v: diff_arrays(en, v, "output for K = 0"))),
        hint=(
            "bins without sampling points stay 0; with K = 0 the output is (0, C, ph, pw)",
            lambda v: _nonzero_where_zero(eo)(v) or np.asarray(v[1]).shape != en.shape,
        ),
    )

    em = roi_align_reference(x, rois, 3, 0.5, 2, False, "max")
    ea = roi_align_reference(x, rois, 3, 0.5, 2, False, "avg")
    b.check(
        'mode="max": the largest sample of each bin',
        b.call(RA, x, rois, 3, 0.5, 2, False, "max"),
        lambda v: diff_arrays(
            em, v[0], "output", variants=[('the mode="avg" answer', ea, 'mode="max" takes the maximum of the samples')]
        ),
    )

    x32 = x.astype(np.float32)
    e32 = roi_align_reference(x32, rois, 2, 0.5, 2, True)
    o32 = roi_align_reference(x32, rois, 2, 0.5, 2, False)
    b.check(
        "a float32 map gives float32 output",
        b.call(RA, x32, rois, 2, 0.5, 2, True),
        lambda v: diff_arrays(
            e32, v[0], "output", rtol=1e-5, atol=1e-5, variants=[("the aligned=False answer", o32, HALF_PIXEL)]
        ),
    )


# ---------------------------------------------------------------------------
# Exercise 5: RoIAlign backward
# ---------------------------------------------------------------------------
COUNT_HINTS = [
    (
        4.0,
        "did you divide by count? The forward averages count = grid_h * grid_w = 4 "
        "samples, so each tap's gradient is dy * weight / count",
    ),
    (0.25, "did you divide by count twice?"),
]


def _checks_roi_align_backward(b: _Builder, rng: np.random.Generator):
    from ..ops.roi_align import roi_align_backward_reference, roi_align_reference, roi_sample_points

    T = "tinymrcnn.ops.roi_align:roi_align_backward_reference"
    sol = roi_align_backward_reference

    x = rng.standard_normal((1, 2, 8, 9))
    rois = np.array([[0, 0.5, 1.0, 6.0, 7.5], [0, 2.0, 0.0, 8.5, 4.0], [0, 3.3, 2.2, 5.9, 6.1]])
    dy = rng.standard_normal((3, 2, 3, 3))
    e = sol(dy, x, rois, 3, 1.0, 2, True)
    b.check(
        "avg, 2x2 samples per bin (count = 4), aligned=True",
        b.call(T, dy, x, rois, 3, 1.0, 2, True),
        lambda v: diff_arrays(e, v[0], "dx", factor_hints=COUNT_HINTS),
    )

    x2 = rng.standard_normal((2, 3, 7, 8))
    rois2 = np.concatenate([_rand_rois(rng, 4, 2, 10.0), [[1, 2.0, 2.0, 9.0, 8.0], [1, 3.0, 2.5, 9.5, 8.0]]])
    dy2 = rng.standard_normal((6, 3, 2, 3))
    e2 = sol(dy2, x2, rois2, (2, 3), 1.0, -1, False)

    def summed(dy, x, rois, sr, aligned):
        """The classic slip, from the solution RoI by RoI: the gradient of each bin's sum, not its mean."""
        return sum(
            roi_sample_points(r[1:], dy.shape[2:], 1.0, sr, aligned)[2]
            * sol(dy[k : k + 1], x, rois[k : k + 1], dy.shape[2:], 1.0, sr, aligned)
            for k, r in enumerate(rois)
        )

    no_count = (
        "the gradient of each bin's sum instead of its average",
        "divide by count (grid_h * grid_w, per RoI with an adaptive grid)",
    )
    b.check(
        "adaptive sampling, 2 images, overlapping RoIs, aligned=False",
        b.call(T, dy2, x2, rois2, (2, 3), 1.0, -1, False),
        lambda v: diff_arrays(
            e2,
            v[0],
            "dx",
            factor_hints=COUNT_HINTS,
            variants=[(no_count[0], summed(dy2, x2, rois2, -1, False), no_count[1])],
        ),
    )

    x3 = rng.standard_normal((1, 2, 6, 7))
    rois3 = np.array([[0, 0.4, 0.7, 5.1, 4.9], [0, 2.2, 1.1, 6.8, 5.3]])
    dy3 = rng.standard_normal((2, 2, 3, 3))
    num = _numgrad_parent(lambda: float(np.sum(dy3 * roi_align_reference(x3, rois3, 3, 1.0, 2, False))), x3)
    b.check(
        "finite differences of roi_align (float64, relative error <= 1e-6)",
        b.call(T, dy3, x3, rois3, 3, 1.0, 2, False),
        lambda v: diff_gradcheck(num, v[0], "dx", "roi_align"),
    )

    odd = np.array(
        [
            [0, -6.0, -5.0, 4.0, 3.0],
            [1, 8.0, 6.0, 16.0, 12.0],
            [0, 30.0, 30.0, 40.0, 40.0],
            [1, 5.0, 5.0, 5.0, 5.0],
            [0, 7.0, 2.0, 3.0, 4.0],
        ]
    )
    dyo = rng.standard_normal((5, 3, 2, 2))
    eo = sol(dyo, x2, odd, 2, 1.0, -1, True)
    b.check(
        "RoIs outside the map, an empty box and an inverted box",
        b.call(T, dyo, x2, odd, 2, 1.0, -1, True),
        lambda v: diff_arrays(eo, v[0], "dx", variants=[(no_count[0], summed(dyo, x2, odd, -1, True), no_count[1])]),
        hint=("samples outside the map and bins without samples pass no gradient on", _nonzero_where_zero(eo)),
    )

    xm = rng.standard_normal((1, 2, 7, 7))
    rm = np.array([[0, 0.5, 0.5, 5.5, 6.0], [0, 1.0, 2.0, 6.5, 6.5]])
    dym = rng.standard_normal((2, 2, 2, 2))
    em = sol(dym, xm, rm, 2, 1.0, 2, False, "max")
    ea = sol(dym, xm, rm, 2, 1.0, 2, False, "avg")
    b.check(
        'mode="max": the gradient goes to the winning sample\'s taps',
        b.call(T, dym, xm, rm, 2, 1.0, 2, False, "max"),
        lambda v: diff_arrays(
            em,
            v[0],
            "dx",
            variants=[('the mode="avg" gradient', ea, "in max mode only the winning sample's taps get dy")],
        ),
    )

    ez = sol(np.zeros((0, 3, 2, 2)), x2, np.zeros((0, 5)), 2, 1.0, -1, True)
    b.check(
        "no RoIs (K = 0): a zero gradient",
        b.call(T, np.zeros((0, 3, 2, 2)), x2, np.zeros((0, 5)), 2, 1.0, -1, True),
        lambda v: diff_arrays(ez, v[0], "dx"),
    )

    dy32 = dy.astype(np.float32)
    x32 = x.astype(np.float32)
    e32 = sol(dy32, x32, rois, 3, 1.0, 2, True)
    b.check(
        "float32 dy gives a float32 dx",
        b.call(T, dy32, x32, rois, 3, 1.0, 2, True),
        lambda v: diff_arrays(e32, v[0], "dx", rtol=1e-5, atol=1e-6, factor_hints=COUNT_HINTS),
    )


# ---------------------------------------------------------------------------
# Exercise 6: the mask loss
# ---------------------------------------------------------------------------
def _checks_mask_loss(b: _Builder, rng: np.random.Generator):
    from ..losses import mask_loss, sigmoid_bce_with_logits

    T = "tinymrcnn.losses:mask_loss"
    R, K, M = 3, 4, 5
    z = rng.normal(0, 2, (R, K, M, M))
    labels = np.array([2, 0, 3], dtype=np.int64)
    t = rng.uniform(0, 1, (R, M, M))
    t[0, :2] = 0.0
    t[1, :2] = 1.0
    loss, grad = mask_loss(z, labels, t)
    all_k, _ = sigmoid_bce_with_logits(z, np.broadcast_to(t[:, None], z.shape).copy())
    hints = [
        (
            1.0 / K,
            f"that is 1/K (K = {K}): did you average over all K channels (R*K*M*M terms)? "
            "Only each RoI's own channel is in the loss: R*M*M terms",
        ),
        (float(R * M * M), "did you sum instead of averaging over the R*M*M pixels?"),
        (float(R), "did you average over each RoI's pixels and then sum over the RoIs?"),
        (float(M * M), "did you average over the RoIs but sum over the pixels?"),
    ]
    c = b.call(T, z, labels, t, numgrad={"wrt": 0, "h": 1e-4, "output": 0})
    names = "loss, dmask_logits"
    b.check(
        "loss value",
        c,
        lambda v: diff_arrays(
            np.float64(loss),
            np.float64(_item(v[0], 0, 2, names)),
            "loss",
            factor_hints=hints,
            variants=[
                (
                    "the BCE over all K channels, each against the RoI's target",
                    np.float64(all_k),
                    "only channel labels[r] of RoI r is in the loss",
                )
            ],
        ),
    )
    rows = np.arange(R)

    def on_gt_channel(v):
        gr = _as_array(_item(v[0], 1, 2, names), "gradient")
        if gr.shape != grad.shape:
            return f"the gradient has shape {gr.shape}, expected {grad.shape} (mask_logits' shape)"
        return diff_arrays(grad[rows, labels], gr[rows, labels], "gradient[r, labels[r]]", factor_hints=hints)

    b.check("gradient on each RoI's ground-truth channel", c, on_gt_channel)

    def zero_elsewhere(v):
        gr = _as_array(_item(v[0], 1, 2, names), "gradient")
        if gr.shape != grad.shape:
            return f"the gradient has shape {gr.shape}, expected {grad.shape} (mask_logits' shape)"
        other = np.ones(gr.shape, bool)
        other[rows, labels] = False
        bad = other & (gr != 0)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            return (
                f"gradient{_index(idx)} = {_g(gr[idx])}, expected exactly 0: channel {idx[1]} is not "
                f"RoI {idx[0]}'s class (labels[{idx[0]}] = {labels[idx[0]]}), so it is not in the loss "
                f"({int(bad.sum())} such elements)"
            )
        return None

    b.check("exactly zero gradient on the other K - 1 channels", c, zero_elsewhere)

    def fd(vals):
        v, res = vals[0], vals[1]
        return diff_gradcheck(res, _item(v, 1, 2, names), "your gradient", "your loss")

    b.check(
        "your gradient matches finite differences of your loss (float64, relative error <= 1e-6)",
        [c, ("numgrad", c)],
        fd,
    )

    z0, l0, t0 = np.zeros((0, K, M, M)), np.zeros(0, np.int64), np.zeros((0, M, M))
    b.check(
        "no RoIs (R = 0): loss 0 and an empty gradient",
        b.call(T, z0, l0, t0),
        _judge_all(
            (0, lambda v: diff_arrays(np.float64(0.0), np.float64(_item(v, 0, 2, names)), "loss")),
            (0, lambda v: diff_arrays(np.zeros((0, K, M, M)), _item(v, 1, 2, names), "gradient")),
        ),
    )

    zb = np.where(rng.uniform(size=z.shape) < 0.5, -80.0, 80.0)
    lb, gb = mask_loss(zb, labels, t)

    def large(v):
        got = _item(v[0], 0, 2, names)
        msg = diff_arrays(np.float64(lb), np.float64(got), "loss") or diff_arrays(
            gb, _item(v[0], 1, 2, names), "gradient"
        )
        if msg and not np.all(np.isfinite(np.asarray(got, dtype=np.float64))):
            msg += (
                " -- log(sigmoid(z)) overflows for large |z|: use the stable form "
                "max(z, 0) - z t + log(1 + exp(-|z|)), or sigmoid_bce_with_logits"
            )
        return msg

    b.check("large logits (|z| = 80) give a finite, exact loss", b.call(T, zb, labels, t), large)

    z32, t32 = z.astype(np.float32), t.astype(np.float32)
    l32, g32 = mask_loss(z32, labels, t32)
    b.check(
        "float32 logits give a float32 gradient",
        b.call(T, z32, labels, t32),
        _judge_all(
            (0, lambda v: diff_arrays(np.float64(l32), np.float64(_item(v, 0, 2, names)), "loss", rtol=1e-5)),
            (0, lambda v: diff_arrays(g32, _item(v, 1, 2, names), "gradient", rtol=1e-4, atol=1e-7)),
        ),
    )


CHECKS = {
    "conv2d_backward": _checks_conv2d_backward,
    "box_coder": _checks_box_coder,
    "proposals": _checks_proposals,
    "roi_align_forward": _checks_roi_align_forward,
    "roi_align_backward": _checks_roi_align_backward,
    "mask_loss": _checks_mask_loss,
}


def build_checks(exercise: Exercise, seed: int = 0) -> _Builder:
    """The calls and checks of one exercise, expected values computed from the installed solution."""
    b = _Builder()
    with np.errstate(all="ignore"):
        CHECKS[exercise.name](b, np.random.default_rng([seed, exercise.number]))
    return b


# ---------------------------------------------------------------------------
# Running the student's code
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """What one exercise's student code may use (the child interpreter's limits).

    wall_seconds: wall-clock time for all the exercise's calls together;
    cpu_seconds: CPU time of one child interpreter (RLIMIT_CPU; None: as
    wall_seconds); memory_mb: its address space (RLIMIT_AS); file_mb: the
    largest file it may write (RLIMIT_FSIZE). Core files are always off.
    A child stopped by a limit costs the call it was running; the remaining
    calls run in a fresh child while wall-clock time is left.
    """

    wall_seconds: float = 300.0
    cpu_seconds: float | None = None
    memory_mb: int = 2048
    file_mb: int = 256
    restarts: int = 3  # fresh children after one was stopped


def _limits(cpu_seconds: float, memory_mb: int, file_mb: int):
    """A preexec_fn for the child: resource limits, no core files (POSIX; None elsewhere)."""
    try:
        import resource
    except ImportError:  # Windows: no rlimits; the wall-clock timeout still holds
        return None

    def limit(name, soft, hard):
        """Lower one limit, never above the current hard limit; skipped where the system refuses
        (macOS does not enforce RLIMIT_AS, and may reject it)."""
        res = getattr(resource, name, None)
        if res is None:
            return
        try:
            _, cur_hard = resource.getrlimit(res)
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
                soft = min(soft, hard)
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError):
            pass

    def apply():
        cpu = max(1, math.ceil(cpu_seconds))
        limit("RLIMIT_CPU", cpu, cpu + 2)  # SIGXCPU, then SIGKILL
        limit("RLIMIT_AS", int(memory_mb) << 20, int(memory_mb) << 20)
        limit("RLIMIT_CORE", 0, 0)
        limit("RLIMIT_FSIZE", int(file_mb) << 20, int(file_mb) << 20)

    return apply


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()


def _stopped(returncode: int, stderr: str, limits: Limits, cpu_limit: float, cpu_used: float) -> str:
    """Why a child ended abnormally, in words."""
    sig = -returncode if returncode < 0 else None
    if sig == getattr(signal, "SIGXCPU", None) or (sig == signal.SIGKILL and cpu_used >= cpu_limit - 0.5):
        return (
            f"exceeded the time limit ({cpu_limit:g} s of CPU time): an endless loop, or very slow code "
            "(the inputs are tiny)"
        )
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr or "bad_alloc" in stderr:
        return f"exceeded the memory limit ({limits.memory_mb} MiB): an allocation without bound? (the inputs are tiny)"
    if sig == getattr(signal, "SIGXFSZ", None):
        return f"exceeded the file size limit ({limits.file_mb} MiB)"
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        extra = (
            f" (perhaps the memory limit, {limits.memory_mb} MiB)" if name in ("SIGKILL", "SIGSEGV", "SIGABRT") else ""
        )
        tail = stderr[-400:].strip()
        return f"the student's interpreter was killed by {name}{extra}" + (f": {tail}" if tail else "")
    return f"the student's interpreter stopped (exit code {returncode}): {stderr[-600:].strip()}"


def _children_cpu() -> float:
    try:
        import resource
    except ImportError:
        return 0.0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _read_result(results: Path, stem: str):
    """(value, None) or (None, why the file was rejected); (None, None) if there is no result."""
    try:
        return read_value(str(results / stem)), None
    except FileNotFoundError:
        return None, None
    except (DecodeError, OSError) as e:
        return None, f"rejected the result file of this call: {e} (results travel as JSON and plain arrays)"


def _result_shape_ok(r) -> bool:
    if not isinstance(r, dict) or not isinstance(r.get("ok"), bool):
        return False
    if r["ok"]:
        return "value" in r
    where = r.get("where")
    return (
        isinstance(r.get("error"), str)
        and isinstance(r.get("message"), str)
        and isinstance(where, list)
        and all(isinstance(w, (list, tuple)) and len(w) == 3 for w in where)
    )


def _run_child(
    student_dir: Path, calls: list[Call], ids: list[int], workdir: Path, results: Path, wall: float, limits: Limits
):
    """One child interpreter on the calls ``ids``; returns why it stopped early (None if it did not)."""
    stem = workdir / f"calls{ids[0]}"
    payload = [
        {
            "id": i,
            "target": calls[i].target,
            "args": calls[i].args,
            "kwargs": calls[i].kwargs,
            "init": calls[i].init,
            "numgrad": calls[i].numgrad,
        }
        for i in ids
    ]
    write_value(str(stem), payload)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    # Only the student's copy is importable as tinymrcnn; Numba compiles nothing (tiny inputs); one
    # BLAS thread (threads would multiply the CPU time and the address space).
    env.update(
        PYTHONPATH=str(student_dir),
        NUMBA_DISABLE_JIT="1",
        PYTHONDONTWRITEBYTECODE="1",
        TINYMRCNN_GRADING="1",
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        NUMBA_NUM_THREADS="1",
    )
    cpu = min(limits.cpu_seconds if limits.cpu_seconds is not None else limits.wall_seconds, wall)
    cpu0 = _children_cpu()
    err_path = workdir / f"stderr{ids[0]}.txt"  # a file (capped by RLIMIT_FSIZE), not a pipe to fill
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(workdir / "runner.py"), str(student_dir), str(stem), str(results)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=_limits(cpu, limits.memory_mb, limits.file_mb),
            start_new_session=True,
        )
        try:
            proc.wait(timeout=wall)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            return f"exceeded the time limit ({wall:g} s wall-clock): an endless loop, or very slow code"
        finally:
            if proc.poll() is None:
                _kill_group(proc)
                proc.wait()
    _kill_group(proc)  # anything the student's code left running in its group
    if proc.returncode in (0, 3):
        return None
    with open(err_path, "rb") as f:
        f.seek(max(0, err_path.stat().st_size - 4000))
        stderr = f.read().decode("utf-8", "replace")
    return _stopped(proc.returncode, stderr, limits, cpu, _children_cpu() - cpu0)


def _run_calls(student_dir: Path, calls: list[Call], limits: Limits, workdir: Path):
    """Run the calls in fresh interpreters on the student's package.

    Returns (results by call id, {call id: why it has no result}, fatal). No
    file the children write is unpickled: results are read with
    :func:`runner.read_value`.
    """
    shutil.copyfile(Path(__file__).with_name("runner.py"), workdir / "runner.py")
    results = workdir / "results"
    results.mkdir(exist_ok=True)
    out, why, fatal = {}, {}, None
    pending = list(range(len(calls)))
    deadline = time.monotonic() + limits.wall_seconds
    for _ in range(limits.restarts + 1):
        if not pending:
            break
        wall = deadline - time.monotonic()
        if wall <= 0.5:
            fatal = fatal or f"the exercise's time limit ({limits.wall_seconds:g} s wall-clock) was spent"
            break
        stop = _run_child(student_dir, calls, pending, workdir, results, wall, limits)
        imp, bad = _read_result(results, "import")
        if imp is not None or bad:
            if bad or not _result_shape_ok(imp):
                return out, why, f"the student's package does not import ({bad or 'an unreadable report'})"
            return (
                out,
                why,
                (f"the student's package does not import: {imp['error']}: {imp['message']}{_where_text(imp['where'])}"),
            )
        left = []
        for i in pending:
            r, bad = _read_result(results, str(i))
            if bad is None and r is not None and not _result_shape_ok(r):
                bad = "rejected the result file of this call: not a result"
            if bad:
                why[i] = bad
            elif r is not None:
                out[i] = r
            elif (results / f"{i}.started").exists() and stop:
                why[i] = stop  # the call that was running when the child stopped
            else:
                left.append(i)
        if stop is None and left:
            fatal = "the student's interpreter ended before running every call (did the code call exit()?)"
            break
        if stop is not None:
            fatal = stop
        pending = left
    for i in pending:
        why.setdefault(i, f"not run: {fatal}" if fatal else "the call did not run")
    return out, why, fatal


def _where_text(where) -> str:
    if not where:
        return ""
    f, line, fn = where[-1]
    return f"  [{f}:{line}, in {fn}]"


def _part_of(frame) -> tuple[str, str] | None:
    """(exercise, function) if the traceback frame is in a function students write, else None."""
    f, _, fn = frame
    for ex in EXERCISES:
        if str(f).replace(os.sep, "/").endswith(ex.path):
            for p in ex.parts:
                if p.function.split(".")[-1] == fn:
                    return ex.name, p.function
    return None


def _part_owner(where) -> str | None:
    """The exercise of the innermost frame that is a student's function (None if there is none)."""
    for frame in reversed(where or []):
        part = _part_of(frame)
        if part:
            return part[0]
    return None


def _traced(where) -> str:
    """Where the student's code raised; an error inside provided code is traced to the student's caller."""
    if not where:
        return ""
    text = _where_text(where)
    if _part_of(where[-1]) is None:
        for frame in reversed(where[:-1]):
            if _part_of(frame):
                f, line, fn = frame
                text += f" -- in provided code, called from your {fn} ({f}:{line})"
                break
    return text


def _calls_of(function: str) -> set[str]:
    """The students' functions ``function`` calls, directly or not (Part.calls, transitively)."""
    uses = {p.function: p.calls for ex in EXERCISES for p in ex.parts}
    seen, todo = set(), list(uses.get(function, ()))
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo.extend(uses.get(f, ()))
    return seen


def _block_follow_ons(results: list[ExerciseResult]) -> None:
    """Mark the failed checks that call a student's function which fails its own checks."""
    failing = {}
    for r in results:
        for c in r.checks:
            if not c.passed and len(c.parts) == 1:
                failing.setdefault(c.parts[0], r.exercise.name)
    for r in results:
        for c in r.checks:
            if c.passed:
                continue
            deps = set().union(*(_calls_of(f) for f in c.parts)) - set(c.parts) if c.parts else set()
            bad = [f for f in sorted(deps) if f in failing]
            if bad:
                f = bad[0]
                c.blocked_by = f if failing[f] == r.exercise.name else f"{f} (exercise {failing[f]})"


def _hint(chk: Check, args) -> str:
    text, when = (chk.hint, None) if isinstance(chk.hint, str) else chk.hint
    if not text:
        return ""
    if when is not None:
        try:
            if not when(args):
                return ""
        except Exception:  # noqa: BLE001 -- an odd result: the condition does not hold
            return ""
    return text


def run_exercise(
    student_dir: Path, exercise: Exercise, seed: int = 0, timeout: float = 300.0, limits: Limits | None = None
) -> ExerciseResult:
    limits = limits if limits is not None else Limits(wall_seconds=timeout)
    b = build_checks(exercise, seed)
    result = ExerciseResult(exercise)
    with tempfile.TemporaryDirectory(prefix=f"tinymrcnn-grade-{exercise.name}-") as tmp:
        values, why, fatal = _run_calls(student_dir, b.calls, limits, Path(tmp))
    for chk in b.checks:
        args, error = [], None
        parts = tuple(
            dict.fromkeys(b.calls[ref[1] if isinstance(ref, tuple) else ref].target.split(":")[1] for ref in chk.calls)
        )
        for ref in chk.calls:
            key, i = (ref[1], "numgrad") if isinstance(ref, tuple) else (ref, "value")
            r = values.get(key)
            if r is None:
                error = ("NotRun", why.get(key) or fatal or "the call did not run", [])
                break
            if not r["ok"]:
                error = (r["error"], r["message"], r["where"])
                break
            if i not in r:
                error = ("NotRun", "rejected the result file of this call: no finite-difference gradient", [])
                break
            args.append(r[i])
        if error is not None:
            if error[0] == "NotRun":
                msg = error[1]
            elif error[0] == "MemoryError":
                msg = (
                    f"exceeded the memory limit ({limits.memory_mb} MiB): raised MemoryError"
                    f"{_traced(error[2])} -- an allocation without bound? (the inputs are tiny)"
                )
            else:
                msg = f"raised {error[0]}: {error[1]}{_traced(error[2])}"
            owner = _part_owner(error[2])
            if owner and owner != exercise.name:
                msg += f" -- this is exercise {owner}'s code: finish that one first"
            result.checks.append(CheckResult(chk.name, False, msg, error, parts))
            continue
        try:
            msg = chk.judge(args)
        except Fail as e:
            msg = str(e)
        except Exception as e:  # noqa: BLE001 -- an odd result the judge could not read
            msg = f"could not read your result ({type(e).__name__}: {e})"
        hint = _hint(chk, args) if msg and "your result equals" not in msg else ""  # a variant says more
        if hint:
            msg += f" [hint: {hint}]"
        result.checks.append(CheckResult(chk.name, not msg, msg or "", None, parts))
    return result


def grade(student_dir, exercises=None, seed: int = 0, timeout: float = 300.0, limits: Limits | None = None) -> Report:
    """Grade the package in ``student_dir`` (the folder that holds ``tinymrcnn/``).

    This runs the student's code (in child interpreters, under ``limits``;
    default: ``Limits(wall_seconds=timeout)``). Raises FileNotFoundError if
    there is no package there, and RuntimeError if the installed package
    (the solution) lacks the exercise markers.
    """
    limits = limits if limits is not None else Limits(wall_seconds=timeout)
    student_dir = Path(student_dir).resolve()
    if not (student_dir / "tinymrcnn" / "__init__.py").is_file():
        raise FileNotFoundError(f"no tinymrcnn package in {student_dir} (expected {student_dir}/tinymrcnn/__init__.py)")
    chosen = select(exercises)
    have = {r.exercise for r in find_regions()}
    missing = [ex.name for ex in chosen if ex.name not in have]
    if missing:
        raise RuntimeError(
            f"the installed tinymrcnn ({Path(__file__).parents[1]}) has no exercise markers for "
            f"{', '.join(missing)}: it is not the solution (is a student's copy first on the path?)"
        )
    results = [run_exercise(student_dir, ex, seed, limits=limits) for ex in chosen]
    _block_follow_ons(results)
    by_name = {r.exercise.name: r for r in results}
    for r in results:
        weak = [q for q in r.exercise.requires if q in by_name and by_name[q].score < 100]
        if weak and r.score < 100:
            r.note = (
                f"this exercise calls the functions of {', '.join(weak)}, which still fail(s) checks: fix that first"
            )
    return Report(str(student_dir), results)


def format_report(report: Report) -> str:
    """The score table and one line per failed check."""
    lines = [
        f"tinymrcnn course grade: {report.student_dir}",
        "",
        f"  {'#':>2}  {'exercise':<20} {'checks':>7}  {'score':>6}",
    ]
    for r in report.exercises:
        lines.append(
            f"  {r.exercise.number:>2}  {r.exercise.name:<20} {r.passed:>3}/{len(r.checks):<3}  {r.score:>5.0f}%"
        )
    lines += [f"      {'total':<20} {'':>7}  {report.total:>5.0f}%   (each exercise counts equally)"]
    for r in report.exercises:
        failed = [c for c in r.checks if not c.passed]
        if not failed:
            continue
        lines += ["", f"{r.exercise.name}: {r.passed} of {len(r.checks)} checks pass"]
        own_stub = all(
            c.error is not None and c.error[0] == "NotImplementedError" and _part_owner(c.error[2]) == r.exercise.name
            for c in failed
        )
        if r.note and not own_stub:
            lines.append(f"  note: {r.note}")
        if all(c.error is not None and c.error[0] == "NotImplementedError" for c in r.checks):
            where = sorted({c.error[2][-1][2] for c in failed if c.error[2]})
            lines.append(
                f"  not implemented yet: every check stops at a raise NotImplementedError "
                f"(in {', '.join(where) or '?'})"
            )
            continue
        if len({c.message for c in failed}) == 1 and len(failed) == len(r.checks):
            lines.append(f"  every check: {failed[0].message}")
            continue
        blocked: dict[str, list[CheckResult]] = {}
        for c in failed:
            if c.blocked_by:
                blocked.setdefault(c.blocked_by, []).append(c)
        for f, cs in blocked.items():
            calls = sorted({p for c in cs for p in c.parts if p != f.split(" ")[0]})
            lines.append(
                f"  fix {f} first: {len(cs)} more failing check(s) of {', '.join(calls)} call it "
                "and are not listed; grade again once it passes"
            )
        for c in failed:
            if not c.blocked_by:
                lines.append(f"  FAIL {c.name}: {c.message}")
    return "\n".join(lines)


def main_grade(
    student_dir, exercises=None, seed=0, timeout=300.0, json_path=None, file=None, limits: Limits | None = None
) -> int:
    """The ``tinymrcnn course grade`` command: prints the report; 0 unless the folder is missing."""
    file = file or sys.stdout
    try:
        report = grade(student_dir, exercises, seed, timeout, limits)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"tinymrcnn course grade: {e}", file=sys.stderr)
        return 2
    print(format_report(report), file=file)
    if json_path:
        Path(json_path).write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    return 0
