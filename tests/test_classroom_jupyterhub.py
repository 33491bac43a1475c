"""A class on a real JupyterHub, one full round of the exercises through nbgrader's exchange.

The test starts JupyterHub with the course's ``instructors/jupyterhub_config.py`` (its
LocalProcessSpawner, the ``configurable-http-proxy`` from npm, the dummy authenticator with a
password given on the command line) on loopback ports, with three system users it creates:
an instructor and two students. Everything a user does goes through the hub's REST API (a token
requested with the user's password, their server started) and that user's own server:

* instructor  (commands run in a kernel of their server, in their private clone of the course)
              ``python -m course release``, ``nbgrader release_assignment`` to the exchange
* students    nbgrader's Assignments API of their server: fetch; ``correct`` saves the
              instructors' solutions into the fetched notebook (contents API), ``blank`` leaves it;
              both submit
* instructor  ``nbgrader collect``, then ``python -m course grade nbgrader/submitted`` (the
              course's isolated grading); the scores are read from the instructor's server.

Needs root (``useradd``), the proxy on PATH (``.ci/run`` installs it with npm) and a Python
environment every user can reach (``.ci/run`` makes its folders searchable); skips naming what is
missing. The hub machinery is in ``classroom_hub.py`` (the classroom benchmark uses it too).
"""
import csv
import io
import json
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

import course
from classroom_hub import COURSE_ID, HUB_CONFIG, Classroom, missing_piece

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not course.EXERCISE_SOURCE.is_file(), reason="a copy of the course without instructors/")]

ASSIGNMENT = course.EXERCISE_ASSIGNMENT
INSTRUCTOR = "cnnhub-teacher"
STUDENTS = {"cnnhub-ada": "correct", "cnnhub-bob": "blank"}


def check(session, argv, cwd, timeout=900):
    """Run a command as ``session``'s user in their server; fails with its output unless it succeeds."""
    status, output = session.run(argv, cwd, timeout)
    assert status == 0, f"`{' '.join(map(str, argv))}` as {session.name} exited {status}:\n{output}"
    return output


def assignments(session, action=None):
    """nbgrader's Assignments API of the user's server: the list, or fetch / submit."""
    if action is None:
        return session.api("GET", "assignments", params={"course_id": COURSE_ID}).json()
    body = session.api("POST", f"assignments/{action}",
                       json={"course_id": COURSE_ID, "assignment_id": ASSIGNMENT}).json()
    assert body.get("success"), f"{action} as {session.name}: {str(body)[:1000]}"
    return body


@pytest.fixture(scope="module")
def classroom():
    reason = missing_piece()
    if reason:
        pytest.skip(reason)
    with Classroom([INSTRUCTOR], list(STUDENTS),
                   log_copy=Path(tempfile.gettempdir()) / "cnn-course-jupyterhub-last.log") as room:
        yield room


@pytest.fixture(scope="module")
def round_(classroom):
    """The whole round; returns what the tests check."""
    s, clone = classroom.sessions, classroom.home(INSTRUCTOR) / "cnn-course"
    teacher = s[INSTRUCTOR]
    python = sys.executable
    check(teacher, [python, "-m", "course", "release"], clone)
    check(teacher, [python, "-m", "nbgrader", "release_assignment", ASSIGNMENT], clone)

    source = nbformat.read(str(course.EXERCISE_SOURCE), as_version=4)
    listed, fetched = {}, {}
    for name, kind in STUDENTS.items():
        listed[name] = assignments(s[name])
        assignments(s[name], "fetch")
        path = f"api/contents/{ASSIGNMENT}/{ASSIGNMENT}.ipynb"
        nb = nbformat.from_dict(s[name].api("GET", path, params={"content": 1}).json()["content"])
        fetched[name] = nb
        if kind == "correct":
            answered = course.fill_answers(nb, course.instructor_answers(source))
            s[name].api("PUT", path, json={"type": "notebook", "format": "json", "content": answered})
        assignments(s[name], "submit")

    budget = check(s[next(iter(STUDENTS))], [python, "-c", "import cnn_utils; print(cnn_utils.ATTRIBUTION_MEMORY_BUDGET >> 20)"],
                   classroom.home(next(iter(STUDENTS))))
    collected = check(teacher, [python, "-m", "nbgrader", "collect", ASSIGNMENT], clone)
    graded = check(teacher, [python, "-m", "course", "grade", "nbgrader/submitted", "--jobs", "2"], clone)
    scores_csv = teacher.api("GET", "api/contents/cnn-course/nbgrader/reports/scores.csv",
                             params={"content": 1, "type": "file", "format": "text"}).json()["content"]
    return {"listed": listed, "fetched": fetched, "collected": collected, "graded": graded,
            "scores": {row["student_id"]: row for row in csv.DictReader(io.StringIO(scores_csv))},
            "exchange": classroom.base / "exchange", "student_budget_mib": budget.split()[-1]}


def _autograded_points(nb):
    return sum(float(c.metadata["nbgrader"].get("points", 0)) for c in nb.cells
               if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("grade"))


def test_students_see_and_fetch_the_released_student_version(round_):
    for name in STUDENTS:
        released = [a for a in round_["listed"][name]["value"] if a["assignment_id"] == ASSIGNMENT]
        assert released and released[0]["status"] == "released", round_["listed"][name]
        text = json.dumps(round_["fetched"][name])
        assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text
        assert _autograded_points(round_["fetched"][name]) > 0  # the test cells came along


def test_submissions_reach_the_instructor_only_through_the_exchange(round_):
    inbound = round_["exchange"] / COURSE_ID / "inbound"
    assert sorted(p.name.split("+")[0] for p in inbound.iterdir()) == sorted(STUDENTS)
    for name in STUDENTS:
        assert name in round_["collected"]


def test_scores_come_out_as_a_fair_instructor_would_give(round_):
    full = _autograded_points(nbformat.read(str(course.EXERCISE_SOURCE), as_version=4))
    scores = round_["scores"]
    assert set(scores) == set(STUDENTS), round_["graded"]
    for name, kind in STUDENTS.items():
        row = scores[name]
        assert row["status"] == "graded", (name, row, round_["graded"])
        expected = full if kind == "correct" else 0.0
        assert float(row["autograded_total"]) == pytest.approx(expected), (name, row, round_["graded"])


def test_students_kernels_hold_the_class_memory_budget(round_):
    """The hub's config gives every student's kernel the smaller attribution budget (README sizing)."""
    assert round_["student_budget_mib"] == "256"


def test_grade_reads_nbgrader_collected_layout(tmp_path):
    nb = nbformat.v4.new_notebook()
    for student in ("ann", "ben"):
        path = tmp_path / "course" / "submitted" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
        path.parent.mkdir(parents=True)
        nbformat.write(nb, str(path))
    (tmp_path / "course" / "submitted" / "ben" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb").write_text("not json")
    students, unreadable = course.collect(tmp_path / "course" / "submitted", tmp_path / "course")
    assert students == ["ann"] and list(unreadable) == ["ben"]


def test_hub_config_documents_every_setting_it_reads():
    text = HUB_CONFIG.read_text()
    doc, code = text.split('"""')[1], text.split('"""', 2)[2]
    import re

    for variable in set(re.findall(r"CNN_COURSE_\w+", code)):
        assert variable in doc, f"{variable} is read but not documented in the docstring"
