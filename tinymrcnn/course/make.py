"""Make a student's copy of the package: exercise bodies replaced by stubs.

``make_student(out_dir)`` copies the whole ``tinymrcnn/`` tree (so that every
stage around the exercises keeps working), then, in each function that holds
an exercise region (``# --- exercise: NAME ---`` ... ``# --- end exercise ---``,
see :mod:`tinymrcnn.course.exercises`):

* the region becomes ``raise NotImplementedError("Exercise NAME: ...")`` at the
  body's indentation; lines of the body above the region (argument checks)
  stay, as the given part;
* the function's docstring becomes the exercise's task text (task, shapes,
  formula, hint), so the original docstring's derivation does not give the
  answer away.

Regions of exercises that were not chosen keep their code; only their marker
lines are dropped. Markers are found as comment *tokens* (a marker inside a
string does not count) and functions with :mod:`ast`, so the edit is exact
and every rewritten file is compiled before it is written. The grader
(``grade.py``, ``runner.py``) is left out of the copy: it is the
instructor's. Finally the copy is imported in a fresh interpreter.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

from .exercises import BY_NAME, END_MARKER, START_MARKER, Exercise, select, stub_docstring

# The instructor's side of the kit: not copied into a student's package.
INSTRUCTOR_ONLY = ("course/grade.py", "course/runner.py")
# Written elsewhere in the copy (the notebooks, stripped, go to notebooks/exercises/), or made anew.
NOT_COPIED = ("course/notebooks", "course/reference")


class MarkerError(ValueError):
    """Exercise markers that are unpaired, misplaced or not inside one function."""


@dataclass(frozen=True)
class Region:
    """One fenced exercise region in a source file (line numbers 1-based)."""

    path: Path  # the .py file
    exercise: str
    function: str  # qualified name of the enclosing function ("BoxCoder.encode")
    start: int  # line of the start marker
    end: int  # line of the end marker
    indent: str  # the function body's indentation
    def_line: int  # line of the ``def``
    doc_span: tuple[int, int] | None  # first and last line of the docstring, if any
    first_body_line: int  # line of the first statement of the body


def package_dir() -> Path:
    """The folder of the installed (solution) package."""
    return Path(__file__).resolve().parent.parent


def _functions(tree: ast.AST):
    """(qualname, node) of every function, classes and enclosing functions in the name."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out.append((name, child))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def regions_in_source(source: str, path: Path) -> list[Region]:
    """Every exercise region of one file's source text."""
    markers = []  # (line, col, name or None for an end marker)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        m_start, m_end = START_MARKER.match(tok.string), END_MARKER.match(tok.string)
        if not (m_start or m_end):
            if re.match(r"#\s*---\s*(end\s+)?exercise", tok.string):
                raise MarkerError(
                    f"{path}:{tok.start[0]}: malformed exercise marker {tok.string!r} "
                    "(expected '# --- exercise: NAME ---')"
                )
            continue
        if tok.line[: tok.start[1]].strip():
            raise MarkerError(f"{path}:{tok.start[0]}: an exercise marker must be alone on its line")
        markers.append((tok.start[0], tok.start[1], m_start.group(1) if m_start else None))
    if not markers:
        return []
    functions = _functions(ast.parse(source, str(path)))
    lines = source.splitlines()
    regions = []
    it = iter(markers)
    for start, col, name in it:
        if name is None:
            raise MarkerError(f"{path}:{start}: '# --- end exercise ---' without a start marker")
        try:
            end, _, end_name = next(it)
        except StopIteration:
            raise MarkerError(f"{path}:{start}: exercise {name!r} has no '# --- end exercise ---'") from None
        if end_name is not None:
            raise MarkerError(
                f"{path}:{end}: exercise {end_name!r} starts inside exercise {name!r} "
                f"(line {start}); regions cannot nest"
            )
        inside = [(q, f) for q, f in functions if f.lineno < start <= f.end_lineno]
        if not inside:
            raise MarkerError(f"{path}:{start}: exercise {name!r} is not inside a function")
        qualname, func = max(inside, key=lambda qf: qf[1].lineno)  # the innermost
        body = func.body
        indent = " " * body[0].col_offset
        if col != body[0].col_offset:
            raise MarkerError(
                f"{path}:{start}: the marker of {name!r} must sit at the body's "
                f"indentation of {qualname} ({body[0].col_offset} spaces)"
            )
        # Everything between the function's last statement and the end marker must be blank or comments.
        for ln in range(func.end_lineno + 1, end):
            text = lines[ln - 1].strip()
            if text and not text.startswith("#"):
                raise MarkerError(f"{path}:{end}: the end marker of {name!r} is not inside {qualname}")
        for _, f in functions:
            nested = func.lineno < f.lineno and f.end_lineno <= func.end_lineno
            if f is not func and not nested and start < f.lineno <= end:
                raise MarkerError(f"{path}:{start}: exercise {name!r} spans more than one function")
        doc = None
        first = body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            doc = (first.lineno, first.end_lineno)
            if lines[first.lineno - 1][: first.col_offset].strip():
                raise MarkerError(f"{path}:{first.lineno}: put {qualname}'s docstring on its own lines")
        regions.append(Region(path, name, qualname, start, end, indent, func.lineno, doc, first.lineno))
    names = [(r.exercise, r.function) for r in regions]
    if len(set(names)) != len(names):
        raise MarkerError(f"{path}: a function holds two regions of one exercise: {names}")
    return regions


