"""The course kit: exercise markers, the student's copy, the autograder, the exercise notebooks.

The grader runs a student's code in a subprocess; these tests make student
copies in tmp folders, grade them, and plant the usual mistakes to check
that the grader names the failing check and the difference.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import tinymrcnn
from tinymrcnn.cli import main as cli_main
from tinymrcnn.course.exercises import BY_NAME, EXERCISES, select, stub_docstring
from tinymrcnn.course.grade import Limits, diff_arrays, format_report, grade
from tinymrcnn.course.make import (
    MarkerError,
    MissingNotebookError,
    check_regions,
    find_regions,
    make_student,
    notebooks_dir,
    regions_in_source,
    replace_stub,
    stub_source,
)
from tinymrcnn.course.runner import DecodeError, read_value, write_value

PACKAGE_PARENT = Path(tinymrcnn.__file__).resolve().parent.parent  # the solution's folder
REPO = Path(__file__).resolve().parent.parent  # the checkout (may differ: pip install .)
NOTEBOOKS = REPO / "notebooks" / "exercises"


@pytest.fixture(scope="module")
def blank(tmp_path_factory):
    """A student copy with every exercise blanked (made once for the module)."""
    out = tmp_path_factory.mktemp("student")
    info = make_student(out)  # the notebooks from the package's own copy
    return out, info


@pytest.fixture(scope="module")
def blank_report(blank):
    return grade(blank[0])


# ---------------------------------------------------------------------------
# Markers and metadata
# ---------------------------------------------------------------------------
def test_every_exercise_part_has_exactly_one_marked_region():
    regions = find_regions()
    check_regions(regions)  # raises on any mismatch
    assert sorted((r.exercise, r.function) for r in regions) == sorted(
        (ex.name, p.function) for ex in EXERCISES for p in ex.parts
    )
    assert [ex.number for ex in EXERCISES] == list(range(1, len(EXERCISES) + 1))
    for ex in EXERCISES:
        assert ex.minutes > 0 and ex.teaches and ex.title
        for p in ex.parts:
            assert p.task and p.shapes and p.formula and p.hint, (ex.name, p.function)


def test_select_names_and_errors():
    assert [e.name for e in select("mask_loss, box_coder")] == ["box_coder", "mask_loss"]
    assert len(select(None)) == len(EXERCISES)
    with pytest.raises(ValueError, match="unknown exercise.*nope"):
        select("box_coder,nope")


SOURCE = '''\
class BoxCoder:
    def encode(self, a):
        """Original docstring with the answer."""
        check(a)
        # --- exercise: box_coder ---
        s = "# --- exercise: not_a_marker ---"
        return a * 2
        # --- end exercise ---

    def other(self):
        return 1
'''


def test_stub_source_keeps_given_lines_and_indentation(tmp_path):
    path = tmp_path / "ops" / "boxes.py"
    regions = regions_in_source(SOURCE, path)
    assert [(r.exercise, r.function, r.start, r.end) for r in regions] == [("box_coder", "BoxCoder.encode", 5, 8)]
    out = stub_source(SOURCE, path, {"box_coder"})
    tree = ast.parse(out)
    encode = tree.body[0].body[0]
    assert ast.get_docstring(encode).startswith("EXERCISE 2 (box_coder")
    assert "Original docstring" not in out and "a * 2" not in out
    assert isinstance(encode.body[1], ast.Expr)  # check(a): given, kept
    assert isinstance(encode.body[-1], ast.Raise) and encode.body[-1].col_offset == 8
    assert "def other(self):\n        return 1" in out
    # not chosen: the code stays, only the marker lines go
    kept = stub_source(SOURCE, path, set())
    assert "return a * 2" in kept and "--- end exercise ---" not in kept


@pytest.mark.parametrize(
    "bad, message",
    [
        (SOURCE.replace("        # --- end exercise ---\n", ""), "no '# --- end exercise ---'"),
        (
            SOURCE.replace("        # --- exercise: box_coder ---\n", "    # --- exercise: box_coder ---\n"),
            "body's indentation",
        ),
        (SOURCE.replace("# --- exercise: box_coder ---", "# --- exercise box_coder ---"), "malformed"),
        ("# --- exercise: x ---\nA = 1\n# --- end exercise ---\n", "not inside a function"),
    ],
)
def test_marker_errors_are_reported(bad, message):
    with pytest.raises(MarkerError, match=message):
        regions_in_source(bad, Path("f.py"))


def test_stub_docstrings_state_task_shapes_formula_hint():
    for ex in EXERCISES:
        for p in ex.parts:
            text = "\n".join(stub_docstring(ex, p))
            for section in ("Shapes:", "Formula:", "Hint:", ex.notebook):
                assert section in text, (ex.name, p.function, section)
            assert '"""' not in text


