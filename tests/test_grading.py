"""The exercise notebook's grading flow with nbgrader (notebooks/09_exercises.ipynb).

One module-scoped run does the work, as course staff would: copy the source into a
temporary nbgrader course directory, generate the student version, build a folder of
submissions from it (filled in programmatically from the instructor version, some
wrong on purpose), autograde them all in ONE `nbgrader autograde` run, and generate
feedback. The tests then read the gradebook. They prove the checks can fail:

* instructor: every solution filled in                    -> all autograded points
* untouched:  the student version as handed out           -> 0 autograded points
* fgsm_only:  exercise 2 right, LRP wrong, the rest empty -> exactly exercise 2's points
* mixed:      ex. 1, 3 right, FGSM steps the wrong way, ex. 4 done with Grad-CAM
              -> exercise 1, 3, 4 points plus the FGSM cells that the mistake does not break
* broken:     ex. 1 loops forever, ex. 3's function raises -> exercises 2 and 4 still graded

The endless loop costs one per-cell timeout, so the autograde run uses a short one
(`--Execute.timeout=LOOP_TIMEOUT`) instead of the 120 s in nbgrader_config.py.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT, count_images, find_number, notebook_text, run_notebook

import cnn_utils
import course

ASSIGNMENT = course.EXERCISE_ASSIGNMENT
SOURCE = ROOT / "notebooks" / f"{ASSIGNMENT}.ipynb"
#: Per-cell limit for the test's autograde run: above the slowest instructor cell
#: (about 10 s on a busy 2-core machine), and what the endless loop costs.
LOOP_TIMEOUT = 30

#: Points of each autograded test cell, by exercise.
POINTS = {
    "ex1_tv_test": 1, "ex1_score_test": 2, "ex1_regularization_test": 1,
    "ex2_norm_test": 1, "ex2_sign_test": 2, "ex2_success_test": 1, "ex2_saliency_test": 1, "ex2_plot_test": 1,
    "ex3_conservation_test": 2, "ex3_gxi_test": 2, "ex3_heatmap_test": 1,
    "ex4_reference_test": 2, "ex4_own_work_test": 1,
}
MANUAL = {"ex2_figure_answer": 1, "ex3_comparison_answer": 1, "ex5_hierarchy": 2, "ex5_spatial": 2,
          "ex5_redundancy": 2, "ex5_abstract": 2, "ex5_uses": 2}


def exercise_cells(n):
    return {g for g in POINTS if g.startswith(f"ex{n}_")}


# What each submission should earn, cell by cell (every other autograded cell: 0).
EXPECTED_FULL = {
    "instructor": set(POINTS),
    "untouched": set(),
    "fgsm_only": exercise_cells(2),
    # FGSM with x - eps*sign(grad): still within the budget (norm test) but the sign pattern and
    # the growth of the success rate fail; saliency and plot, in the same cells, are right.
    "mixed": exercise_cells(1) | exercise_cells(3) | exercise_cells(4)
    | {"ex2_norm_test", "ex2_saliency_test", "ex2_plot_test"},
    "broken": exercise_cells(2) | exercise_cells(4),
}


# ---------------------------------------------------------------------------
# Building submissions from the instructor version
# ---------------------------------------------------------------------------

def grade_id(cell):
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def instructor_answers(source_nb):
    """The instructor's answer in every solution cell (markers removed), by grade id."""
    answers = {}
    for cell in source_nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            lines = [l for l in cell.source.split("\n")
                     if "### BEGIN SOLUTION" not in l and "### END SOLUTION" not in l]
            answers[meta["grade_id"]] = "\n".join(lines)
    return answers


def changed(code, old, new):
    assert old in code, f"the instructor solution no longer contains {old!r}: update the test"
    return code.replace(old, new)


def submissions(source_nb):
    """Solution cells to fill in, per submission: {student: {grade_id: code}}."""
    ok = instructor_answers(source_nb)
    wrong_fgsm = changed(ok["ex2_fgsm"], "x + eps * tf.sign(grad)", "x - eps * tf.sign(grad)")
    wrong_lrp = changed(ok["ex3_lrp"], "R = a * (s @ W.T)", "R = s @ W.T")  # forgets the activations
    grad_cam = changed(ok["ex4_attribution"], 'METHOD = "integrated_gradients"', 'METHOD = "grad_cam"')
    loops = "while True:  # a student's endless loop\n    pass\n" + ok["ex1_tv"]
    raises = changed(ok["ex3_lrp"], "    activations = [np.asarray(a0",
                     "    raise RuntimeError('a bug in the student code')\n    activations = [np.asarray(a0")
    return {
        "instructor": dict(ok),
        "untouched": {},
        "fgsm_only": {"ex2_fgsm": ok["ex2_fgsm"], "ex2_plot": ok["ex2_plot"], "ex2_figure": ok["ex2_figure"],
                      "ex3_lrp": wrong_lrp},
        "mixed": {**ok, "ex2_fgsm": wrong_fgsm, "ex4_attribution": grad_cam},
        "broken": {**ok, "ex1_tv": loops, "ex3_lrp": raises},
    }


