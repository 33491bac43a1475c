"""The main job's runner: notebooks in order, ipynb + html out, loud failure naming the cell."""
import nbformat
import pytest

import course


def _write(path, sources, parameters_cell=None):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    if parameters_cell is not None:
        nb.cells[parameters_cell].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


@pytest.fixture()
def series(tmp_path, monkeypatch):
    src = tmp_path / "notebooks"
    src.mkdir()
    monkeypatch.setattr(course, "NOTEBOOKS_DIR", src)
    return src


def test_runs_in_order_and_writes_ipynb_and_html(series, tmp_path):
    _write(series / "02_second.ipynb", ["print('two')"])
    _write(series / "01_first.ipynb", ["FAST = False", "print('one', FAST)"], parameters_cell=0)
    _write(series / "notes.ipynb", ["raise RuntimeError('not part of the series')"])
    out = tmp_path / "build"
    timings = course.run_notebooks(out_dir=out, parameters={"FAST": True})
    assert [name for name, _ in timings] == ["01_first.ipynb", "02_second.ipynb"]
    for name in ("01_first", "02_second"):
        assert (out / f"{name}.ipynb").is_file() and (out / f"{name}.html").is_file()
    assert "one True" in (out / "01_first.html").read_text()


def test_a_failing_cell_stops_the_run_and_is_named(series, tmp_path, capsys):
    _write(series / "01_ok.ipynb", ["x = 1"])
    _write(series / "02_broken.ipynb", ["y = 2", "1 / 0", "print('never')"])
    _write(series / "03_after.ipynb", ["print('not reached')"])
    with pytest.raises(course.CourseError) as err:
        course.run_notebooks(out_dir=tmp_path / "build")
    message = str(err.value)
    assert "02_broken.ipynb failed in cell 2 (ZeroDivisionError" in message
    assert not (tmp_path / "build" / "03_after.ipynb").exists()


def test_unknown_notebook_name(series, tmp_path):
    _write(series / "01_ok.ipynb", ["x = 1"])
    with pytest.raises(course.CourseError, match="No notebook matches"):
        course.run_notebooks(["99"], out_dir=tmp_path / "build")