# ---------------------------------------------------------------------------
# The student's copy
# ---------------------------------------------------------------------------
def _function(tree, qualname):
    node = tree
    for name in qualname.split("."):
        node = next(n for n in node.body if getattr(n, "name", None) == name)
    return node


def test_student_copy_has_a_stub_for_every_part_and_no_solution(blank):
    out, info = blank
    assert sorted(info["exercises"]) == sorted(BY_NAME)
    by_path = {}
    for r in find_regions():
        by_path.setdefault(r.path, []).append(r)
    for path, regions in by_path.items():
        rel = path.relative_to(PACKAGE_PARENT / "tinymrcnn")
        solution = path.read_text().splitlines()
        student = (out / "tinymrcnn" / rel).read_text()
        tree = ast.parse(student)
        inside = {i for r in regions for i in range(r.start - 1, r.end)}
        outside = {line.strip() for i, line in enumerate(solution) if i not in inside}
        given = "\n".join(line for ex in EXERCISES for p in ex.parts for line in stub_docstring(ex, p))
        for r in regions:
            fn = _function(tree, r.function)
            raise_ = fn.body[-1]
            assert isinstance(raise_, ast.Raise), r.function
            assert f"Exercise {r.exercise}: write {r.function}" in ast.unparse(raise_)
            assert ast.get_docstring(fn).startswith(f"EXERCISE {BY_NAME[r.exercise].number} ({r.exercise}")
            # no line of the solution's region survives (unless the same line exists elsewhere)
            leaked = [
                line
                for line in solution[r.start : r.end - 1]
                if len(line.strip()) > 20
                and line.strip() in student
                and line.strip() not in outside
                and line.strip() not in given
            ]
            assert not leaked, (r.function, leaked[:3])
    assert not (out / "tinymrcnn" / "course" / "grade.py").exists()
    assert not (out / "tinymrcnn" / "course" / "runner.py").exists()
    assert (out / "README.md").read_text().count("| ") > len(EXERCISES)


