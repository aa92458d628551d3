"""The notebooks at the top of the repository: committed with their outputs (every code cell run in order, every
figure's image saved, no log noise a student would have to read past), each result followed by what it means, and
each still runs top to bottom here (offline, on toy sizes) with its checks passing."""

import re
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds; the slowest cell (03's stage 4) takes well under half of it on a 2-core CPU


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code" and cell.source.strip()]


def test_the_notebooks_are_the_three_the_user_asked_for():
    assert [p.name for p in NOTEBOOKS] == ["01_data.ipynb", "02_losses.ipynb", "03_stages.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_the_committed_notebook_shows_its_results(path):
    """A reader of the repository sees every result without running anything: the code cells were executed in order,
    1, 2, 3, ..., none shows an error, and every cell that draws a figure holds its image."""
    cells = code_cells(nbformat.read(path, as_version=4))
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), "re-execute it: README"
    for k, cell in enumerate(cells, 1):
        kinds = {output.output_type for output in cell.outputs}
        assert "error" not in kinds, f"cell {k} shows an error"
        draws = any(word in cell.source for word in ("plt.", "plot(", "bar_chart(", "figure(", "imshow("))
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images or not draws, f"cell {k} draws a figure but holds no image"


NOISE = {  # what a build, a launcher or a loader prints, and what gives away the machine that ran the notebook
    "a linker or compiler": r"collect2|ld returned|cannot find -l|ninja: ",
    "an escape code": r"\x1b\[",
    "a loading report": r"LOAD REPORT|Loading weights",
    "a library's warning or log line": r"\[WARNING\]|\[INFO\]|UserWarning|FutureWarning|DeprecationWarning",
    "a path of the machine": r"site-packages|ipykernel_[0-9]+|/(?:home|root|work|tmp)/",
    "a progress bar": r"\d+%\|",
    "an error": r"Traceback",
}


def output_text(output) -> str:
    if "text" in output:
        return "".join(output["text"])
    return "".join("".join(v) for k, v in output.get("data", {}).items() if k.startswith("text/"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_the_committed_outputs_are_free_of_noise_and_every_result_is_read(path):
    """No output holds a build's, a launcher's or a loader's lines, an escape code, a warning, a progress bar or a path
    of the machine that ran it. Every code cell that shows a result (a printed table, a figure) is followed by a
    markdown cell, and those that interpret say so ("What this shows" or "Reading ...")."""
    notebook = nbformat.read(path, as_version=4)
    cells = notebook.cells
    for k, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            for what, pattern in NOISE.items():
                assert not re.search(pattern, output_text(output)), f"cell {k} shows {what}"
        shows = any(o.output_type in ("display_data", "execute_result") or "exercise" not in output_text(o)
                    for o in cell.outputs)
        if shows and cell.outputs and "exercises.check" not in cell.source:
            following = cells[k + 1] if k + 1 < len(cells) else None
            assert following is not None and following.cell_type == "markdown", f"cell {k}'s result is not read"
    interpreted = sum(c.cell_type == "markdown" and re.match(r"\*\*(What this shows|Reading)", c.source)
                      is not None for c in cells)
    assert interpreted >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_the_notebook_runs_top_to_bottom(path):
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()  # raises on any error
    outputs = [o for cell in code_cells(notebook) for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no plot"
