"""The handout: `make course` puts into build/ only what can be handed out.

The exercises go there in their student version (no solutions, no hidden tests); the instructors'
executed version, with every solution, goes to build/instructors/ under a banner that says so, and
a copy of the course without instructors/ builds the same handout. A leak is looked for in the
files as they are (the .ipynb's JSON strings, the .html's text without its tags), with every
solution line of the instructors' source and every string of instructors/grading_tests.py that
the student version may not show; the detector itself is shown to find them where they are.
"""
import ast
import html
import json
import os
import re
import shutil
import subprocess
import sys

import nbformat
import pytest

import course
from cnnlib.grading import GRADING_TESTS
from conftest import ROOT

needs_instructors = pytest.mark.skipif(not course.EXERCISE_SOURCE.is_file(),
                                       reason="a copy of the course without instructors/")
MIN_CHARS = 20          # letters and digits: shorter lines (`return fig`, `ax.grid(alpha=0.3)`) prove nothing
MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")


def _norm(text):
    """Letters and digits only, lower case: the same in source, JSON, highlighted HTML and rendered Markdown."""
    return re.sub(r"[^0-9a-z]", "", text.lower())


def _file_text(path):
    """What a reader of the file can get at: every string in a notebook's JSON, an HTML page's text."""
    if path.suffix == ".ipynb":
        strings = []

        def walk(node):
            if isinstance(node, str):
                strings.append(node)
            elif isinstance(node, dict):
                for key, value in node.items():
                    strings.append(str(key))
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(json.loads(path.read_text(encoding="utf-8")))
        return "\n".join(strings)
    text = path.read_text(encoding="utf-8", errors="replace")
    return html.unescape(re.sub(r"<[^>]+>", " ", text)) if path.suffix == ".html" else text


def _split_solutions(source):
    """(the lines inside ### BEGIN/END SOLUTION blocks, the other lines) of one cell's source."""
    inside, secret, visible = False, [], []
    for line in source.splitlines():
        if "### BEGIN SOLUTION" in line:
            inside = True
        elif "### END SOLUTION" in line:
            inside = False
        elif inside:
            secret.append(line)
        else:
            visible.append(line)
    return secret, visible


def _secrets():
    """{"solution": [...], "hidden test": [...]}: normalized fragments a handout may not contain, i.e.
    solution lines of the instructors' source and strings of grading_tests.py that do not also occur in
    what the student version legitimately shows (the source outside its solution blocks)."""
    nb = nbformat.read(str(course.EXERCISE_SOURCE), as_version=4)
    solution, visible = [], []
    for cell in nb.cells:
        secret, shown = _split_solutions(cell.source)
        solution += secret
        visible += [*shown, json.dumps(cell.metadata)]        # grade ids are the student version's too
    shown = _norm("\n".join(visible))
    tree = ast.parse(GRADING_TESTS.read_text(encoding="utf-8"))
    hidden = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    keep = lambda texts: sorted({t for t in map(_norm, texts) if len(t) >= MIN_CHARS and t not in shown})  # noqa: E731
    return {"solution": keep(solution), "hidden test": keep(hidden)}


def _leaks(text, secrets):
    text = _norm(text)
    found = {kind: [s for s in fragments if s in text] for kind, fragments in secrets.items()}
    found["marker"] = [m for m in MARKERS if _norm(m) in text]
    return {kind: hits for kind, hits in found.items() if hits}


@pytest.fixture(scope="module")
def secrets():
    s = _secrets()
    # enough to mean something: every exercise's solution and the hidden checks' messages and references
    assert len(s["solution"]) >= 40 and len(s["hidden test"]) >= 40, {k: len(v) for k, v in s.items()}
    return s


@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    """`python -m course run 11_exercises --fast`, for real, into a fresh build folder."""
    out = tmp_path_factory.mktemp("handout") / "build"
    timings = course.run_notebooks(["11_exercises"], out_dir=out, parameters={"FAST": True}, kernel_name="python3")
    return out, timings


# ---------------------------------------------------------------------------
# The real build of the exercises (fast mode)
# ---------------------------------------------------------------------------

@pytest.mark.notebook
@needs_instructors
def test_nothing_beside_the_handouts_holds_a_solution_or_a_hidden_test(handout, secrets):
    out, timings = handout
    name = course.EXERCISE_SOURCE.name
    files = [p for p in sorted(out.rglob("*")) if p.is_file() and "instructors" not in p.relative_to(out).parts]
    assert {p.name for p in files} == {name, name.replace(".ipynb", ".html")}, files
    for path in files:
        text = _file_text(path)
        leaks = _leaks(text, secrets)
        assert not leaks, f"{path.name} holds: " + "; ".join(f"{len(v)} {k} fragments, e.g. {v[:2]}" for k, v in leaks.items())
        # ... and it is the student version, with its stubs and the students' visible checks
        for shown in ("YOUR CODE HERE", "YOUR ANSWER HERE", "Test 1a: total variation on images worked out by hand"):
            assert _norm(shown) in _norm(text), (path.name, shown)
    assert [n for n, _ in timings] == [name, f"{course.INSTRUCTOR_DIR_NAME}/{course.INSTRUCTOR_NOTEBOOK_NAME}"]


