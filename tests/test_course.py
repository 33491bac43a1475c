"""The course's command line (course.py): arguments are validated, nothing shipped is lost."""
import json

import pytest

import cnn_utils
import course


@pytest.mark.parametrize("argv", [["train", "--epochs", "-1"], ["train", "--epochs", "0"],
                                  ["train", "--epochs", "two"], ["train", "--dataset", "cifar"]])
def test_train_rejects_bad_arguments_before_touching_anything(argv, capsys):
    with pytest.raises(SystemExit) as err:
        course.main(argv)
    assert err.value.code == 2
    assert "epochs" in capsys.readouterr().err or "dataset" in argv


@pytest.mark.parametrize("epochs", [0, -1, 2.5, True, "3"])
def test_train_and_save_rejects_bad_epochs(epochs):
    with pytest.raises(course.CourseError, match="epochs must be a whole number"):
        course.train_and_save("mnist", epochs=epochs)


@pytest.fixture()
def tiny_training(monkeypatch, tmp_path):
    """Shipped models in a temporary folder; training on 2,000 images."""
    shipped = tmp_path / "saved_models"
    shipped.mkdir()
    monkeypatch.setattr(cnn_utils, "MODELS_DIR", shipped)
    monkeypatch.setattr(course, "BUILD_DIR", tmp_path / "build")
    monkeypatch.setattr(cnn_utils, "train_val_split",
                        lambda x, y, seed: ((x[:2000], y[:2000]), (x[-500:], y[-500:])))
    return shipped


def test_replace_keeps_a_more_accurate_shipped_model(tiny_training, tmp_path, capsys):
    shipped = tiny_training
    (shipped / "mnist_cnn.keras").write_bytes(b"the shipped model")
    (shipped / "mnist_cnn.json").write_text(json.dumps({"test_accuracy": 0.9999}))
    assert course.main(["train", "--epochs", "1", "--replace"]) == 0
    out = capsys.readouterr().out
    assert "more accurate and was kept" in out
    assert (shipped / "mnist_cnn.keras").read_bytes() == b"the shipped model"
    assert json.loads((shipped / "mnist_cnn.json").read_text()) == {"test_accuracy": 0.9999}
    assert (tmp_path / "build" / "models" / "mnist_cnn.keras").is_file()


def test_without_replace_nothing_shipped_is_touched(tiny_training, tmp_path):
    shipped = tiny_training
    (shipped / "mnist_cnn.keras").write_bytes(b"the shipped model")
    info = course.train_and_save("mnist", epochs=1, verbose=0)
    assert info["replaced"] is False and info["path"] == str(tmp_path / "build" / "models" / "mnist_cnn.keras")
    assert (shipped / "mnist_cnn.keras").read_bytes() == b"the shipped model"


def test_replace_writes_when_at_least_as_accurate(tiny_training):
    shipped = tiny_training
    (shipped / "mnist_cnn.json").write_text(json.dumps({"test_accuracy": 0.1}))
    info = course.train_and_save("mnist", epochs=1, replace=True, verbose=0)
    assert info["replaced"] is True
    assert json.loads((shipped / "mnist_cnn.json").read_text())["test_accuracy"] == info["test_accuracy"] > 0.1