def fill(release_nb, answers):
    nb = nbformat.from_dict(release_nb)  # a deep copy
    for cell in nb.cells:
        if grade_id(cell) in answers:
            cell.source = answers[grade_id(cell)]
    return nb


# ---------------------------------------------------------------------------
# The grading run (once per module)
# ---------------------------------------------------------------------------

def nbgrader(*args, course):
    """Run nbgrader from the project folder (so it reads nbgrader_config.py)."""
    env = dict(os.environ)
    # nbgrader runs the `alembic` command of its environment; the notebook's setup cell
    # finds cnn_utils through CNN_COURSE_DIR (the course directory is in /tmp).
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["CNN_COURSE_DIR"] = str(ROOT)
    cmd = [sys.executable, "-m", "nbgrader", *args, f"--CourseDirectory.root={course}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    course_dir = tmp_path_factory.mktemp("course")
    course.grading_source(course_dir)
    times = {}
    start = time.perf_counter()
    nbgrader("generate_assignment", ASSIGNMENT, "--force", course=course_dir)
    times["generate_assignment"] = time.perf_counter() - start

    source_nb = nbformat.read(str(SOURCE), as_version=4)
    release_path = course_dir / "release" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    release_nb = nbformat.read(str(release_path), as_version=4)
    inbox = tmp_path_factory.mktemp("inbox")
    for student, answers in submissions(source_nb).items():
        nbformat.write(fill(release_nb, answers), str(inbox / f"{student}.ipynb"))
    students = course.grading_collect(inbox, course_dir)

    start = time.perf_counter()
    log = nbgrader("autograde", ASSIGNMENT, "--force", f"--Execute.timeout={LOOP_TIMEOUT}", course=course_dir)
    times["autograde (all submissions)"] = time.perf_counter() - start
    start = time.perf_counter()
    nbgrader("generate_feedback", ASSIGNMENT, "--force", course=course_dir)
    times["generate_feedback"] = time.perf_counter() - start
    print("\nnbgrader run times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return {
        "course": course_dir, "students": students, "release": release_nb, "source": source_nb,
        "scores": course.grading_scores(course_dir), "log": log.stdout + log.stderr,
    }


def autograded_points(cells):
    return {gid: g["auto"] for gid, g in cells.items() if gid in POINTS}


def autograded_notebook(graded, student):
    path = graded["course"] / "autograded" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    return nbformat.read(str(path), as_version=4)


def cell_errors(nb, gid):
    cell = next(c for c in nb.cells if grade_id(c) == gid)
    return [o for o in cell.get("outputs", []) if o.output_type == "error"]


# ---------------------------------------------------------------------------
# The student version
# ---------------------------------------------------------------------------

def test_points_in_the_notebook_match_the_tests():
    nb = nbformat.read(str(SOURCE), as_version=4)
    auto, manual = {}, {}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        assert meta.get("schema_version", 3) == 3
        if meta.get("grade"):
            (manual if meta.get("solution") else auto)[meta["grade_id"]] = meta["points"]
    assert auto == POINTS
    assert manual == MANUAL
    assert sum(POINTS.values()) == 18 and sum(MANUAL.values()) == 12


def test_student_version_has_no_solution_and_no_hidden_test(graded):
    release = graded["release"]
    text = "\n".join(c.source for c in release.cells)
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in text
    # Every answer cell is the stub, and no line of any instructor answer survives.
    for cell in release.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution") and cell.cell_type == "code":
            code = re.sub(r"def \w+\(.*?\):", "def", cell.source, flags=re.DOTALL)  # signatures stay
            code_lines = [l.strip() for l in code.split("\n") if l.strip()]
            assert "raise NotImplementedError()" in code_lines, meta["grade_id"]
            body = [l for l in code_lines if not l.startswith(("def", "#", "raise NotImplementedError"))
                    and not l.startswith('METHOD = ')]
            assert body == [], f"{meta['grade_id']} keeps solution code: {body}"
        elif meta.get("solution"):
            assert "YOUR ANSWER HERE" in cell.source
    for snippet in ("tf.sign(grad)", "np.where(z >= 0, 1.0, -1.0)", "tf.clip_by_value(x + lr",
                    "_reference_sign", "_ref_lrp", "_forbidden", "R = a * (s @ W.T)",
                    "LRP on the hand-worked network", "The perturbation is a faint grey texture"):
        assert snippet not in text, snippet
    # The visible tests are still there, with their messages.
    assert "FGSM uses only the *sign* of the gradient" in text
    assert sum(1 for c in release.cells if c.metadata.get("nbgrader", {}).get("grade") and
               not c.metadata["nbgrader"].get("solution")) == len(POINTS)
    # The hidden tests are kept in the gradebook's copy of the test cells.
    hidden_in_source = [c for c in graded["source"].cells if "BEGIN HIDDEN TESTS" in c.source]
    assert len(hidden_in_source) == len(POINTS) - 1  # every test cell but the plot's


# ---------------------------------------------------------------------------
# Autograding
# ---------------------------------------------------------------------------

def test_every_submission_was_graded(graded):
    assert sorted(graded["students"]) == sorted(EXPECTED_FULL)
    assert sorted(graded["scores"]) == sorted(EXPECTED_FULL)
    for student, cells in graded["scores"].items():
        assert set(cells) == set(POINTS) | set(MANUAL), student
        for gid in POINTS:
            assert cells[gid]["auto"] is not None and not cells[gid]["needs_manual"], (student, gid)
            assert not cells[gid]["by_hand"]
        assert all(cells[gid]["by_hand"] for gid in MANUAL)


def test_instructor_version_earns_full_marks(graded):
    got = autograded_points(graded["scores"]["instructor"])
    assert got == {gid: float(p) for gid, p in POINTS.items()}
    assert sum(got.values()) == 18
    # Written answers wait for a human; the autograder gives them nothing yet.
    for gid in MANUAL:
        assert graded["scores"]["instructor"][gid]["needs_manual"]


def test_untouched_student_version_earns_zero(graded):
    cells = graded["scores"]["untouched"]
    assert autograded_points(cells) == {gid: 0.0 for gid in POINTS}
    # Unanswered written questions are recognised (unchanged checksum) and get 0 too.
    assert all(cells[gid]["auto"] == 0 and not cells[gid]["needs_manual"] for gid in MANUAL)
    nb = autograded_notebook(graded, "untouched")
    assert any(o.ename == "NotImplementedError" for c in nb.cells for o in c.get("outputs", [])
               if o.output_type == "error")


@pytest.mark.parametrize("student", ["fgsm_only", "mixed"])
def test_partly_right_submission_earns_exactly_the_right_parts(graded, student):
    got = autograded_points(graded["scores"][student])
    expected = {gid: float(POINTS[gid]) if gid in EXPECTED_FULL[student] else 0.0 for gid in POINTS}
    assert got == expected
    total = {"fgsm_only": 6, "mixed": 15}[student]
    assert sum(got.values()) == total


def test_wrong_code_gets_a_helpful_message(graded):
    nb = autograded_notebook(graded, "mixed")
    [err] = cell_errors(nb, "ex2_sign_test")
    assert "step *against* the gradient" in err.evalue
    nb = autograded_notebook(graded, "fgsm_only")
    [err] = cell_errors(nb, "ex3_conservation_test")
    assert "sum of relevance" in err.evalue and "class score" in err.evalue


def test_endless_loop_and_exception_do_not_stop_grading(graded):
    got = autograded_points(graded["scores"]["broken"])
    expected = {gid: float(POINTS[gid]) if gid in EXPECTED_FULL["broken"] else 0.0 for gid in POINTS}
    assert got == expected and sum(got.values()) == 9
    nb = autograded_notebook(graded, "broken")
    loop_cell = next(c for c in nb.cells if grade_id(c) == "ex1_tv")
    enames = {o.ename for o in loop_cell.outputs if o.output_type == "error"}
    assert enames & {"KeyboardInterrupt", "CellTimeoutError"}, enames  # interrupted, not hung
    [err] = cell_errors(nb, "ex3_conservation_test")
    assert err.ename == "RuntimeError" and "a bug in the student code" in err.evalue


def test_feedback_is_generated_for_every_student(graded):
    for student in EXPECTED_FULL:
        html = (graded["course"] / "feedback" / student / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
        assert "Score:" in html or "score" in html.lower()
    html = (graded["course"] / "feedback" / "mixed" / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
    assert "step *against* the gradient" in html


def test_scores_table(graded, capsys):
    course.main(["grading", "scores", "--course-dir", str(graded["course"])])
    out = capsys.readouterr().out
    assert out.split("\n")[0].split() == ["student", "ex1", "ex2", "ex3", "ex4", "autograded", "by", "hand"]
    assert re.search(r"instructor\s+4\s+6\s+5\s+3\s+18 / 18\s+0 / 12 \(7 to grade\)", out), out
    assert re.search(r"mixed\s+4\s+3\s+5\s+3\s+15 / 18", out), out
    assert re.search(r"untouched\s+0\s+0\s+0\s+0\s+0 / 18\s+0 / 12\n", out), out


# ---------------------------------------------------------------------------
# Configuration, glue and check helpers (no notebook runs)
# ---------------------------------------------------------------------------

def test_config_raises_the_execution_timeout():
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config()
    assert config.Execute.timeout > 30  # nbgrader's default would stop slow optimisation cells
    assert config.Execute.interrupt_on_timeout is True  # an endless loop is interrupted
    assert Path(config.CourseDirectory.root) == ROOT / "nbgrader"


def test_course_directory_is_git_ignored():
    lines = (ROOT / ".gitignore").read_text().split()
    assert "/nbgrader/" in lines


def test_grading_command_line(tmp_path, capsys):
    course.main(["grading", "source", "--course-dir", str(tmp_path)])
    copied = tmp_path / "source" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    assert copied.read_bytes() == SOURCE.read_bytes()
    with pytest.raises(SystemExit):
        course.main(["grading", "collect", "--course-dir", str(tmp_path)])
    assert "needs a FOLDER" in capsys.readouterr().err


def test_grading_collect_layout_and_errors(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with pytest.raises(course.CourseError, match="No submissions"):
        course.grading_collect(inbox, tmp_path / "course")
    nbformat.write(nbformat.v4.new_notebook(), str(inbox / "alice.ipynb"))
    assert course.grading_collect(inbox, tmp_path / "course") == ["alice"]
    assert (tmp_path / "course" / "submitted" / "alice" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb").is_file()
    (inbox / "bob.ipynb").write_text("not a notebook")
    with pytest.raises(course.CourseError, match="bob.ipynb is not a readable notebook"):
        course.grading_collect(inbox, tmp_path / "course")
    with pytest.raises(course.CourseError, match="No gradebook"):
        course.grading_scores(tmp_path / "course")


def test_check_array_messages():
    import numpy as np

    assert cnn_utils.check_array([1, 2], "x").dtype == np.float64
    with pytest.raises(AssertionError, match=r"f returned None: did you forget the `return`"):
        cnn_utils.check_array(None, "f")
    with pytest.raises(AssertionError, match=r"should have shape \(2, 2\), got \(4,\)"):
        cnn_utils.check_array(np.zeros(4), "x", shape=(2, 2))
    with pytest.raises(AssertionError, match="contains 1 NaN"):
        cnn_utils.check_array([0.0, np.nan], "x")
    with pytest.raises(AssertionError, match=r"should be <= 1.0, but its maximum is 1.5"):
        cnn_utils.check_array([0.0, 1.5], "x", low=0.0, high=1.0)
    with pytest.raises(AssertionError, match=r"should be >= 0.0, but its minimum is -0.25"):
        cnn_utils.check_array([-0.25, 0.5], "x", low=0.0, high=1.0)
    with pytest.raises(AssertionError, match="array of numbers, got dict"):
        cnn_utils.check_array({"a": 1}, "x")


def test_check_close_messages():
    import numpy as np

    assert cnn_utils.check_close([1.0, 2.0], [1.0, 2.0 + 1e-9], "x") is None
    assert cnn_utils.check_close(np.array(0.9), 0.9, "tv") is None
    assert cnn_utils.check_close(np.array([0.9]), 0.9, "tv") is None  # one value vs a scalar
    with pytest.raises(AssertionError) as info:
        cnn_utils.check_close([[1.0, 2.0], [3.0, 5.0]], [[1.0, 2.0], [3.0, 4.0]], "R", hint="Check z.")
    assert str(info.value) == ("R is wrong in 1 of 4 value(s); the largest difference is 1 at index (1, 1) "
                               "(got 5, expected 4). Check z.")
    with pytest.raises(AssertionError, match=r"R should have shape \(3,\), got \(2,\)"):
        cnn_utils.check_close([1.0, 2.0], [1.0, 2.0, 3.0], "R")
    # The tolerance is atol + rtol * |expected|.
    assert cnn_utils.check_close([100.5], [100.0], "x", rtol=0.01, atol=0) is None
    with pytest.raises(AssertionError):
        cnn_utils.check_close([100.5], [100.0], "x", rtol=0.001, atol=0)


# ---------------------------------------------------------------------------
# The notebook in the series (papermill, as `make course` runs it)
# ---------------------------------------------------------------------------

@pytest.mark.notebook
def test_exercise_notebook_runs_with_its_solutions(tmp_path):
    nb = run_notebook(f"{ASSIGNMENT}.ipynb", tmp_path)
    text = notebook_text(nb)
    assert not re.search(r"\bnan\b", text.lower())
    assert find_number(text, "accuracy on the slice:") > 0.95
    before, after = map(float, re.search(r"class 8 score: (-?[0-9.]+) at the start, (-?[0-9.]+) after", text).groups())
    assert after > before + 5
    assert find_number(text, "eps = 0.2 : success rate") > find_number(text, "eps = 0.01: success rate")
    # Figures: class images, success rate, FGSM figure, LRP vs saliency, own method.
    assert count_images(nb) == 5
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
