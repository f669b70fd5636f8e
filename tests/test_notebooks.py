"""The step-through notebooks run top to bottom, headless, and their own asserts pass.

Each notebook checks its key numbers with ``assert`` (the worked example's 4.53 x 6.25
RoI, a live gradient check, the proposal counts, ...), so running it is the
test. ``TINYMRCNN_NOTEBOOK_SMALL=1`` makes the training cells tiny; the runs
they train go to a temporary folder shared by this module, so the toy model
that notebook 1 trains is reused by notebooks 3, 4, 7 and 8.

The kernel is this interpreter: a temporary kernel spec, found through
``JUPYTER_PATH``, starts ``sys.executable -m ipykernel_launcher``, so the
notebooks import the tinymrcnn that the tests import, whatever ``python``
means on the PATH.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
KERNEL_NAME = "tinymrcnn-tests"
CELL_TIMEOUT_S = 600  # the longest cell trains a model; a hung cell fails instead of blocking CI


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    """Small settings, a fresh folder for the notebooks' training runs, and a kernel spec for this Python."""
    runs = tmp_path_factory.mktemp("notebook_runs")
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tinymrcnn tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYMRCNN_NOTEBOOK_SMALL", "1")
        mp.setenv("TINYMRCNN_NOTEBOOK_RUNS", str(runs))
        mp.setenv("JUPYTER_PATH", str(jupyter_path))
        mp.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        yield runs


def execute(nb, timeout=CELL_TIMEOUT_S):
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=timeout,
        startup_timeout=180,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()
    return nb


def test_all_nine_notebooks_are_there():
    names = [p.stem for p in NOTEBOOKS]
    assert len(names) == 9, names
    assert [n[:2] for n in names] == [f"{i:02d}" for i in range(1, 10)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    """Outputs are stripped so that diffs show only what changed in the code and text."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {i} has outputs"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.slow
def test_kernel_is_this_interpreter(notebook_env):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import os, sys, tinymrcnn\nprint(sys.prefix)\nprint(os.environ['TINYMRCNN_NOTEBOOK_SMALL'])"
        )
    ]
    out = execute(nb, timeout=120).cells[0].outputs[0]["text"].split("\n")
    assert out[0] == sys.prefix  # the same environment (venv) as the tests
    assert out[1] == "1"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, notebook_env):
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    try:
        execute(nb)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    figures = sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s, {figures} figures")
    assert figures >= 1, f"{path.name} drew no figure"


@pytest.mark.slow
def test_ablations_notebook_default_mode_draws_the_recorded_results(notebook_env, monkeypatch):
    """In the default mode notebook 9 trains nothing: it reads notebooks/ablation_results.json and draws it."""
    recorded = json.loads((NOTEBOOK_DIR / "ablation_results.json").read_text())
    assert len(recorded["seeds"]) >= 3 and recorded["heldout_images"] == 200
    monkeypatch.delenv("TINYMRCNN_NOTEBOOK_SMALL")
    monkeypatch.setenv("TINYMRCNN_NOTEBOOK_MODE", "default")
    runs_before = sorted(p.name for p in notebook_env.iterdir())
    nb = execute(nbformat.read(NOTEBOOK_DIR / "09_ablations.ipynb", as_version=4))
    text = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert f"recorded on {recorded['date']}" in text
    assert "untrained (test mode)" not in text
    assert sorted(p.name for p in notebook_env.iterdir()) == runs_before  # nothing trained, nothing written
    figures = sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    assert figures == 1


def test_notebook_mode_is_checked(monkeypatch):
    """A mistyped mode is one clear error naming the choices."""
    sys.path.insert(0, str(NOTEBOOK_DIR))
    try:
        import _nbutils

        monkeypatch.setenv("TINYMRCNN_NOTEBOOK_MODE", "fast")
        with pytest.raises(ValueError, match="TINYMRCNN_NOTEBOOK_MODE must be one of default, full, test, got 'fast'"):
            _nbutils._mode()
        monkeypatch.setenv("TINYMRCNN_NOTEBOOK_MODE", "")
        monkeypatch.setenv("TINYMRCNN_NOTEBOOK_SMALL", "1")
        assert _nbutils._mode() == "test"
        monkeypatch.setenv("TINYMRCNN_NOTEBOOK_MODE", "Full")
        assert _nbutils._mode() == "full"
        monkeypatch.delenv("TINYMRCNN_NOTEBOOK_SMALL")
        monkeypatch.delenv("TINYMRCNN_NOTEBOOK_MODE")
        assert _nbutils._mode() == "default"
    finally:
        sys.path.remove(str(NOTEBOOK_DIR))