def test_errors_become_one_line_messages(capsys, monkeypatch):
    monkeypatch.setattr(course, "NOTEBOOKS_DIR", course.PROJECT_DIR / "no-such-folder")
    assert course.main(["run", "01"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: No notebook matches 01") and "Traceback" not in err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        course.main(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "prefetch", "train", "release", "grade"):
        assert f"    {command}" in out


def test_the_teaching_module_holds_no_course_tooling():
    import ast

    tree = ast.parse((course.PROJECT_DIR / "cnn_utils.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"argparse", "papermill", "nbconvert", "nbgrader"}
    assert "main" not in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_claims_fail_loudly_and_records_come_back(tmp_path):
    """A notebook that records values and checks a claim, run through the course's runner."""
    import nbformat
    import numpy as np

    from conftest import notebook_values

    with pytest.raises(cnn_utils.ClaimError, match="says: \"most are 4s\" but .* 3 of 10"):
        cnn_utils.claim(3 > 5, "most are 4s", "3 of 10")
    assert cnn_utils.claim(np.bool_(True), "holds") == "holds"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        f"import sys; sys.path.insert(0, {str(course.PROJECT_DIR)!r})\n"
        "import cnn_utils, numpy as np\n"
        "cnn_utils.record(accuracy=np.float32(0.5), counts=np.arange(3), name='x')\n"
        "cnn_utils.record(accuracy=0.75)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "values.ipynb"
    nbformat.write(nb, str(src))
    out = course.execute_notebook(src, tmp_path / "out.ipynb", progress_bar=False, kernel_name="python3")
    values = notebook_values(nbformat.read(str(out), as_version=4))
    assert values == {"accuracy": 0.75, "counts": [0, 1, 2], "name": "x"}


# --- second campaign (issue 13): nothing of the user's is written over ---------------------------

@pytest.mark.parametrize("seed", ["-1", "4294967296", "abc"])
def test_train_refuses_a_bad_seed_before_loading_anything(seed, capsys):
    with pytest.raises(SystemExit) as err:
        course.main(["train", "--seed", seed])
    assert err.value.code == 2 and "--seed" in capsys.readouterr().err


def test_retraining_never_overwrites_an_earlier_model(tiny_training, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "mnist_cnn.keras").write_text("my own model")
    info = course.train_and_save("mnist", epochs=1, out_dir=mine, verbose=0)
    assert (mine / "mnist_cnn.keras").read_text() == "my own model"
    assert info["path"] == str(mine / "mnist_cnn_2.keras") and (mine / "mnist_cnn_2.json").is_file()


def _fake_notebook(path, papermill):
    import nbformat

    nb = nbformat.v4.new_notebook()
    if papermill:
        nb.metadata["papermill"] = {"input_path": "x"}
    nbformat.write(nb, str(path))


def test_run_refuses_to_write_over_sources_or_files_it_did_not_write(tmp_path, monkeypatch):
    src = tmp_path / "notebooks"
    src.mkdir()
    _fake_notebook(src / "01_a.ipynb", papermill=False)
    monkeypatch.setattr(course, "NOTEBOOKS_DIR", src)
    ran = []
    monkeypatch.setattr(course, "execute_notebook", lambda path, out, *a, **k: ran.append(out))
    with pytest.raises(course.CourseError, match="holds the source notebooks"):
        course.run_notebooks(out_dir=src)
    out = tmp_path / "out"
    out.mkdir()
    _fake_notebook(out / "01_a.ipynb", papermill=False)          # the user's own file of that name
    with pytest.raises(course.CourseError, match="was not written by `python -m course run`"):
        course.run_notebooks(out_dir=out, html=False)
    _fake_notebook(out / "01_a.ipynb", papermill=True)           # an earlier output: replaced as before
    course.run_notebooks(out_dir=out, html=False)
    assert ran == [out / "01_a.ipynb"]


def test_file_system_errors_are_one_line_messages(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    assert course.main(["run", "01", "--out", str(blocker / "build")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert blocker.read_text() == "mine"


def test_grade_checks_the_folder_before_starting_nbgrader(tmp_path, monkeypatch):
    from cnnlib import grading

    monkeypatch.setattr(grading, "_ensure_released", lambda course_dir: pytest.fail("released first"))
    with pytest.raises(course.CourseError, match="is not a folder"):
        course.grade(tmp_path / "missing", course_dir=tmp_path / "nbgrader")
    with pytest.raises(course.CourseError, match="No submissions"):
        course.grade(tmp_path, course_dir=tmp_path / "nbgrader")


@pytest.mark.parametrize("memory", ["6", "2047"])
def test_grade_memory_below_what_a_notebook_needs_is_refused(memory, capsys):
    with pytest.raises(SystemExit) as exit_info:
        course.main(["grade", "anywhere", f"--memory={memory}"])
    assert exit_info.value.code == 2
    assert "at least 2048 MB" in capsys.readouterr().err


def test_run_refuses_an_output_that_is_a_file_or_cannot_be_written(tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("mine")
    with pytest.raises(course.CourseError, match="is a file, not a folder; nothing was written"):
        course.run_notebooks(out_dir=target)
    assert target.read_text() == "mine"
    with pytest.raises(course.CourseError, match="Cannot write into --out"):
        course.run_notebooks(out_dir=target / "sub")          # a folder inside a file