def test_student_copy_notebooks_are_copied_without_outputs(blank):
    out, info = blank
    if not NOTEBOOKS.is_dir():
        pytest.skip("no notebooks/exercises next to the tests")
    assert info["missing_notebooks"] == []
    for ex in EXERCISES:
        nb = json.loads((out / "notebooks" / "exercises" / ex.notebook).read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_the_notebooks_ship_with_the_package():
    # tinymrcnn/course/notebooks (package data, a link to notebooks/exercises here) holds them all
    assert notebooks_dir() == Path(tinymrcnn.__file__).resolve().parent / "course" / "notebooks"
    assert sorted(p.name for p in notebooks_dir().glob("*.ipynb")) == sorted(ex.notebook for ex in EXERCISES)
    text = (REPO / "pyproject.toml").read_text()
    assert '"tinymrcnn.course" = ["notebooks/*.ipynb"]' in text


def test_a_missing_notebook_is_an_error(tmp_path, capsys):
    (tmp_path / "nbs").mkdir()
    out = tmp_path / "handout"
    with pytest.raises(MissingNotebookError, match="no exercise notebook 02_box_coder.ipynb in "):
        make_student(out, "box_coder", notebooks=tmp_path / "nbs", check_import=False)
    assert not out.exists()  # checked before anything is written
    with pytest.raises(SystemExit) as e:
        cli_main(["course", "make-student", str(out), "--exercises", "box_coder", "--notebooks", str(tmp_path / "nbs")])
    assert e.value.code != 0 and "\n" not in str(e.value.code)
    assert str(e.value.code).startswith("tinymrcnn course make-student: no exercise notebook 02_box_coder.ipynb")
    info = make_student(out, "box_coder", notebooks=False, check_import=False)  # on purpose: none
    assert info["notebooks"] == [] and not (out / "notebooks").exists()


def test_the_reference_stands_in_for_the_other_exercises_stubs(blank, tmp_path):
    out, _ = blank
    assert (out / "tinymrcnn" / "course" / "reference" / "ops" / "boxes.py").is_file()
    code = """
import importlib
import numpy as np
from tinymrcnn.course.notebook import fallback_note, use_reference_for_stubs
from tinymrcnn.model import proposals, rpn
from tinymrcnn.ops import boxes
roi_align = importlib.import_module("tinymrcnn.ops.roi_align")
done = use_reference_for_stubs(own="roi_align_backward")
print(sorted(done))
a = np.array([[10.0, 20.0, 50.0, 40.0]])
print(boxes.BoxCoder().encode(a + 10, a).round(3).tolist())
print(rpn.generate_proposals is proposals.generate_proposals, "_reference_" in rpn.generate_proposals.__module__)
print(len(roi_align.roi_sample_points((0, 0, 8, 8), 2, 1.0, 2, True)[0]))   # used by the student's backward
try:
    roi_align.roi_align_backward_reference(np.ones((1, 1, 1, 1)), np.ones((1, 1, 5, 5)),
                                           np.array([[0, 1.0, 1, 3, 3]]), 1)
except NotImplementedError as e:
    print("own:", e)
print(fallback_note())
"""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(out), NUMBA_DISABLE_JIT="1")
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "['box_coder', 'conv2d_backward', 'mask_loss', 'proposals', 'roi_align_forward']"
    assert lines[1] == "[[0.25, 0.5, 0.0, 0.0]]"
    assert lines[2] == "True True" and lines[3] == "2"
    assert lines[4] == "own: Exercise roi_align_backward: write roi_align_backward_reference"
    assert lines[5].startswith(
        "note: not written yet, so the reference solution runs for: exercise 1 "
        "conv2d_backward (conv2d_backward_reference); exercise 2 box_coder"
    )
    # no reference in the copy: the note says what is needed first
    bare = tmp_path / "bare"
    make_student(bare, "box_coder,mask_loss", reference=False, notebooks=False, check_import=False)
    assert not (bare / "tinymrcnn" / "course" / "reference").exists()
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tinymrcnn.course.notebook import *\nuse_reference_for_stubs('mask_loss'); print(fallback_note())",
        ],
        cwd=tmp_path,
        env=dict(env, PYTHONPATH=str(bare)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.stdout.strip() == (
        "note: not written yet and no reference in this copy: exercise 2 box_coder "
        "(BoxCoder.encode, BoxCoder.decode): the cells that train the model need "
        "those first."
    ), res.stdout + res.stderr


def test_make_student_refuses_to_overwrite(blank):
    with pytest.raises(FileExistsError, match="--force"):
        make_student(blank[0], "mask_loss", check_import=False)


# ---------------------------------------------------------------------------
# Grading: blank, solution, planted mistakes
# ---------------------------------------------------------------------------
def test_blank_copy_scores_zero_with_one_clear_message_per_exercise(blank_report):
    text = format_report(blank_report)
    assert [r.exercise.name for r in blank_report.exercises] == [ex.name for ex in EXERCISES]
    assert blank_report.total == 0
    for r in blank_report.exercises:
        assert r.score == 0 and r.passed == 0 and len(r.checks) >= 6
        # every check stopped at a NotImplementedError of this exercise or of one it requires
        for c in r.checks:
            assert c.error[0] == "NotImplementedError", (r.exercise.name, c.name, c.message)
        block = text.split(f"\n{r.exercise.name}: 0 of {len(r.checks)} checks pass\n")[1].split("\n\n")[0]
        assert block.startswith("  not implemented yet: every check stops at a raise NotImplementedError"), block
    total = [line for line in text.splitlines() if line.strip().startswith("total")]
    assert len(total) == 1 and total[0].split()[1] == "0%", total


def test_the_solution_scores_100_percent():
    report = grade(PACKAGE_PARENT)
    failed = [(r.exercise.name, c.name, c.message) for r in report.exercises for c in r.checks if not c.passed]
    assert not failed, failed
    assert report.total == 100.0
    assert sum(len(r.checks) for r in report.exercises) >= 45


def _planted(tmp_path, exercise, bodies):
    out = tmp_path / f"planted_{exercise}"
    make_student(out, exercise, notebooks=False)
    for function, body in bodies.items():
        replace_stub(out, exercise, function, body)
    report = grade(out, exercise)
    (result,) = report.exercises
    return {c.name: c for c in result.checks}, result, format_report(report)


def test_planted_roi_align_backward_without_one_over_count(tmp_path):
    body = """
    dx = np.zeros((N, C, H, W), dy.dtype)
    for k, roi in enumerate(r):
        b = int(roi[0])
        ys, xs, count = roi_sample_points(roi[1:], dy.shape[2:], spatial_scale, sampling_ratio, aligned)
        for p in range(dy.shape[2]):
            for q in range(dy.shape[3]):
                for y in ys[p]:
                    for xx in xs[q]:
                        for ty, tx, w in bilinear_reference(y, xx, H, W):
                            dx[b, :, ty, tx] += dy[k, :, p, q] * w          # the slip: no / count
    return dx
    """
    checks, result, text = _planted(tmp_path, "roi_align_backward", {"roi_align_backward_reference": body})
    fixed = checks["avg, 2x2 samples per bin (count = 4), aligned=True"]
    assert not fixed.passed
    assert "constant factor ~4" in fixed.message and "did you divide by count" in fixed.message
    assert "expected" in fixed.message and "got" in fixed.message and "at element (" in fixed.message
    adaptive = checks["adaptive sampling, 2 images, overlapping RoIs, aligned=False"]
    assert "the gradient of each bin's sum instead of its average" in adaptive.message
    fd = checks["finite differences of roi_align (float64, relative error <= 1e-6)"]
    assert "disagrees with finite differences of roi_align" in fd.message
    assert checks["no RoIs (K = 0): a zero gradient"].passed
    assert 0 < result.score < 100
    assert "FAIL avg, 2x2 samples per bin (count = 4), aligned=True: dx:" in text


SAMPLE_POINTS_NO_OFFSET = """
offset = 0.0                                   # the slip: no half-pixel shift when aligned
start_w, start_h = x1 * spatial_scale - offset, y1 * spatial_scale - offset
roi_w, roi_h = (x2 - x1) * spatial_scale, (y2 - y1) * spatial_scale
if not aligned:
    roi_w, roi_h = (1.0 if roi_w < 1.0 else roi_w), (1.0 if roi_h < 1.0 else roi_h)
bin_h, bin_w = roi_h / ph_, roi_w / pw_

def grid(roi, pooled):
    if sampling_ratio > 0:
        return sampling_ratio
    g = roi / pooled
    return math.ceil(g) if 0.0 < g < 2.0 ** 31 else 0

grid_h, grid_w = grid(roi_h, ph_), grid(roi_w, pw_)
ys = np.array([[start_h + p * bin_h + (i + 0.5) * bin_h / grid_h for i in range(grid_h)]
               for p in range(ph_)]).reshape(ph_, grid_h)
xs = np.array([[start_w + p * bin_w + (i + 0.5) * bin_w / grid_w for i in range(grid_w)]
               for p in range(pw_)]).reshape(pw_, grid_w)
return ys, xs, max(grid_h * grid_w, 1)
"""

BILINEAR = """
if not (-1.0 <= y <= height and -1.0 <= x <= width):
    return []
y, x = max(y, 0.0), max(x, 0.0)
y0, x0 = min(int(y), height - 1), min(int(x), width - 1)
y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
ly, lx = (y - y0 if y0 < height - 1 else 0.0), (x - x0 if x0 < width - 1 else 0.0)
return [(y0, x0, (1 - ly) * (1 - lx)), (y0, x1, (1 - ly) * lx), (y1, x0, ly * (1 - lx)), (y1, x1, ly * lx)]
"""

POOL = """
out = np.zeros((len(r), x.shape[1], ph_, pw_), x.dtype)
for k, roi in enumerate(r):
    ys, xs, count = roi_sample_points(roi[1:], (ph_, pw_), spatial_scale, sampling_ratio, aligned)
    for p in range(ph_):
        for q in range(pw_):
            values, _ = _bin_samples(x[int(roi[0])], ys[p], xs[q])
            if len(values):
                out[k, :, p, q] = values.sum(axis=0) / count if mode == "avg" else values.max(axis=0)
return out
"""


def test_planted_half_pixel_offset_in_roi_align_forward(tmp_path):
    checks, result, text = _planted(
        tmp_path,
        "roi_align_forward",
        {"roi_sample_points": SAMPLE_POINTS_NO_OFFSET, "bilinear_reference": BILINEAR, "roi_align_reference": POOL},
    )
    # aligned=False does not need the offset: those checks pass with this code
    for name in (
        "RoIAlign's known answer (detectron2's test), aligned=False",
        "roi_sample_points: the walkthrough's 200 x 145 px RoI at stride 32, 3x3 bins, 2x2 points",
        "bilinear_reference: edges, out of range and NaN",
        'mode="max": the largest sample of each bin',
    ):
        assert checks[name].passed, (name, checks[name].message)
    known = checks["RoIAlign's known answer (detectron2's test), aligned=True"]
    assert not known.passed
    assert "your result equals the aligned=False answer" in known.message
    assert "half-pixel offset" in known.message and "expected 4.5, got 7.5" in known.message
    pts = checks["roi_sample_points: adaptive grid, aligned=True, (3, 4) bins"]
    assert "your points are those of aligned=False" in pts.message
    assert 0 < result.score < 100
    # the pooled outputs fail because the points do: one line says so, the points' failure is listed
    assert known.blocked_by == "roi_sample_points"
    assert "fix roi_sample_points first" in text and "FAIL RoIAlign's known answer" not in text
    assert "FAIL roi_sample_points: adaptive grid, aligned=True, (3, 4) bins:" in text


SAMPLE_POINTS = SAMPLE_POINTS_NO_OFFSET.replace(
    "offset = 0.0                                   # the slip: no half-pixel shift when aligned",
    "offset = 0.5 if aligned else 0.0",
)
SAMPLE_POINT_CHECKS = (
    "roi_sample_points: the walkthrough's 200 x 145 px RoI at stride 32, 3x3 bins, 2x2 points",
    "roi_sample_points: adaptive grid, aligned=True, (3, 4) bins",
    "roi_sample_points: a NaN box gets no sampling points (adaptive grid)",
)


def test_a_wrong_bilinear_weight_names_the_function_to_fix_first(tmp_path):
    swapped = BILINEAR.replace(
        "(y0, x1, (1 - ly) * lx), (y1, x0, ly * (1 - lx))", "(y0, x1, ly * (1 - lx)), (y1, x0, (1 - ly) * lx)"
    )  # the slip
    assert swapped != BILINEAR
    checks, result, text = _planted(
        tmp_path,
        "roi_align_forward",
        {"roi_sample_points": SAMPLE_POINTS, "bilinear_reference": swapped, "roi_align_reference": POOL},
    )
    assert all(checks[n].passed for n in SAMPLE_POINT_CHECKS), [checks[n].message for n in SAMPLE_POINT_CHECKS]
    inside = checks["bilinear_reference: points inside the map"]
    assert not inside.passed and "expected taps" in inside.message
    # the failures of roi_align_reference follow from it: named once, not listed
    follow = [c for c in checks.values() if c.blocked_by]
    assert len(follow) >= 5 and all(c.parts == ("roi_align_reference",) for c in follow)
    assert "  fix bilinear_reference first: " in text and "of roi_align_reference call it" in text
    assert text.index("fix bilinear_reference first") < text.index("FAIL bilinear_reference")
    for c in follow:
        assert f"FAIL {c.name}:" not in text
    # no fixed hint blames something else (count, the half-pixel offset, empty bins)
    assert "[hint:" not in text and not re.search(r"\bcount\b", text) and "half-pixel" not in text, text
    assert not any("[hint:" in c.message for c in checks.values())


def test_an_exception_in_provided_code_is_traced_to_the_students_function(tmp_path):
    off_by_one = BILINEAR.replace(
        "y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)", "y1, x1 = y0 + 1, x0 + 1"
    )  # the slip
    assert off_by_one != BILINEAR
    checks, result, text = _planted(
        tmp_path,
        "roi_align_forward",
        {"roi_sample_points": SAMPLE_POINTS, "bilinear_reference": off_by_one, "roi_align_reference": POOL},
    )
    raised = [c for c in checks.values() if c.error and c.error[0] == "IndexError"]
    assert raised, [c.message for c in checks.values()]
    for c in raised:
        assert "in _bin_samples] -- in provided code, called from your roi_align_reference (" in c.message
        assert c.blocked_by == "bilinear_reference"
    assert "outside the 4x5 map" in checks["bilinear_reference: edges, out of range and NaN"].message
    assert "fix bilinear_reference first" in text


MASK_LOSS_OVER_ALL_CHANNELS = """
grad = np.zeros_like(mask_logits)
if R == 0:
    return 0.0, grad
rows = np.arange(R)
loss, g = sigmoid_bce_with_logits(mask_logits[rows, labels], mask_targets, reduction="sum")
n = R * K * M1 * M2                            # the slip: all K channels counted in the mean
grad[rows, labels] = g / n
return loss / n, grad
"""

MASK_LOSS_BCE_ON_EVERY_CHANNEL = """
t = np.broadcast_to(mask_targets[:, None], mask_logits.shape).astype(mask_logits.dtype)
return sigmoid_bce_with_logits(mask_logits, t)   # the slip: every channel scored
"""


def test_planted_mask_loss_averaged_over_all_channels(tmp_path):
    checks, result, text = _planted(tmp_path, "mask_loss", {"mask_loss": MASK_LOSS_OVER_ALL_CHANNELS})
    loss = checks["loss value"]
    assert not loss.passed
    assert "constant factor ~0.25" in loss.message and "all K channels" in loss.message
    assert "R*M*M terms" in loss.message
    assert "constant factor ~0.25" in checks["gradient on each RoI's ground-truth channel"].message
    # consistent with itself, and zero where it should be: those checks pass
    assert checks["exactly zero gradient on the other K - 1 channels"].passed
    assert checks["your gradient matches finite differences of your loss (float64, relative error <= 1e-6)"].passed
    assert checks["no RoIs (R = 0): loss 0 and an empty gradient"].passed
    assert 0 < result.score < 100


def test_planted_mask_loss_on_every_channel(tmp_path):
    checks, _, _ = _planted(tmp_path, "mask_loss", {"mask_loss": MASK_LOSS_BCE_ON_EVERY_CHANNEL})
    assert "your result equals the BCE over all K channels" in checks["loss value"].message
    zero = checks["exactly zero gradient on the other K - 1 channels"].message
    assert "expected exactly 0" in zero and "is not in the loss" in zero


def test_a_crash_in_a_required_exercise_points_there(tmp_path):
    # proposals calls the box coder: with decode still blank, the proposal checks name the box coder
    out = tmp_path / "dep"
    make_student(out, "box_coder,proposals", notebooks=False, check_import=False)
    replace_stub(
        out, "proposals", "generate_proposals", "box_coder.decode(deltas[0][0], anchors[0])\nreturn [], [], []"
    )
    report = grade(out, "box_coder,proposals")
    prop = report.exercises[1]
    assert prop.exercise.name == "proposals" and prop.score == 0
    for c in prop.checks:
        assert "raised NotImplementedError: Exercise box_coder: write BoxCoder.decode" in c.message
        assert "this is exercise box_coder's code: finish that one first" in c.message
    text = format_report(report)
    assert "note: this exercise calls the functions of box_coder" in text


# ---------------------------------------------------------------------------
# Grading untrusted code: limits, and no pickle between the processes
# ---------------------------------------------------------------------------
def _student_with(tmp_path, name, body, exercises="box_coder,mask_loss"):
    out = tmp_path / name
    make_student(out, exercises, notebooks=False, check_import=False)
    replace_stub(out, "mask_loss", "mask_loss", body)
    return out


def test_an_endless_loop_is_stopped_by_the_cpu_limit(tmp_path):
    out = _student_with(tmp_path, "loop", "while True:\n    pass")
    limits = Limits(wall_seconds=60, cpu_seconds=2, restarts=1)
    report = grade(out, "mask_loss,box_coder", limits=limits)
    coder, loop = report.exercises
    assert loop.exercise.name == "mask_loss" and loop.score == 0
    first = loop.checks[0].message
    assert first.startswith("exceeded the time limit (2 s of CPU time)"), first
    assert all("exceeded the time limit" in c.message for c in loop.checks), [c.message for c in loop.checks]
    # the other exercise runs in its own interpreter and is unaffected
    assert coder.score == 0 and all(c.error[0] == "NotImplementedError" for c in coder.checks)
    assert "exceeded the time limit (2 s of CPU time)" in format_report(report)


def test_a_call_that_sleeps_is_stopped_by_the_wall_clock(tmp_path):
    out = _student_with(tmp_path, "sleep", "import time\ntime.sleep(600)")
    report = grade(out, "mask_loss", limits=Limits(wall_seconds=3, restarts=0))
    (loop,) = report.exercises
    assert loop.checks[0].message.startswith("exceeded the time limit (3 s wall-clock)"), loop.checks[0].message
    assert all("exceeded the time limit" in c.message for c in loop.checks)


def test_an_unbounded_allocation_is_stopped_by_the_memory_limit(tmp_path):
    out = _student_with(tmp_path, "alloc", "chunks = []\nwhile True:\n    chunks.append(np.ones(1 << 20))")
    report = grade(out, "mask_loss", limits=Limits(wall_seconds=60, memory_mb=800))
    (alloc,) = report.exercises
    assert alloc.score == 0
    for c in alloc.checks:
        assert c.message.startswith("exceeded the memory limit (800 MiB)"), c.message
        assert "losses.py" in c.message and "in mask_loss" in c.message  # where it was allocating


def test_the_reference_is_off_while_grading(tmp_path):
    # a handout's course/reference/ holds the answers; the student's package cannot use them when graded
    body = (
        "from tinymrcnn.course.exercises import BY_NAME\n"
        "from tinymrcnn.course.notebook import _reference_module\n"
        "return _reference_module(BY_NAME['mask_loss']).mask_loss(mask_logits, labels, mask_targets)"
    )
    out = _student_with(tmp_path, "ref", body)
    assert (out / "tinymrcnn" / "course" / "reference" / "losses.py").is_file()
    (res,) = grade(out, "mask_loss").exercises
    assert res.score == 0
    assert all(
        "raised AttributeError: 'NoneType' object has no attribute 'mask_loss'" in c.message for c in res.checks
    ), [c.message for c in res.checks]


PLANT = """
import json, os, pickle, shutil, sys

class Payload:
    def __reduce__(self):                      # unpickling this runs code
        return (exec, ("open(%(marker)r, 'w').write('ran')",))

results = sys.argv[3]                          # the runner's results folder
for i in range(40):
    stem = os.path.join(results, str(i))
    with open(stem + ".pkl", "wb") as f:       # the old format: read with pickle.load
        pickle.dump({"ok": True, "value": Payload()}, f)
    objects = np.empty(1, dtype=object)
    objects[0] = Payload()
    if i %% 2:                                  # an object array: pickled inside the .npz
        np.savez(stem + ".npz", a0=objects)
        value = {"__array__": "a0"}
    else:                                       # a tag the grader does not know
        np.savez(stem + ".npz", a0=np.zeros(1))
        value = {"__reduce__": "exec"}
    with open(stem + ".json", "w") as f:
        json.dump({"arrays": ["a0"], "value": {"__dict__": {"ok": True, "value": value}}}, f)
shutil.copyfile(os.path.join(results, "0.pkl"), %(planted)r)
os._exit(0)
"""


def test_a_crafted_result_file_is_rejected_and_runs_nothing(tmp_path):
    import pickle

    marker, planted = tmp_path / "code-ran", tmp_path / "planted.pkl"
    out = _student_with(tmp_path, "crafted", PLANT % {"marker": str(marker), "planted": str(planted)})
    report = grade(out, "mask_loss", limits=Limits(wall_seconds=60, restarts=0))
    (res,) = report.exercises
    assert planted.exists()  # the student's code did plant its files
    assert not marker.exists()  # ... and the grader executed none of it
    assert res.score == 0
    for c in res.checks:
        assert c.message.startswith("rejected the result file of this call"), c.message
    messages = " ".join(c.message for c in res.checks)
    assert "Object arrays cannot be loaded" in messages and "unknown tag" in messages
    with open(planted, "rb") as f:  # the planted file is live: pickle.load would have run it
        pickle.load(f)
    assert marker.read_text() == "ran"


def test_results_round_trip_through_json_and_npz(tmp_path):
    value = {
        "ok": True,
        "value": (
            np.arange(6.0).reshape(2, 3),
            [np.float32(1.5), 2, None, "s", True],
            {"counts": {"topk": 3}},
            np.zeros((0, 5)),
            1 + 2j,
            float("nan"),
            {"__unplain__": "Foo", "repr": "Foo()"},
        ),
    }
    write_value(str(tmp_path / "r"), value)
    back = read_value(str(tmp_path / "r"))
    a, items, d, empty, z, nan, odd = back["value"]
    assert isinstance(back["value"], tuple) and np.array_equal(a, value["value"][0]) and a.dtype == np.float64
    assert items[0] == 1.5 and items[0].dtype == np.float32 and items[1:] == [2, None, "s", True]
    assert d == {"counts": {"topk": 3}} and empty.shape == (0, 5) and z == 1 + 2j and np.isnan(nan)
    assert odd == {"__unplain__": "Foo", "repr": "Foo()"}
    (tmp_path / "link.json").symlink_to(tmp_path / "r.json")
    with pytest.raises(DecodeError, match="not a regular file"):
        read_value(str(tmp_path / "link"))


def test_result_arrays_that_unpack_too_large_are_refused(tmp_path, monkeypatch):
    from tinymrcnn.course import runner

    np.savez_compressed(tmp_path / "z.npz", a0=np.zeros(100_000))  # 800 kB unpacked, a few kB packed
    (tmp_path / "z.json").write_text(json.dumps({"arrays": ["a0"], "value": {"__array__": "a0"}}))
    assert read_value(str(tmp_path / "z")).shape == (100_000,)
    monkeypatch.setattr(runner, "MAX_NPZ_BYTES", 100_000)
    with pytest.raises(DecodeError, match="unpack to more than"):
        read_value(str(tmp_path / "z"))


def test_diff_arrays_messages():
    e = np.arange(1.0, 7.0).reshape(2, 3)
    assert diff_arrays(e, e.copy(), "a") is None
    assert "has shape (3, 2), expected (2, 3)" in diff_arrays(e, e.T.copy(), "a")
    assert "dtype float32, expected float64" in diff_arrays(e, e.astype(np.float32), "a")
    msg = diff_arrays(e, 4 * e, "dx", factor_hints=[(4.0, "did you divide by count?")])
    assert "6 of 6 elements differ" in msg and "element (1, 2): expected 6, got 24" in msg
    assert "constant factor ~4: did you divide by count?" in msg
    g = e.copy()
    g[0, 1] = np.nan
    assert "non-finite" in diff_arrays(e, g, "dx")
    assert "all zeros" in diff_arrays(e, np.zeros_like(e), "dx")


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------
def test_cli_list_make_and_grade(tmp_path, capsys):
    cli_main(["course", "list"])
    assert "roi_align_forward" in capsys.readouterr().out
    out = tmp_path / "cli"
    cli_main(["course", "make-student", str(out), "--exercises", "box_coder"])
    assert "BoxCoder.decode" in capsys.readouterr().out
    report_json = tmp_path / "r.json"
    cli_main(["course", "grade", str(out), "--exercises", "box_coder", "--json", str(report_json)])
    text = capsys.readouterr().out
    assert "box_coder" in text and "0%" in text
    data = json.loads(report_json.read_text())
    assert data["total"] == 0 and data["exercises"][0]["name"] == "box_coder"
    with pytest.raises(SystemExit) as e:
        cli_main(["course", "grade", str(tmp_path / "missing")])
    assert e.value.code == 2
    assert "no tinymrcnn package" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The exercise notebooks run headless against the solution
# ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("exercise", [ex.name for ex in EXERCISES])
def test_exercise_notebook_runs_against_the_solution(exercise, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = NOTEBOOKS / BY_NAME[exercise].notebook
    assert path.is_file(), f"missing notebook {path}"
    nb = nbformat.read(path, as_version=4)
    assert all(c.get("outputs", []) == [] for c in nb.cells if c.cell_type == "code"), "store notebooks stripped"
    monkeypatch.setenv("TINYMRCNN_NOTEBOOK_SMALL", "1")
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    out = "".join(o.get("text", "") for o in outputs)
    assert "tinymrcnn from" in out and "short run: True" in out
    assert "note: not written yet" not in out  # the solution: nothing falls back
    _assert_figures_shown(nb)


def _assert_figures_shown(nb):
    """Every cell that shows a figure has an image output; no figure shows only as '<Figure size ...>'."""
    cells = [c for c in nb.cells if c.cell_type == "code"]
    drawing = [c for c in cells if "plt.show()" in c.source or "show(" in c.source]
    assert drawing
    for c in drawing:
        assert any("image/png" in o.get("data", {}) for o in c.get("outputs", [])), c.source
    for o in (o for c in cells for o in c.get("outputs", [])):
        data = o.get("data", {})
        assert "<Figure" not in str(data.get("text/plain", "")) or "image/png" in data


def _solution_body(exercise, function):
    """The solution's code of one exercise region, dedented (what a student writes)."""
    import textwrap

    (r,) = [r for r in find_regions() if (r.exercise, r.function) == (exercise, function)]
    return textwrap.dedent("\n".join(r.path.read_text().splitlines()[r.start : r.end - 1]))


@pytest.mark.slow
def test_exercise_1_alone_runs_its_notebook_to_the_end(tmp_path, monkeypatch):
    """Only exercise 1 written: the other exercises' stubs fall back to the reference, with a note."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    out = tmp_path / "handout"
    make_student(out)
    replace_stub(
        out,
        "conv2d_backward",
        "conv2d_backward_reference",
        _solution_body("conv2d_backward", "conv2d_backward_reference"),
    )
    path = out / "notebooks" / "exercises" / BY_NAME["conv2d_backward"].notebook
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("TINYMRCNN_NOTEBOOK_SMALL", "1")
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"tinymrcnn from {out / 'tinymrcnn'}" in text
    assert "your conv2d backward equals the fast kernel" in text
    note = "note: not written yet, so the reference solution runs for: exercise 2 box_coder"
    assert text.count(note) == 2, text  # once at the start, once in the training cell
    assert "conv2d_backward (" not in text.split(note)[1].split("\n")[0]  # its own exercise is not replaced
    _assert_figures_shown(nb)


@pytest.mark.slow
def test_the_wheel_holds_the_exercise_notebooks(tmp_path):
    import subprocess
    import sys
    import zipfile

    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if res.returncode != 0:
        pytest.skip(f"could not build a wheel here: {res.stderr[-300:]}")
    (wheel,) = tmp_path.glob("tinymrcnn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for ex in EXERCISES:
        assert f"tinymrcnn/course/notebooks/{ex.notebook}" in names


def test_the_exercises_follow_the_notebooks_test_mode(monkeypatch):
    """TINYMRCNN_NOTEBOOK_MODE=test shortens the exercise notebooks' training as the old switch does."""
    from tinymrcnn.course.notebook import notebook_steps

    monkeypatch.delenv("TINYMRCNN_NOTEBOOK_SMALL", raising=False)
    monkeypatch.delenv("TINYMRCNN_NOTEBOOK_MODE", raising=False)
    assert notebook_steps(30) == 30
    monkeypatch.setenv("TINYMRCNN_NOTEBOOK_MODE", "test")
    assert notebook_steps(30) == 2
    monkeypatch.setenv("TINYMRCNN_NOTEBOOK_MODE", "default")
    monkeypatch.setenv("TINYMRCNN_NOTEBOOK_SMALL", "1")
    assert notebook_steps(30) == 30  # an explicit mode wins
    monkeypatch.delenv("TINYMRCNN_NOTEBOOK_MODE")
    assert notebook_steps(30) == 2
