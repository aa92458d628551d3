"""Every notebook at the top of the repository runs top to bottom (offline, on toy sizes) and draws a plot."""

from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds; the slowest cell (03's stage 4) takes well under half of it on a 2-core CPU


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_plots(path):
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()  # raises on any error
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no plot"


def test_the_notebooks_are_the_three_the_user_asked_for():
    assert [p.name for p in NOTEBOOKS] == ["01_data.ipynb", "02_losses.ipynb", "03_stages.ipynb"]