@pytest.mark.notebook
@needs_instructors
def test_the_instructors_version_is_apart_and_says_so_at_the_top(handout, secrets):
    out, _ = handout
    ipynb = course.instructor_output(out)
    page = ipynb.with_suffix(".html")
    assert ipynb.parent == out / "instructors" and ipynb.is_file() and page.is_file()
    nb = nbformat.read(str(ipynb), as_version=4)
    assert course.INSTRUCTOR_BANNER in nb.cells[0].source and nb.cells[0].cell_type == "markdown"
    assert course.INSTRUCTOR_BANNER in nb.metadata["title"]
    body = page.read_text(encoding="utf-8")
    assert f"<title>{html.escape(course.INSTRUCTOR_BANNER, quote=False)}" in body
    # the banner comes before any of the page's content (the first solution line, the notebook's title)
    text = _norm(_file_text(page))
    first_solution = min(text.index(s) for s in secrets["solution"] if s in text)
    assert text.index(_norm(course.INSTRUCTOR_BANNER)) < text.index(_norm("Exercises: probing the CNN")) < first_solution
    # the detector finds the solutions where they are: in the instructors' notebook and its page
    for path in (ipynb, page):
        found = _leaks(_file_text(path), secrets).get("solution", [])
        assert len(found) == len(secrets["solution"]), (path.name, sorted(set(secrets["solution"]) - set(found))[:5])


@pytest.mark.notebook
def test_the_handout_runs_what_needs_no_answer_and_leaves_the_rest_unrun(handout):
    out, _ = handout
    nb = nbformat.read(str(out / course.EXERCISE_SOURCE.name), as_version=4)
    code = {c.get("id"): c for c in nb.cells if c.cell_type == "code"}
    errors = [c.get("id") for c in code.values() if any(o.output_type == "error" for o in c.outputs)]
    assert not errors, f"tracebacks in the handout: {errors}"
    # the given code and the worked ideas ran and show their output ...
    for given in ("data", "code-fgsm-idea", "code-lrp-idea"):
        assert code[given].outputs and code[given].execution_count, given
    # ... the stubs' checks and the figures drawn with the student's functions wait for the answers
    for waiting in ("ex1-tv-test", "ex2-figure", "code-29", "ex4-reference-test"):
        assert not code[waiting].outputs and code[waiting].execution_count is None, waiting
    assert any(c.metadata.get("course") == "handout-note" for c in nb.cells[:3])


def test_the_detector_finds_hidden_tests_in_a_rendered_page(tmp_path):
    """The leak check reads highlighted HTML: a page showing grading_tests.py is caught."""
    if not GRADING_TESTS.is_file():
        pytest.skip("a copy of the course without instructors/")
    hidden = _secrets()["hidden test"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(GRADING_TESTS.read_text())])
    nb.metadata["papermill"] = {}
    path = tmp_path / "leak.ipynb"
    nbformat.write(nb, str(path))
    page = course.to_html(path)
    for found in (_leaks(_file_text(path), {"h": hidden}), _leaks(_file_text(page), {"h": hidden})):
        assert len(found.get("h", [])) == len(hidden)


# ---------------------------------------------------------------------------
# Where things go and what is never overwritten (the execution mocked)
# ---------------------------------------------------------------------------

def _notebook(path, papermill=True, input_path="x"):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# a notebook")])
    if papermill:
        nb.metadata["papermill"] = {"input_path": str(input_path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))


@pytest.fixture()
def fake_course(tmp_path, monkeypatch):
    """notebooks/ with 01 and the exercises' student version, instructors/ with their source; every run
    recorded instead of executed."""
    notebooks, instructors = tmp_path / "notebooks", tmp_path / "instructors"
    _notebook(notebooks / "01_a.ipynb", papermill=False)
    _notebook(notebooks / course.EXERCISE_SOURCE.name, papermill=False)
    _notebook(instructors / course.EXERCISE_SOURCE.name, papermill=False)
    monkeypatch.setattr(course, "NOTEBOOKS_DIR", notebooks)
    monkeypatch.setattr(course, "EXERCISE_SOURCE", instructors / course.EXERCISE_SOURCE.name)
    ran = []

    def fake(kind):
        def run(path, out_path, *args, **kwargs):
            ran.append((kind, path, out_path))
            _notebook(out_path, input_path=path)
            return out_path
        return run

    monkeypatch.setattr(course, "execute_notebook", fake("papermill"))
    monkeypatch.setattr(course, "execute_student_version", fake("student"))
    return tmp_path, ran


