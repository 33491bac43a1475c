"""Every notebook's first code cell: the course made importable on Colab, Binder or a new hub user.

The cell is the same in every notebook (the student exercise notebook gets it from the
instructors' source through ``python -m course release``). Where the course is importable it only
says so; where it is not, it fetches the course from ``$CNN_COURSE_REPO`` into ``$CNN_COURSE_HOME``
and installs only the packages this Python lacks (``course.install_missing``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

import course

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")) + \
    ([course.EXERCISE_SOURCE] if course.EXERCISE_SOURCE.is_file() else [])


def first_code_cell(path):
    nb = json.loads(Path(path).read_text())
    return next(c for c in nb["cells"] if c["cell_type"] == "code")


SETUP = "".join(first_code_cell(ROOT / "notebooks" / "01_train_mnist_cnn.ipynb")["source"])


def run_setup(cwd, **env):
    """Execute the setup cell's code in a fresh Python (no course on sys.path); returns its output."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CNN_COURSE_REPO", "CNN_COURSE_HOME")}
    result = subprocess.run([sys.executable, "-c", SETUP], cwd=cwd, env={**clean, **env},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_every_notebook_starts_with_the_same_short_setup_cell():
    assert len(NOTEBOOKS) >= 13
    for path in NOTEBOOKS:
        cell = first_code_cell(path)
        assert "".join(cell["source"]) == SETUP, f"{path.name}: the setup cell differs from notebook 01's"
        assert "parameters" not in cell["metadata"].get("tags", []) and not cell["outputs"]
    assert SETUP.startswith("# Setup:") and len(SETUP.splitlines()) <= 12


def test_in_the_course_folder_it_only_says_the_course_is_found():
    out = run_setup(ROOT / "notebooks")
    assert out.strip() == f"Course found, nothing to set up: {ROOT / 'cnn_utils.py'}"


def test_elsewhere_it_fetches_the_course_and_installs_nothing_already_there(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to fetch the course from")
    work, home = tmp_path / "session", tmp_path / "cnn-course"
    work.mkdir()
    out = run_setup(work, CNN_COURSE_REPO=str(ROOT), CNN_COURSE_HOME=str(home))
    assert (home / "cnn_utils.py").is_file() and (home / "course.py").is_file()
    said = f"Course importable from {home}. Every package the notebooks need was already installed."
    assert out.strip() == said
    assert run_setup(work, CNN_COURSE_REPO="/nonexistent", CNN_COURSE_HOME=str(home)).strip() == said  # not again


def test_missing_requirements_keeps_installed_packages_whatever_their_version(tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# a comment\nnumpy==0.0.1\nscikit_learn==0.0.1  # spelled with _\n"
                    "surely-not-installed-course-package==1.0\njupyterlab==0.0.1\nnbgrader==0.0.1\n")
    assert course.missing_requirements(reqs) == ["surely-not-installed-course-package==1.0"]


def test_install_missing_installs_only_the_missing_ones(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(course.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("numpy==0.0.1\nsurely-not-installed-course-package==1.0\n")
    assert course.install_missing(reqs) == "Installed what was missing: surely-not-installed-course-package==1.0."
    assert calls == [[sys.executable, "-m", "pip", "install", "--quiet", "surely-not-installed-course-package==1.0"]]
    reqs.write_text("numpy==0.0.1\n")
    assert course.install_missing(reqs) == "Every package the notebooks need was already installed."
