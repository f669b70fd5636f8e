"""The course's exercises: every piece of text a student or an instructor sees, in one place.

An exercise is one or more functions of the package whose bodies a student
writes. In the source, the part of a body that becomes the exercise is
fenced by two comment lines at the body's indentation:

    def roi_align_reference(x, rois, ...):
        \"\"\"...\"\"\"
        ph_, pw_ = _check_args(...)          # given: stays in the student's copy
        # --- exercise: roi_align_forward ---
        out = np.zeros(...)                  # replaced by raise NotImplementedError(...)
        ...
        return out
        # --- end exercise ---

The code between the markers *is* the solution, so the package's own tests
keep testing it. ``tinymrcnn course make-student`` replaces each fenced
region with a stub and the function's docstring with the :class:`Part`'s
task text below; ``tinymrcnn course grade`` runs the checks of
``tinymrcnn.course.grade``. docs/course.md is the instructor's page.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field

START_MARKER = re.compile(r"^#\s*---\s*exercise:\s*([A-Za-z_][A-Za-z0-9_]*)\s*---\s*$")
END_MARKER = re.compile(r"^#\s*---\s*end exercise\s*---\s*$")


@dataclass(frozen=True)
class Part:
    """One function a student writes: the text of its stub's docstring.

    ``function`` is the qualified name inside ``Exercise.module``
    (``"BoxCoder.encode"``). ``formula`` is kept as written (line breaks
    matter); the other fields are re-wrapped.
    """

    function: str
    task: str
    shapes: str
    formula: str
    hint: str
    calls: tuple[str, ...] = ()  # the students' functions (any exercise) this one calls


@dataclass(frozen=True)
class Exercise:
    """One exercise: metadata for the docs, the notebook and the grader."""

    number: int
    name: str  # the marker's name, e.g. "roi_align_forward"
    title: str
    module: str  # dotted module that holds the parts
    parts: tuple[Part, ...]
    minutes: int  # estimated time for a student who read docs/walkthrough.md
    teaches: str
    requires: tuple[str, ...] = field(default=())  # exercises whose functions these parts call

    @property
    def notebook(self) -> str:
        """File name of the exercise notebook in notebooks/exercises/."""
        return f"{self.number:02d}_{self.name}.ipynb"

    @property
    def path(self) -> str:
        """The source file, relative to the folder that holds ``tinymrcnn/``."""
        return self.module.replace(".", "/") + ".py"

    def part(self, function: str) -> Part:
        for p in self.parts:
            if p.function == function:
                return p
        raise KeyError(f"exercise {self.name!r} has no part for {function!r}")


def _para(text: str, width: int) -> list[str]:
    """Re-wrap blank-line separated paragraphs to ``width`` columns."""
    out: list[str] = []
    for block in textwrap.dedent(text).strip().split("\n\n"):
        if out:
            out.append("")
        out.extend(textwrap.wrap(" ".join(block.split()), width, break_on_hyphens=False) or [""])
    return out


def stub_docstring(ex: Exercise, part: Part, width: int = 88) -> list[str]:
    """The lines (without indentation or quotes) of a stub's docstring."""
    k = [p.function for p in ex.parts].index(part.function) + 1
    of = f", part {k} of {len(ex.parts)}" if len(ex.parts) > 1 else ""
    head = f"EXERCISE {ex.number} ({ex.name}){of}: {ex.title}."
    lines = (
        [head, ""]
        if len(head) <= width
        else [f"EXERCISE {ex.number} ({ex.name}){of}.", "", ex.title[0].upper() + ex.title[1:] + ".", ""]
    )
    lines += _para(part.task, width)
    lines += ["", "Shapes:"] + ["    " + s for s in _para(part.shapes, width - 4)]
    lines += ["", "Formula:"] + ["    " + s.rstrip() for s in textwrap.dedent(part.formula).strip().splitlines()]
    lines += ["", "Hint:"] + ["    " + s for s in _para(part.hint, width - 4)]
    lines += [""] + _para(
        "Lines above the raise (argument checks) are given. Replace the raise with your code; "
        f"notebooks/exercises/{ex.notebook} checks it step by step and then trains a model with it.",
        width,
    )
    if ex.requires:
        lines += [""] + _para(
            "This part calls the functions of exercise(s) "
            f"{', '.join(ex.requires)}. While those are stubs the notebook runs the "
            "reference solution in their place; the grader always calls yours.",
            width,
        )
    return lines


