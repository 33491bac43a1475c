"""Cells that only build the sentences under a figure are collapsed in JupyterLab
(cell metadata ``jupyter.source_hidden``) and shown without their code in the HTML build,
so that the student's view goes from computation to figure to text (issue 24)."""
import re

import nbformat
import pytest

import course
from conftest import ROOT

NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def shows_only_text(source):
    """A code cell whose job is to show sentences: it displays Markdown (directly or through a
    notebook's ``say``), draws nothing, imports and defines nothing, and calls no ``cnn_utils``
    computation (recording, claims and formatting are allowed)."""
    shows_text = "Markdown(" in source or re.search(r"^\s*(\+\s*)?say\(", source, re.M)
    draws = re.search(r"plt\.|plot_|\bfig\b|imshow|explorer\(|\bimport\b|^\s*def ", source, re.M)
    computes = re.search(r"cnn_utils\.(?!record|claim|format_probability|format_correlation|probability_decimals"
                         r"|likeness_above_chance|model_info|normalize_maps)[a-z_]+\(", source)
    return bool(shows_text) and not draws and not computes


def collapsed(cell):
    return bool(cell.get("metadata", {}).get("jupyter", {}).get("source_hidden"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_text_cells_are_collapsed_and_nothing_else(name):
    nb = nbformat.read(str(ROOT / "notebooks" / name), as_version=4)
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    open_text = [i for i, c in code if shows_only_text(c.source) and not collapsed(c)]
    hidden_work = [i for i, c in code if collapsed(c) and not shows_only_text(c.source)]
    assert not open_text, f"{name}: cells {open_text} only build text: set metadata jupyter.source_hidden = true"
    assert not hidden_work, f"{name}: cells {hidden_work} compute or draw, yet their source is collapsed"


def test_the_html_build_leaves_out_the_code_of_collapsed_cells(tmp_path):
    shown = nbformat.v4.new_code_cell("x = 6 * 7  # SHOWN_CODE")
    hidden = nbformat.v4.new_code_cell('display(Markdown(f"The answer is {x}."))  # HIDDEN_CODE')
    hidden.metadata["jupyter"] = {"source_hidden": True}
    hidden.outputs = [nbformat.v4.new_output("display_data", data={"text/markdown": "The answer is FORTY_TWO."})]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[shown, hidden]), str(path))
    html = course.to_html(path).read_text(encoding="utf-8")
    assert "SHOWN_CODE" in html and "FORTY_TWO" in html
    assert "HIDDEN_CODE" not in html
    # the notebook itself keeps the code (one click away in JupyterLab)
    assert "HIDDEN_CODE" in path.read_text(encoding="utf-8")