def find_regions(root: Path | None = None) -> list[Region]:
    """All exercise regions of the package under ``root`` (default: the installed one)."""
    root = Path(root) if root is not None else package_dir()
    out = []
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        if "exercise" in text and "---" in text:
            out.extend(regions_in_source(text, path))
    return out


def check_regions(regions: list[Region], exercises=None) -> None:
    """Every part of every chosen exercise has exactly one region, in the right module; and vice versa."""
    found = {(r.exercise, r.function): r for r in regions}
    for r in regions:
        if r.exercise not in BY_NAME:
            raise MarkerError(f"{r.path}:{r.start}: unknown exercise {r.exercise!r} (not in course/exercises.py)")
        ex = BY_NAME[r.exercise]
        if r.function not in [p.function for p in ex.parts]:
            raise MarkerError(
                f"{r.path}:{r.start}: exercise {r.exercise!r} has no part for {r.function}; "
                "add a Part to course/exercises.py"
            )
        if not r.path.as_posix().endswith(ex.path):
            raise MarkerError(f"{r.path}:{r.start}: exercise {r.exercise!r} belongs in {ex.path}")
    for ex in exercises if exercises is not None else BY_NAME.values():
        for p in ex.parts:
            if (ex.name, p.function) not in found:
                raise MarkerError(
                    f"exercise {ex.name!r}: no '# --- exercise: {ex.name} ---' region in {p.function} ({ex.path})"
                )


def _docstring_lines(lines: list[str], indent: str) -> list[str]:
    text = "\n".join(lines)
    if '"""' in text:
        raise ValueError('exercise text must not contain """')
    prefix = 'r"""' if "\\" in text else '"""'
    out = [indent + prefix + lines[0]]
    out += [(indent + line) if line else "" for line in lines[1:]]
    out.append(indent + '"""')
    return out


def stub_source(source: str, path: Path, chosen: set[str]) -> str:
    """The student's version of one file: chosen regions stubbed, other markers dropped."""
    regions = regions_in_source(source, path)
    lines = source.splitlines(keepends=False)
    edits = []  # (first line index, end index exclusive, new lines)
    for r in regions:
        if r.exercise not in chosen:
            edits.append((r.start - 1, r.start, []))
            edits.append((r.end - 1, r.end, []))
            continue
        ex = BY_NAME[r.exercise]
        stub = f'{r.indent}raise NotImplementedError("Exercise {ex.name}: write {r.function}")'
        edits.append((r.start - 1, r.end, [stub]))
        doc = _docstring_lines(stub_docstring(ex, ex.part(r.function), width=96 - len(r.indent)), r.indent)
        if r.doc_span is not None:
            edits.append((r.doc_span[0] - 1, r.doc_span[1], doc))
        else:
            edits.append((r.first_body_line - 1, r.first_body_line - 1, doc))
    for a, b, new in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        lines[a:b] = new
    out = "\n".join(lines) + "\n"
    compile(out, str(path), "exec")  # a SyntaxError here is a bug of this tool, not the student's
    return out