# ---------------------------------------------------------------------------
# The exercises, in the order the data flows through the model
# ---------------------------------------------------------------------------
EXERCISES: tuple[Exercise, ...] = (
    Exercise(
        number=1,
        name="conv2d_backward",
        title="the backward pass of a 2-D convolution",
        module="tinymrcnn.ops.conv",
        minutes=45,
        teaches=(
            "The chain rule through a sliding window: the input gradient scatters dy back "
            "through every kernel tap (a 'full' correlation with the flipped kernel), the "
            "weight gradient correlates the input with dy, and stride and padding only enter "
            "the index arithmetic. Every layer of the backbone, FPN, RPN and heads runs "
            "through this function's fast twin."
        ),
        parts=(
            Part(
                function="conv2d_backward_reference",
                task=(
                    "Return the gradients (dx, dweight, dbias) of the loss, given dy, its gradient "
                    "with respect to y = conv2d(x, weight, bias, stride, padding). Plain NumPy; "
                    "clarity matters, speed does not (the package's fast conv2d_backward is tested "
                    "against this function)."
                ),
                shapes=(
                    "x (N, C, H, W); weight (O, C, kh, kw); dy (N, O, Ho, Wo) with "
                    "Ho = (H + 2 ph - kh) // sh + 1 and Wo likewise. Returns dx (N, C, H, W), "
                    "dweight (O, C, kh, kw) and dbias (O,), all in x's dtype. sh, sw, ph, pw, Ho "
                    "and Wo are already unpacked for you."
                ),
                formula="""\
                y[n, o, a, b] = bias[o] + sum_{c, i, j} weight[o, c, i, j] * xp[n, c, a*sh + i, b*sw + j]
                where xp is x zero-padded by ph rows and pw columns on each side.
                Derive dL/dx[n, c, h, w], dL/dweight[o, c, i, j] and dL/dbias[o]
                from dL/dy[n, o, a, b] = dy[n, o, a, b].""",
                hint=(
                    "Fix one kernel tap (i, j): then y is a 1x1 convolution, a dense layer over the "
                    "channels, of the strided slice xp[:, :, i : i + sh*(Ho-1) + 1 : sh, "
                    "j : j + sw*(Wo-1) + 1 : sw]. Work out that dense layer's gradients, sum them "
                    "over the taps into a padded dx (+=: windows overlap), and crop the padding "
                    "at the end. np.einsum keeps the indices readable."
                ),
            ),
        ),
    ),
    Exercise(
        number=2,
        name="box_coder",
        title="the box coder: encode and decode box deltas",
        module="tinymrcnn.ops.boxes",
        minutes=25,
        teaches=(
            "How Faster R-CNN makes box regression scale-invariant: offsets in units of the "
            "anchor's size, log-space size ratios, the (10, 10, 5, 5) weights of the box head "
            "and the clamp that keeps exp() from overflowing early in training. Both the RPN "
            "and the box head use these two functions."
        ),
        parts=(
            Part(
                function="BoxCoder.encode",
                task=(
                    "Return the deltas (dx, dy, dw, dh) that move each proposal onto its "
                    "reference (ground-truth) box, scaled by the coder's weights "
                    "self.weights = (wx, wy, ww, wh)."
                ),
                shapes=(
                    "reference_boxes (N, 4) and proposals (N, 4), [x1, y1, x2, y2], row i "
                    "is one pair (both checked to have positive sizes). Returns (N, 4) "
                    "[dx, dy, dw, dh] in the inputs' dtype."
                ),
                formula="""\
                    size and centre of a box: w = x2 - x1 (no +1), cx = x1 + 0.5 w (y likewise)
                    dx = wx (gx - px) / pw        dw = ww log(gw / pw)
                    dy = wy (gy - py) / ph        dh = wh log(gh / ph)
                    (p: the proposal, g: the reference box)""",
                hint=(
                    "Work with the columns as (N,) vectors and np.stack them along axis 1. "
                    "The weights are Python floats, so float32 inputs stay float32."
                ),
            ),
            Part(
                function="BoxCoder.decode",
                task=(
                    "Invert encode: apply deltas to reference boxes. A row of deltas may hold "
                    "k boxes (one per class): deltas[:, 0::4] are all the dx's, deltas[:, 1::4] "
                    "the dy's, and so on. Divide by the weights, clamp dw and dh from above at "
                    "self.bbox_xform_clip before exp(), and return [x1, y1, x2, y2] per box."
                ),
                shapes=(
                    "deltas (N, 4k); boxes (N, 4), already cast to deltas' dtype. Returns "
                    "(N, 4k) in deltas' dtype, [x1, y1, x2, y2] for each of the k boxes."
                ),
                formula="""\
                    dx = deltas_x / wx, dw = min(deltas_w / ww, bbox_xform_clip)   (y, h likewise)
                    cx' = dx * w + cx,  w' = exp(dw) * w
                    x1' = cx' - 0.5 w',  x2' = cx' + 0.5 w'""",
                hint=(
                    "Keep (N, k) arrays and broadcast the (N,) widths and centres with [:, None]; "
                    "stack the four corners to (N, k, 4) and reshape to (N, 4k). "
                    "decode(encode(g, p), p) must give g back."
                ),
            ),
        ),
    ),
    Exercise(
        number=3,
        name="proposals",
        title="the proposal layer",
        module="tinymrcnn.model.proposals",
        minutes=45,
        requires=("box_coder",),
        teaches=(
            "What turns a dense map of anchor scores into a few hundred object proposals: "
            "top-k per pyramid level, decoding, clipping, small-box removal, a score "
            "threshold, NMS per level and the final top-n (step 4 of docs/walkthrough.md). "
            "Why NMS runs per level, and where the proposal counts go at each step."
        ),
        parts=(
            Part(
                function="generate_proposals",
                task=(
                    "For each image i: (1) on every level keep the pre_nms_top_n anchors with the "
                    "highest objectness logits; (2) decode their deltas against their anchors with "
                    "box_coder.decode and clip the boxes to image_sizes[i] (clip_boxes_to_image); "
                    "(3) drop boxes with a side < min_size (remove_small_boxes); (4) keep boxes "
                    "whose probability sigmoid(logit) is >= score_thresh; (5) NMS at nms_thresh, "
                    "separately on each level (batched_nms with the level as the group id); (6) keep "
                    "the post_nms_top_n best boxes over all levels.\n\n"
                    "Return (boxes, scores, records): boxes and scores are lists with one entry per "
                    "image; records is None unless trace is True (the training step does not need "
                    "it), then a list with one dict per image (the grader always asks for it): "
                    "records[i] is a dict; records[i]['counts'] must map every stage name in "
                    "PROPOSAL_STAGES ('topk', 'decoded', 'clipped', 'remove_small', 'score_thresh', "
                    "'nms', 'final') to the number of boxes left after that stage. model.inspect() "
                    "passes the whole dict on, so you may store more there (the boxes after each "
                    "stage, say)."
                ),
                shapes=(
                    "objectness: list over levels of (N, A_l) logits, flattened (H, W, A); "
                    "deltas: list of (N, A_l, 4); anchors: list of (A_l, 4); image_sizes: N "
                    "pairs (h, w). Returns boxes[i] (R_i, 4) in deltas' dtype and scores[i] "
                    "(R_i,) probabilities in decreasing order. box_coder, pre_nms_top_n, "
                    "post_nms_top_n and min_size are already checked."
                ),
                formula="""\
                score = sigmoid(logit) = 1 / (1 + exp(-logit))   (scipy.special.expit)
                NMS: visit boxes by decreasing score; drop every later box of the same level
                whose IoU with a kept box is > nms_thresh.""",
                hint=(
                    "Use np.argsort(-logits, kind='stable') for the top-k so equal logits keep the "
                    "anchor order. Put the candidates of all levels in one array with a parallel "
                    "array of level ids. batched_nms returns indices sorted by decreasing score "
                    "over all levels, so step (6) is a slice."
                ),
                calls=("BoxCoder.decode",),
            ),
        ),
    ),
    Exercise(
        number=4,
        name="roi_align_forward",
        title="RoIAlign: sampling points, bilinear taps, pooling",
        module="tinymrcnn.ops.roi_align",
        minutes=60,
        teaches=(
            "The RoIAlign example of docs/walkthrough.md made exact: keep the projected RoI "
            "(145 x 200 px at stride 32 is 4.53 x 6.25 cells), split it into bins, sample "
            "each bin on a regular grid, read each sample by bilinear interpolation and "
            "average. The half-pixel offset (aligned=True) and every edge case of the exact "
            "kernel: boxes outside the map, empty boxes, NaN."
        ),
        parts=(
            Part(
                function="roi_sample_points",
                task=(
                    "Compute where RoIAlign samples one box: the y coordinates of the grid_h "
                    "sample rows of every bin row and the x coordinates of the grid_w sample "
                    "columns of every bin column, in feature-map cells, and count, the number "
                    "that divides a bin's sum."
                ),
                shapes=(
                    "box (x1, y1, x2, y2) in input pixels (already unpacked to floats); "
                    "output_size -> (ph_, pw_). Returns ys (ph_, grid_h) and xs (pw_, grid_w) "
                    "float64 arrays (build them with .reshape(ph_, grid_h) so that an empty "
                    "grid still has two dimensions) and count, an int."
                ),
                formula="""\
                    offset = 0.5 if aligned else 0
                    start_w = x1 * spatial_scale - offset,  end_w = x2 * spatial_scale - offset  (h: y)
                    roi_w = end_w - start_w, clamped to >= 1 if not aligned;  bin_w = roi_w / pw_
                    grid_w = sampling_ratio if > 0, else ceil(roi_w / pw_)  (0 for an empty or NaN box)
                    count = max(grid_h * grid_w, 1)
                    sample x of bin column p, point ix: start_w + p * bin_w + (ix + 0.5) * bin_w / grid_w""",
                hint=(
                    "NaN compares False with everything, and math.ceil(nan) raises: test "
                    "'0 < roi / pooled' before taking the ceiling. The clamp of a not-aligned "
                    "roi_w must keep NaN as NaN."
                ),
            ),
            Part(
                function="bilinear_reference",
                task=(
                    "Return the four taps (row, col, weight) that bilinear interpolation at "
                    "(y, x) reads from a height x width map, or [] for a point out of range. "
                    "The value at (y, x) is then sum(weight * map[row, col])."
                ),
                shapes=(
                    "y, x floats (may be NaN); height, width ints >= 1. Returns a list of four "
                    "(int row, int col, float weight) tuples in the order (low, low), "
                    "(low, high), (high, low), (high, high), or []."
                ),
                formula="""\
                    out of range (contributes 0): y < -1 or y > height or x < -1 or x > width, or NaN
                    clamp y, x <= 0 to 0;  y_low = int(y)
                    if y_low >= height - 1: y_low = y_high = height - 1 and y = y_low
                    else: y_high = y_low + 1                        (x likewise)
                    ly = y - y_low, hy = 1 - ly (x likewise)
                    weights: hy*hx, hy*lx, ly*hx, ly*lx  (the weights of Q11, Q21, Q12, Q22)""",
                hint=(
                    "Write the range test as not (-1 <= y <= height and -1 <= x <= width): "
                    "then NaN lands in the out-of-range branch by itself."
                ),
            ),
            Part(
                function="roi_align_reference",
                task=(
                    "Pool a (ph_, pw_) grid for every RoI. For RoI k (r[k] = [batch, x1, y1, "
                    "x2, y2]) and bin (p, q): read the bin's grid_h * grid_w samples ys[p] x "
                    "xs[q] from x[batch] by bilinear interpolation, then average them "
                    "(mode 'avg': their sum divided by count) or take their maximum (mode "
                    "'max'). A bin without samples stays 0. The helper _bin_samples(feat, "
                    "ys[p], xs[q]) returns the samples' values (S, C) and taps."
                ),
                shapes=(
                    "x (N, C, H, W); r (K, 5) float64, already checked; ph_, pw_ ints. "
                    "Returns (K, C, ph_, pw_) in x's dtype."
                ),
                formula="""\
                    out[k, c, p, q] = 1 / count * sum_{iy, ix} bilinear(x[b_k, c], ys[p, iy], xs[q, ix])""",
                hint=(
                    "count comes from roi_sample_points, not from the number of samples that "
                    "fell inside the map: a sample outside the map contributes 0 but still "
                    "counts (docs/semantics.md#roialign)."
                ),
                calls=("roi_sample_points", "bilinear_reference"),
            ),
        ),
    ),
    Exercise(
        number=5,
        name="roi_align_backward",
        title="the backward pass of RoIAlign",
        module="tinymrcnn.ops.roi_align",
        minutes=40,
        requires=("roi_align_forward",),
        teaches=(
            "The backward of a gather is a scatter: every sample hands its bin's gradient "
            "to its four bilinear taps, with the weights of the forward and the 1/count of "
            "the average; overlapping RoIs and samples accumulate. The max mode routes the "
            "gradient through the winning sample only. No gradient flows to the boxes."
        ),
        parts=(
            Part(
                function="roi_align_backward_reference",
                task=(
                    "Return dx, the gradient of the loss with respect to roi_align's input x, "
                    "given dy, its gradient with respect to roi_align's output. mode 'avg': every "
                    "sample of bin (k, p, q) passes dy[k, :, p, q] on to its taps. mode 'max': "
                    "only the taps of the bin's winning sample get it, per channel (the first "
                    "maximum; find it from x with _bin_samples)."
                ),
                shapes=(
                    "dy (K, C, ph, pw); x (N, C, H, W), the forward's input, with N, C, H, W "
                    "= x.shape already set; r (K, 5) float64, already checked. Returns dx "
                    "(N, C, H, W) in dy's dtype."
                ),
                formula="""\
                forward: out[k, c, p, q] = 1 / count * sum_{samples s of bin (p, q)}
                                               sum_{taps t of s} w_st * x[b_k, c, row_t, col_t]
                derive dL/dx[b, c, h, w] = sum_{k, p, q} dy[k, c, p, q] * d out[k, c, p, q] / d x[b, c, h, w]""",
                hint=(
                    "Loop exactly like the forward, but scatter with += where the forward "
                    "gathered: several samples and several RoIs can touch the same pixel. Every "
                    "factor the forward applied to a sample appears again here."
                ),
                calls=("roi_sample_points", "bilinear_reference"),
            ),
        ),
    ),
    Exercise(
        number=6,
        name="mask_loss",
        title="the per-class mask loss and its gradient",
        module="tinymrcnn.losses",
        minutes=25,
        teaches=(
            "Mask R-CNN's decoupling of masks and classes (paper section 3; the loss in "
            "docs/walkthrough.md): a sigmoid per pixel on the ground-truth class's channel only, so "
            "the K masks never compete; the gradient sigmoid(z) - t on that channel and "
            "exactly zero on the others; what the mean runs over."
        ),
        parts=(
            Part(
                function="mask_loss",
                task=(
                    "Return (loss, dmask_logits). RoI r has ground-truth class labels[r]; only its "
                    "mask channel labels[r] takes part in the loss: the binary cross-entropy of "
                    "sigmoid(logit) against the target, averaged over the pixels of all RoIs. "
                    "Every other channel gets exactly zero gradient. You may call "
                    "sigmoid_bce_with_logits from this file (it returns a loss and its gradient). "
                    "R = 0 gives (0.0, an empty gradient)."
                ),
                shapes=(
                    "mask_logits (R, K, M, M); labels (R,) ints in 0..K-1; mask_targets (R, M, M) "
                    "in [0, 1] (soft targets allowed). Returns (a Python float, an array shaped "
                    "and typed like mask_logits). R, K, M1 and M2 are already unpacked."
                ),
                formula="""\
                L = 1 / (number of terms) * sum_{r, i, j} [ -t log s(z) - (1 - t) log(1 - s(z)) ]
                with z = mask_logits[r, labels[r], i, j], t = mask_targets[r, i, j], s = sigmoid
                derive dL/dmask_logits for every element""",
                hint=(
                    "mask_logits[np.arange(R), labels] picks each RoI's own channel, shape "
                    "(R, M, M), and the same index writes into the gradient. Count the terms of "
                    "the mean carefully: which elements of mask_logits are in the loss at all?"
                ),
            ),
        ),
    ),
)

BY_NAME: dict[str, Exercise] = {ex.name: ex for ex in EXERCISES}


def select(names=None) -> list[Exercise]:
    """Exercises by name (a list or a comma-separated string); None or "all": every one.

    Raises ValueError naming the unknown ones.
    """
    if names is None or names == "all":
        return list(EXERCISES)
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    names = [n.strip() for n in names]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown exercise(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    return [ex for ex in EXERCISES if ex.name in names]