def test_the_student_version_is_the_handout_and_the_instructors_version_goes_apart(fake_course):
    root, ran = fake_course
    out = root / "build"
    course.run_notebooks(out_dir=out, html=False)
    name = course.EXERCISE_SOURCE.name
    assert ran == [("papermill", root / "notebooks" / "01_a.ipynb", out / "01_a.ipynb"),
                   ("student", root / "notebooks" / name, out / name),
                   ("papermill", root / "instructors" / name, out / "instructors" / course.INSTRUCTOR_NOTEBOOK_NAME)]
    banner = nbformat.read(str(out / "instructors" / course.INSTRUCTOR_NOTEBOOK_NAME), as_version=4).cells[0]
    assert course.INSTRUCTOR_BANNER in banner.source


def test_a_copy_without_instructors_builds_the_handout_alone(fake_course, monkeypatch):
    root, ran = fake_course
    shutil.rmtree(root / "instructors")
    out = root / "build"
    timings = course.run_notebooks([course.EXERCISE_ASSIGNMENT], out_dir=out, html=False)
    assert ran == [("student", root / "notebooks" / course.EXERCISE_SOURCE.name, out / course.EXERCISE_SOURCE.name)]
    assert [n for n, _ in timings] == [course.EXERCISE_SOURCE.name] and not (out / "instructors").exists()


def test_files_it_did_not_write_in_the_instructors_folder_are_never_overwritten(fake_course):
    root, ran = fake_course
    out = root / "build"
    mine = out / "instructors" / course.INSTRUCTOR_NOTEBOOK_NAME
    _notebook(mine, papermill=False)                               # the instructor's own notes, same name
    with pytest.raises(course.CourseError, match="was not written by `python -m course run`"):
        course.run_notebooks(out_dir=out, html=False)
    mine.unlink()
    mine.with_suffix(".html").write_text("my page")                # a page without the notebook it came from
    with pytest.raises(course.CourseError, match="was not written by `python -m course run`"):
        course.run_notebooks(out_dir=out, html=False)
    shutil.rmtree(out / "instructors")
    (out / "instructors").write_text("a file where the folder goes")
    with pytest.raises(course.CourseError, match="is a file"):
        course.run_notebooks(out_dir=out, html=False)
    assert ran == [] and (out / "instructors").read_text() == "a file where the folder goes"
    (out / "instructors").unlink()
    _notebook(mine, input_path=course.EXERCISE_SOURCE)             # an earlier run's output: replaced
    course.run_notebooks(out_dir=out, html=False)
    assert len(ran) == 3


def test_an_earlier_runs_instructors_version_beside_the_handouts_is_removed(fake_course, capsys):
    root, ran = fake_course
    out = root / "build"
    stale = out / course.EXERCISE_SOURCE.name
    _notebook(stale, input_path=course.EXERCISE_SOURCE)            # what `run` wrote before this change
    stale.with_suffix(".html").write_text("the solutions, rendered")
    course.run_notebooks(["01"], out_dir=out, html=False)
    assert not stale.exists() and not stale.with_suffix(".html").exists()
    assert "an earlier run's instructors' version" in capsys.readouterr().out
    for keep in (dict(papermill=False), dict(input_path=root / "notebooks" / stale.name)):  # own file; a handout
        _notebook(stale, **keep)
        course.run_notebooks(["01"], out_dir=out, html=False)
        assert stale.is_file()


# ---------------------------------------------------------------------------
# A copy of the course without instructors/, for real
# ---------------------------------------------------------------------------

@pytest.mark.notebook
@pytest.mark.slow
def test_the_students_copy_runs_make_course_for_the_exercises(tmp_path):
    copy = tmp_path / "course-for-students"
    skip = shutil.ignore_patterns(".git", ".venv", "build", "nbgrader", "data", "instructors", "__pycache__",
                                  ".pytest_cache")
    shutil.copytree(ROOT, copy, ignore=skip)
    if (ROOT / "data").is_dir():
        (copy / "data").symlink_to(ROOT / "data")
    out = tmp_path / "build"
    result = subprocess.run([sys.executable, "-m", "course", "run", course.EXERCISE_ASSIGNMENT, "--fast",
                             "--out", str(out)], cwd=copy, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(copy)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["11_exercises.html", "11_exercises.ipynb"]