def _copy_package(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
    for rel in INSTRUCTOR_ONLY:
        p = dst / rel
        if p.exists():
            p.unlink()
    for rel in NOT_COPIED:
        p = dst / rel
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


def notebooks_dir() -> Path | None:
    """The folder of the exercise notebooks: the package's own copy (``tinymrcnn/course/notebooks``,
    package data in a wheel; a link to notebooks/exercises in the source checkout), else
    notebooks/exercises of the checkout next to the package or of the current folder (None if none)."""
    for cand in (
        Path(__file__).resolve().parent / "notebooks",
        package_dir().parent / "notebooks" / "exercises",
        Path.cwd() / "notebooks" / "exercises",
    ):
        if cand.is_dir() and any(cand.glob("*.ipynb")):
            return cand
    return None


def strip_notebook(path_in: Path, path_out: Path) -> None:
    """Copy a notebook without outputs or execution counts."""
    nb = json.loads(path_in.read_text(encoding="utf-8"))
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    path_out.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _readme(exercises: list[Exercise], reference: bool = True) -> str:
    order = (
        """You can take the exercises in any order: while a function of another
exercise is still a stub, the notebooks run the reference solution in its
place (from `tinymrcnn/course/reference/`) and print a note saying so. Those
files are the answers; they are there so that every notebook runs, not to
be read first."""
        if reference
        else """The notebooks' training cells run the whole model, so they need the
exercises it calls (the box coder, the proposal layer, the mask loss)
written first; each notebook prints a note naming the ones still missing."""
    )
    rows = "\n".join(
        f"| {ex.number} | `{ex.name}` | {ex.title} | `{ex.path}`: "
        f"{', '.join('`' + p.function + '`' for p in ex.parts)} | {ex.minutes} min |"
        for ex in exercises
    )
    return f"""# tinymrcnn: exercises

This folder is a complete copy of tinymrcnn, Mask R-CNN in NumPy, with a few
function bodies left for you to write. Everything around them works, so once
your code is in, the whole model trains with it.

| # | exercise | what | where | time |
|---|----------|------|-------|------|
{rows}

For each exercise, open the function named above: its docstring states the
task, the shapes, the formula and a hint, and its body is a
`raise NotImplementedError`. Then open the matching notebook in
`notebooks/exercises/`: it explains the step, runs checks on your code
(finite differences, known answers), and plugs your function into a short
training run. The notebooks import the package from this folder, not from
anywhere else.

{order}

Your instructor grades the copy with `tinymrcnn course grade <this folder>`.
"""


class MissingNotebookError(FileNotFoundError):
    """An exercise notebook that make-student cannot find."""


REFERENCE_README = """The reference solutions, used only where your own function is still a stub.

The exercise notebooks call tinymrcnn.course.notebook.setup_exercise(), which
makes every *other* exercise's function that still raises NotImplementedError
run the code in this folder instead (and prints which), so that each exercise
can be done on its own, in any order. Your exercise's own functions are never
replaced. The grader does not let your package import this folder.

These files are the answers: reading them first spoils the exercises.
"""


def _find_notebooks(nb_src: Path | None, chosen: list[Exercise]) -> dict:
    """{exercise name: notebook path}; raises MissingNotebookError naming the first one missing."""
    found = {}
    for ex in chosen:
        p = nb_src / ex.notebook if nb_src is not None else None
        if p is None or not p.is_file():
            where = (
                f"in {nb_src}"
                if nb_src is not None
                else "(none in the installed package, tinymrcnn/course/notebooks, nor in notebooks/exercises/)"
            )
            raise MissingNotebookError(
                f"no exercise notebook {ex.notebook} {where}; pass --notebooks DIR, "
                "or --no-notebooks to write the copy without them"
            )
        found[ex.name] = p
    return found


def make_student(
    out_dir,
    exercises=None,
    notebooks: Path | str | None | bool = None,
    force: bool = False,
    check_import: bool = True,
    source: Path | str | None = None,
    reference: bool = True,
) -> dict:
    """Write a student's copy of the package to ``out_dir``.

    Args:
        out_dir: the folder to create; it receives ``tinymrcnn/``,
            ``notebooks/exercises/`` and ``README.md``.
        exercises: names (list or comma-separated), None for all.
        notebooks: folder of the exercise notebooks (default: the package's
            own, see :func:`notebooks_dir`); False: write none. A chosen
            exercise's notebook that is not there is an error
            (MissingNotebookError), raised before anything is written.
        force: replace an existing ``out_dir/tinymrcnn``.
        check_import: import the copy in a fresh interpreter afterwards.
        source: the package folder to copy (default: the installed one).
        reference: also write the solution of the stubbed files to
            ``tinymrcnn/course/reference/``, the fallback that lets each
            exercise notebook run before the other exercises are done.

    Returns:
        {"package": path, "exercises": [names], "stubbed": [(file, function)],
         "notebooks": [paths], "missing_notebooks": []}.
    """
    chosen = select(exercises)
    names = {ex.name for ex in chosen}
    out = Path(out_dir).resolve()
    src = Path(source).resolve() if source is not None else package_dir()
    dst = out / "tinymrcnn"
    if dst.resolve() == src:
        raise ValueError(f"the student copy {dst} would overwrite the package itself")
    regions = find_regions(src)
    check_regions(regions, chosen)
    if notebooks is False:
        found = {}
    else:
        found = _find_notebooks(Path(notebooks) if notebooks not in (None, True) else notebooks_dir(), chosen)
    if dst.exists():
        if not force:
            raise FileExistsError(f"{dst} exists; pass force=True (--force) to replace it")
        shutil.rmtree(dst)
    out.mkdir(parents=True, exist_ok=True)
    _copy_package(src, dst)

    stubbed = []
    for path in sorted({r.path for r in regions}):
        rel = path.relative_to(src)
        target = dst / rel
        solution = path.read_text(encoding="utf-8")
        target.write_text(stub_source(solution, target, names), encoding="utf-8")
        mine = [(str(rel), r.function) for r in regions if r.path == path and r.exercise in names]
        stubbed += mine
        if reference and mine:
            ref = dst / "course" / "reference" / rel
            ref.parent.mkdir(parents=True, exist_ok=True)
            # Markers dropped (nothing chosen): the solution as it runs.
            ref.write_text(stub_source(solution, ref, set()), encoding="utf-8")
    if reference and stubbed:
        (dst / "course" / "reference" / "README.txt").write_text(REFERENCE_README, encoding="utf-8")

    written = []
    if found:
        (out / "notebooks" / "exercises").mkdir(parents=True, exist_ok=True)
    for ex in chosen:
        if ex.name in found:
            q = out / "notebooks" / "exercises" / ex.notebook
            strip_notebook(found[ex.name], q)
            written.append(str(q))
    (out / "README.md").write_text(_readme(chosen, reference and bool(stubbed)), encoding="utf-8")

    if check_import:
        import_check(out, sorted({ex.module for ex in chosen}))
    return {
        "package": str(dst),
        "exercises": [ex.name for ex in chosen],
        "stubbed": stubbed,
        "notebooks": written,
        "missing_notebooks": [],
    }


def import_check(student_dir, modules=()) -> str:
    """Import the copy under ``student_dir`` (and ``modules``) in a fresh interpreter; returns its path.

    Raises RuntimeError with the interpreter's error if the import fails or
    resolves to a different copy of the package.
    """
    student_dir = Path(student_dir).resolve()
    code = (
        "import importlib, sys\n"
        "import tinymrcnn, tinymrcnn.cli, tinymrcnn.model.mask_rcnn\n"
        "for m in sys.argv[1:]:\n    importlib.import_module(m)\n"
        "print(tinymrcnn.__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(student_dir), NUMBA_DISABLE_JIT="1")
    res = subprocess.run(
        [sys.executable, "-c", code, *modules], cwd=student_dir, env=env, capture_output=True, text=True, timeout=300
    )
    if res.returncode != 0:
        raise RuntimeError(f"the student copy in {student_dir} does not import:\n{res.stderr[-2000:]}")
    where = Path(res.stdout.strip().splitlines()[-1]).resolve()
    if student_dir not in where.parents:
        raise RuntimeError(f"importing the student copy found {where} instead of {student_dir}")
    return str(where)


def replace_stub(student_dir, exercise: str, function: str, body: str) -> Path:
    """Put ``body`` in place of a stub in a student's copy (to try the grader on planted code).

    ``body`` is the function body's code without indentation; it replaces the
    ``raise NotImplementedError("Exercise <exercise>: write <function> ...")``
    line. Returns the file that was changed.
    """
    import textwrap

    ex = BY_NAME[exercise]
    path = Path(student_dir) / ex.path
    lines = path.read_text(encoding="utf-8").splitlines()
    tag = f'raise NotImplementedError("Exercise {exercise}: write {function}")'
    hits = [i for i, line in enumerate(lines) if line.strip().startswith(tag)]
    if len(hits) != 1:
        raise ValueError(f"{path}: expected one stub of {exercise}/{function}, found {len(hits)}")
    i = hits[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    new = [(indent + line) if line.strip() else "" for line in textwrap.dedent(body).strip("\n").splitlines()]
    lines[i : i + 1] = new
    text = "\n".join(lines) + "\n"
    compile(text, str(path), "exec")
    path.write_text(text, encoding="utf-8")
    for cache in path.parent.glob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    return path
