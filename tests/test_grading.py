"""Grading the exercise notebook as course staff would (``python -m course grade FOLDER``).

One module-scoped run does the work: copy the course under /tmp (a course anywhere on disk must
grade), release the student version into a temporary nbgrader course directory, build a folder of
submissions from it (filled in programmatically from the instructors' version; honest, wrong,
cheating, attacking and crashing ones), and grade them all with ONE ``python -m course grade``
(parallel, sandboxed) run in the copy. The tests then read scores.csv, the gradebook, the
autograded notebooks and the feedback pages. The attacks are written as a student would, from
what the student version, the course's shipped files and the installed packages show:

* instructor    every solution filled in                            -> 18, graded, no flag
* untouched     the student version as handed out                   -> 0, graded, no flag
* transformer   blank + an IPython input transformer that turns every later cell into `pass`
                                                                    -> 0 (like blank)
* monkeypatch   right answers but LRP wrong, with check_close, check_array and
                numpy.testing replaced                              -> 13 (what the answers earn)
* cells         right answers, a test cell deleted, one edited, an attempt to append to
                cnn_utils.py                                        -> 15, flagged; files unchanged
* wrong         a real test digit instead of the ascent, FGSM success counted over all images,
                an invisible plot, `from cnn_utils import grad_cam as _gc`, an endless Python
                loop (interrupted)                                  -> 12, graded, no flag
* crash         ex. 1-2 right, then os._exit in exercise 3          -> failed, 10 points, feedback
* stuck         a loop inside a tf.function that SIGINT cannot stop -> failed, feedback
* attack_channel  blank + jupyter_client's Session.send patched to drop errors (and error
                replies made "ok"), forged results written to every /proc/*/fd it can open,
                SIGKILL to pid 1 and the parent, the sandbox's run_calls replaced by one that
                claims results                                      -> 0
* attack_checks   the check helpers' __code__ swapped for no-ops, and every function returns
                an object whose .numpy()/__array__ walks the stack for the expected value -> 0
* attack_recompile  ex. 4 by the course's grad_cam recompiled from cnn_utils.py's source
                                                                    -> 2 (ex4 reference only, as
                                                                       calling it openly), own work 0
* attack_leak   blank; the functions print the calling frames' source (linecache) when the
                grader calls them; a cell reads /etc/shadow, every /proc/*/environ, the
                environment, and looks for the hidden tests on disk -> 0, nothing leaks
* limits        right answers + /tmp filled, a 100 MB single-line print, processes spawned
                until refused                                       -> 18, graded; all bounded
"""
import json
import re
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT

import cnn_utils
import course
from cnnlib import grading

ASSIGNMENT = course.EXERCISE_ASSIGNMENT
SOURCE = course.EXERCISE_SOURCE
pytestmark = pytest.mark.skipif(not SOURCE.is_file(), reason="a copy of the course without instructors/")
#: Per-cell limit for the test run: above the slowest honest cell on a busy 2-core machine,
#: and what the endless loops cost.
CELL_TIMEOUT = 30

#: Points of each autograded test cell, by exercise.
POINTS = {
    "ex1_tv_test": 1, "ex1_score_test": 2, "ex1_regularization_test": 1,
    "ex2_norm_test": 1, "ex2_sign_test": 2, "ex2_success_test": 1, "ex2_saliency_test": 1, "ex2_plot_test": 1,
    "ex3_conservation_test": 2, "ex3_gxi_test": 2, "ex3_heatmap_test": 1,
    "ex4_reference_test": 2, "ex4_own_work_test": 1,
}
MANUAL = {"ex2_figure_answer": 1, "ex3_comparison_answer": 1, "ex5_hierarchy": 2, "ex5_spatial": 2,
          "ex5_redundancy": 2, "ex5_abstract": 2, "ex5_uses": 2}


def exercise_cells(*numbers):
    return {g for g in POINTS if int(g[2]) in numbers}


#: What each submission should earn, test cell by test cell (every other autograded cell: 0).
EXPECTED = {
    "instructor": set(POINTS),
    "untouched": set(),
    "transformer": set(),
    "monkeypatch": set(POINTS) - exercise_cells(3),
    "cells": set(POINTS) - {"ex1_tv_test", "ex2_sign_test"},
    "wrong": set(POINTS) - {"ex1_score_test", "ex1_regularization_test", "ex2_success_test", "ex2_plot_test",
                            "ex4_own_work_test"},
    "crash": exercise_cells(1, 2),
    "stuck": set(),
    "attack_channel": set(),
    "attack_checks": set(),
    "attack_recompile": {"ex4_reference_test"},
    "attack_leak": set(),
    "limits": set(POINTS),
}
STATUS = {"instructor": "graded", "untouched": "graded", "transformer": "graded", "monkeypatch": "graded",
          "cells": "flagged", "wrong": "graded", "crash": "failed", "stuck": "failed", "attack_channel": "graded",
          "attack_checks": "graded", "attack_recompile": "graded", "attack_leak": "graded", "limits": "graded"}
#: Set in the grader's environment: no submission may see it.
CANARY = "canary-3f9d2a-grader-secret"


# ---------------------------------------------------------------------------
# Building submissions from the instructors' version
# ---------------------------------------------------------------------------

def grade_id(cell):
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def changed(code, old, new):
    assert old in code, f"the instructors' solution no longer contains {old!r}: update the test"
    return code.replace(old, new)


STUB = "# YOUR CODE HERE\nraise NotImplementedError()"

TRANSFORMER = '''def _neutralise(lines):
    return ["pass\\n"]
get_ipython().input_transformers_post.append(_neutralise)
'''

MONKEYPATCH = '''import numpy.testing
cnn_utils.check_close = lambda *args, **kwargs: None
cnn_utils.check_array = lambda value, *args, **kwargs: np.asarray(value, dtype=float)
np.testing.assert_allclose = lambda *args, **kwargs: None
'''

APPEND = '''with open(cnn_utils.__file__, "a") as f:   # make the helpers accept anything, for everyone after me
    f.write("\\ncheck_close = lambda *a, **k: None\\n")
'''

REAL_DIGIT = '''def class_activation_maximization(score_model, class_index, steps=60, lr=0.2, tv_weight=0.0,
                                  l2_weight=0.0, seed=0):
    return x_test[np.flatnonzero(y_test == class_index)[0]].copy()   # a real digit: no ascent at all
'''

OWN_WORK_ALIAS = '''from cnn_utils import grad_cam as _gc
METHOD = "grad_cam"

def my_attribution(model, images, class_index=None):
    return _gc(model, images, class_index=class_index)
'''

COMPILED_LOOP = '''@tf.function
def _spin():
    return tf.while_loop(lambda i: tf.constant(True), lambda i: i + 1, [tf.constant(0)])
_spin()
'''


# --- attacks, as a student would write them --------------------------------

SESSION_SEND = '''import jupyter_client.session as _session   # outgoing kernel messages: drop every failure
_send = _session.Session.send

def _quiet_send(self, stream, msg_or_type, content=None, *args, **kwargs):
    kind = msg_or_type if isinstance(msg_or_type, str) else msg_or_type.get("header", {}).get("msg_type")
    if kind == "error" or (kind == "stream" and (content or {}).get("name") == "stderr"):
        return None
    if kind == "execute_reply" and (content or {}).get("status") == "error":
        content = {**content, "status": "ok"}
    return _send(self, stream, msg_or_type, content, *args, **kwargs)
_session.Session.send = _quiet_send
'''

CHANNEL = '''import glob, json, os, signal, sys
reached = []
forged = json.dumps({"kind": "test", "name": "ex1_tv_test", "answers": [{}] * 8, "arrays": {}}) + "\\n"
for path in glob.glob("/proc/[0-9]*/fd/*"):   # the grader's pipe, wherever it is
    if path.startswith((f"/proc/{os.getpid()}/", "/proc/self/")):
        continue
    try:
        with open(path, "w") as f:
            f.write(forged)
        reached.append(path)
    except OSError:
        pass
for pid in (1, os.getppid()):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
print("reached:", reached)
_grader = sys.modules.get("grading_sandbox")
if _grader is not None:                          # claim results without calling anything
    def _claim(namespace, name):
        import numpy as np
        n = len(json.loads((_grader.JOB_DIR / f"{name}.json").read_text())["calls"])
        np.savez(_grader.JOB_DIR / "out" / f"{name}.npz", **{str(i): np.zeros(3) for i in range(n)})
        (_grader.JOB_DIR / "out" / f"{name}.json").write_text(json.dumps([{"text": "grad_cam"}] * n))
    _grader.run_calls = _claim
'''

ORACLE = '''import inspect
for _name in [n for n in dir(cnn_utils) if n.startswith("check_")]:
    try:
        getattr(cnn_utils, _name).__code__ = (lambda *a, **k: None).__code__
    except (AttributeError, ValueError):
        pass

class Oracle:
    """Finds the caller's expected value on the stack instead of computing anything."""
    def _find(self):
        for frame in inspect.stack():
            for key, value in list(frame.frame.f_locals.items()):
                if key in ("expected", "exp", "ref", "reference", "desired", "target") and isinstance(value, np.ndarray):
                    return value
        return np.zeros(1)
    def numpy(self):
        return self._find()
    def __array__(self, dtype=None, copy=None):
        return np.asarray(self._find(), dtype=dtype)
'''

ORACLE_ANSWERS = {
    "ex1_tv": "def total_variation(x):\n    return Oracle()\n",
    "ex1_cam": "def class_activation_maximization(score_model, class_index, steps=60, lr=0.2, tv_weight=0.0,\n"
               "                                  l2_weight=0.0, seed=0):\n    return Oracle()\n",
    "ex2_fgsm": "def fgsm(score_model, images, labels, eps):\n    return Oracle()\n\n"
                "def attack_success_rate(score_model, images, labels, eps):\n    return Oracle()\n\n"
                "def saliency(score_model, images, class_index=None):\n    return Oracle()\n",
    "ex2_plot": "def plot_success_vs_eps(epsilons, rates):\n    return Oracle()\n",
    "ex3_lrp": "def lrp_epsilon(a0, layers, class_index=None, eps=0.01):\n    return Oracle()\n\n"
               "def lrp_heatmap(model, images, class_index=None, eps=0.01):\n    return Oracle()\n",
    "ex4_attribution": 'METHOD = "grad_cam"\n\ndef my_attribution(model, images, class_index=None):\n    return Oracle()\n',
}

RECOMPILE = '''import types
METHOD = "grad_cam"
_copy = types.ModuleType("course_copy")          # the course's method, recompiled from its file
_copy.__file__ = cnn_utils.__file__
exec(compile(open(cnn_utils.__file__).read(), cnn_utils.__file__, "exec"), _copy.__dict__)

def my_attribution(model, images, class_index=None):
    return _copy.grad_cam(model, images, class_index=class_index)
'''

LEAK_FUNCTIONS = '''import inspect, linecache

def _leak():
    stack = inspect.stack()
    if any("run_calls" in f.function or "grad" in f.filename for f in stack[1:]):
        for f in stack[1:]:
            print("LEAK" + "-MARKER", f.filename, f.lineno, "".join(linecache.getlines(f.filename))[:3000])
            print("LEAK" + "-MARKER locals", {k: repr(v)[:200] for k, v in f.frame.f_locals.items()})

def total_variation(x):
    _leak()
    raise NotImplementedError()
'''

LEAK_ATTRIBUTION = '''METHOD = "grad_cam"

def my_attribution(model, images, class_index=None):
    _leak()
    raise NotImplementedError()
'''

SECRETS = '''import glob, os, sys
found = {}
for path in ["/etc/shadow", "/proc/1/environ", "/proc/1/cmdline", *glob.glob("/proc/[0-9]*/environ")]:
    try:
        found[path] = open(path, "rb").read()[:2000]
    except OSError as err:
        found[path] = type(err).__name__
found["env"] = dict(os.environ)
hits, seen = [], 0
for top, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in ("/proc", "/sys", "/usr", "/dev", sys.prefix)]
    hits += [os.path.join(top, f) for f in files if "grading_tests" in f or f.startswith("11_exercises")]
    seen += len(files)
    if seen > 50000:
        break
print("secrets:", found)
print("hidden tests found:", hits)
'''

FILL_TMP = '''import os
written = 0
try:
    with open("/tmp/fill", "wb") as f:
        for _ in range(64):                      # up to 1 GB in 16 MB blocks
            f.write(b"\\0" * (16 << 20))
            f.flush()
            written += 16 << 20
except OSError as err:
    print("/tmp refused:", type(err).__name__)
os.remove("/tmp/fill")
print("written MB:", written >> 20)
'''

HUGE_LINE = 'print("x" * 100_000_000)\n'

SPAWN = '''import subprocess
children = []
try:
    for _ in range(3000):
        children.append(subprocess.Popen(["sleep", "60"]))
except OSError as err:
    print("spawn refused:", type(err).__name__)
print("children:", len(children))
for child in children:
    child.kill()
    child.wait()
'''


def submissions(source_nb, release_nb):
    """Every submission as a notebook: {student: notebook}."""
    ok = course.instructor_answers(source_nb)
    wrong_lrp = changed(ok["ex3_lrp"], "R = a * (s @ W.T)", "R = s @ W.T")  # forgets the activations
    count_all = changed(ok["ex2_fgsm"], """    correct = np.argmax(score_model(images), axis=1) == labels
    adversarial = fgsm(score_model, images[correct], labels[correct], eps)
    return float(np.mean(np.argmax(score_model(adversarial), axis=1) != labels[correct]))""",
                        """    adversarial = fgsm(score_model, images, labels, eps)      # counts every image
    return float(np.mean(np.argmax(score_model(adversarial), axis=1) != labels))""")
    invisible = changed(ok["ex2_plot"], 'ax.plot(epsilons, rates, marker="o")',
                        'ax.plot(epsilons, rates, marker="o", alpha=0.0)')

    def fill(answers, extra=(), drop=(), edit=None):
        nb = nbformat.from_dict(release_nb)  # a deep copy
        for cell in nb.cells:
            if grade_id(cell) in answers:
                cell.source = answers[grade_id(cell)]
            if edit and grade_id(cell) in edit:
                cell.source = edit[grade_id(cell)]
        for after, code in extra:  # student cells of their own, after the cell with this grade id
            i = next(i for i, c in enumerate(nb.cells) if grade_id(c) == after)
            nb.cells.insert(i + 1, nbformat.v4.new_code_cell(code))
        nb.cells = [c for c in nb.cells if grade_id(c) not in drop]
        return nb

    return {
        "instructor": fill(ok),
        "untouched": fill({}),
        "transformer": fill({"ex1_tv": TRANSFORMER + STUB}),
        "monkeypatch": fill({**ok, "ex1_tv": MONKEYPATCH + ok["ex1_tv"], "ex3_lrp": wrong_lrp}),
        "cells": fill(ok, extra=[("ex1_tv", APPEND)], drop={"ex1_tv_test"},
                      edit={"ex2_sign_test": "# Test 2a\npass\n"}),
        "wrong": fill({**ok, "ex1_cam": REAL_DIGIT, "ex2_fgsm": count_all, "ex2_plot": invisible,
                       "ex4_attribution": OWN_WORK_ALIAS},
                      extra=[("ex4_own_work_test", "while True:  # a student's endless loop\n    pass\n")]),
        "crash": fill({**ok, "ex3_lrp": "import os\nos._exit(1)\n" + ok["ex3_lrp"]}),
        "stuck": fill({**ok, "ex1_tv": COMPILED_LOOP + ok["ex1_tv"]}),
        "attack_channel": fill({"ex1_tv": SESSION_SEND + CHANNEL + STUB}),
        "attack_checks": fill({**ORACLE_ANSWERS, "ex1_tv": ORACLE + ORACLE_ANSWERS["ex1_tv"]}),
        "attack_recompile": fill({"ex4_attribution": RECOMPILE}),
        "attack_leak": fill({"ex1_tv": LEAK_FUNCTIONS, "ex4_attribution": LEAK_ATTRIBUTION},
                            extra=[("setup", SECRETS)]),
        "limits": fill(ok, extra=[("setup", FILL_TMP), ("data", HUGE_LINE), ("helpers", SPAWN)]),
    }


# ---------------------------------------------------------------------------
# The grading run (once per module)
# ---------------------------------------------------------------------------

def copy_of_the_course(dest):
    """The course as a private copy (its files in git and the working tree's changes), e.g. under /tmp."""
    import shutil
    import subprocess

    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for name in filter(None, names):
        if (ROOT / name).is_file() and not name.startswith(("nbgrader/", "build/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def grade_in(copy, *args, env=None):
    """``python -m course grade ARGS`` run in a copy of the course: (exit status, output)."""
    import os
    import subprocess

    run = subprocess.run([sys.executable, "-m", "course", "grade", *args], cwd=copy, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    return run.returncode, run.stdout + run.stderr


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    tmp = Path(tempfile.mkdtemp(prefix="cnn-course-under-tmp-", dir="/tmp"))  # a course under /tmp
    copy = copy_of_the_course(tmp / "cnn-course")
    course_dir = tmp / "nbgrader-course"
    student_copy = course_dir / "student_version.ipynb"
    grading.release(course_dir, student_copy=student_copy)
    source_nb = nbformat.read(str(SOURCE), as_version=4)
    release_nb = nbformat.read(str(student_copy), as_version=4)
    inbox = tmp / "inbox"
    inbox.mkdir()
    for student, nb in submissions(source_nb, release_nb).items():
        nbformat.write(nb, str(inbox / f"{student}.ipynb"))
    (inbox / "unreadable.ipynb").write_text("{ this is not a notebook")
    before = grading.course_file_hashes(copy)
    status, out = grade_in(copy, str(inbox), "--course-dir", str(course_dir), "--jobs", "2",
                           f"--cell-timeout={CELL_TIMEOUT}", "--notebook-timeout=600", env={"CNN_GRADER_CANARY": CANARY})
    print(out)
    rows = {r["student_id"]: r for r in _read_csv(course_dir / "reports" / "scores.csv")}
    yield {"course": course_dir, "copy": copy, "status": status, "stdout": out, "rows": rows,
           "student_copy": student_copy, "source": source_nb, "release": release_nb,
           "scores": grading.grading_scores(course_dir), "hashes_before": before}
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


def _read_csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def autograded_notebook(graded, student):
    return nbformat.read(str(grading._notebook_path(graded["course"], "autograded", student)), as_version=4)


def feedback_html(graded, student):
    return grading._notebook_path(graded["course"], "feedback", student).with_suffix(".html").read_text()


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


def test_committed_student_version_is_generated_from_the_source(graded):
    committed = nbformat.read(str(course.STUDENT_NOTEBOOK), as_version=4)
    fresh = nbformat.read(str(graded["student_copy"]), as_version=4)
    assert [(c.cell_type, c.source, c.metadata) for c in committed.cells] == \
           [(c.cell_type, c.source, c.metadata) for c in fresh.cells], \
        "notebooks/11_exercises.ipynb is out of date: run `python -m course release`"


def test_student_version_has_no_solution_and_no_hidden_test():
    release = nbformat.read(str(course.STUDENT_NOTEBOOK), as_version=4)
    text = "\n".join(c.source for c in release.cells)
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in text
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
    for snippet in ("tf.sign(grad)", "np.where(z >= 0, 1.0, -1.0)", "tf.clip_by_value(x + lr", "_reference_sign",
                    "_reference_ascent", "_ref_lrp", "check_not_calling", "R = a * (s @ W.T)",
                    "LRP on the hand-worked network", "The perturbation is a grey texture"):
        assert snippet not in text, snippet
    assert "FGSM uses only the *sign* of the gradient" in text  # the visible tests stay
    source_text = "\n".join(c.source for c in nbformat.read(str(SOURCE), as_version=4).cells)
    assert "BEGIN HIDDEN TESTS" not in source_text  # the hidden tests live in instructors/grading_tests.py only
    tests = grading.load_grading_tests()
    assert set(tests.CALLS) == set(tests.CHECKS) == set(POINTS) and set(tests.OWN_WORK) == {"ex4_own_work_test"}


def test_make_course_hands_out_the_student_version():
    # the instructors' version runs apart, into build/instructors/ (tests/test_handout.py)
    assert course.notebook_paths([ASSIGNMENT]) == [course.STUDENT_NOTEBOOK]


# ---------------------------------------------------------------------------
# Scores, statuses and flags
# ---------------------------------------------------------------------------

def test_scores_csv_columns_and_exit_status(graded):
    assert graded["status"] == 0  # only students failed
    header = list(next(iter(graded["rows"].values())))
    assert header == ["student_id", "status", "ex1", "ex2", "ex3", "ex4", "autograded_total", "flags"]
    assert sorted(graded["rows"]) == sorted([*EXPECTED, "unreadable"])
    assert all(r["status"] in course.STATUSES for r in graded["rows"].values())
    # The table is printed too.
    assert re.search(r"instructor\s+graded\s+4\s+6\s+5\s+3\s+18", graded["stdout"]), graded["stdout"]


@pytest.mark.parametrize("student", sorted(EXPECTED))
def test_each_submission_scores_what_a_fair_instructor_would_give(graded, student):
    cells = graded["scores"][student]
    got = {gid: cells[gid]["auto"] for gid in POINTS}
    expected = {gid: float(POINTS[gid]) if gid in EXPECTED[student] else 0.0 for gid in POINTS}
    assert got == expected
    row = graded["rows"][student]
    assert row["status"] == STATUS[student], row
    assert float(row["autograded_total"]) == sum(expected.values())
    for ex in ("ex1", "ex2", "ex3", "ex4"):
        assert float(row[ex]) == sum(v for g, v in expected.items() if g.startswith(ex))
    if STATUS[student] == "graded":
        assert row["flags"] == "", f"an honest submission was flagged: {row['flags']}"


def test_only_deleted_or_edited_test_cells_are_flagged(graded):
    """Tampering inside the notebook earns nothing and needs no flag; the grader sees deleted or
    edited test cells in the submitted file and flags them."""
    rows = graded["rows"]
    assert "deleted read-only cell ex1_tv_test" in rows["cells"]["flags"]
    assert "edited read-only cell ex2_sign_test" in rows["cells"]["flags"]
    for student in ("transformer", "monkeypatch"):
        assert rows[student]["flags"] == ""
    nb = autograded_notebook(graded, "monkeypatch")
    [err] = cell_errors(nb, "ex3_gxi_test")   # the grader's own message, whatever the helpers became
    assert err.ename == "AssertionError" and "gradient x input" in err.evalue


def cell_text(nb, marker):
    """The text outputs of the code cell whose source contains ``marker``."""
    cell = next(c for c in nb.cells if marker in c.source)
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_channel_attacks_reach_nothing(graded):
    nb = autograded_notebook(graded, "attack_channel")
    assert "reached: []" in cell_text(nb, "glob.glob(\"/proc/[0-9]*/fd/*\")")
    assert all(e.ename == "AssertionError" for gid in POINTS for e in cell_errors(nb, gid))


def test_no_secret_reaches_a_submission(graded):
    nb = autograded_notebook(graded, "attack_leak")
    text = cell_text(nb, "hidden tests found:")
    assert "secrets:" in text and "hidden tests found: []" in text
    assert CANARY not in text and "root:" not in text and "/etc/shadow': 'FileNotFoundError'" in text
    assert "'/proc/1/environ': 'PermissionError'" in text  # the sandbox's first process, not the grader
    assert "CNN_COURSE_DATA" in text and "PATH" in text  # the sandbox's own few variables


def test_nothing_printed_while_the_grader_calls_reaches_a_student(graded):
    nb = autograded_notebook(graded, "attack_leak")
    html = feedback_html(graded, "attack_leak")
    outputs = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "LEAK-MARKER" not in outputs and "LEAK-MARKER" not in html
    for gid in POINTS:
        cell = next(c for c in nb.cells if grade_id(c) == gid)
        assert len(cell.outputs) == 1


def test_own_work_runs_without_the_course_methods(graded):
    nb = autograded_notebook(graded, "attack_recompile")
    [err] = cell_errors(nb, "ex4_own_work_test")
    assert "yourself" in err.evalue
    assert not cell_errors(nb, "ex4_reference_test")  # calling the reference openly passes 4a, as before


def test_limits_bound_what_a_submission_takes(graded):
    nb = autograded_notebook(graded, "limits")
    written = int(re.search(r"written MB: (\d+)", cell_text(nb, "/tmp/fill")).group(1))
    assert written <= grading.TMP_LIMIT_MB
    children = int(re.search(r"children: (\d+)", cell_text(nb, "sleep")).group(1))
    assert 0 < children < grading.PROCESS_LIMIT
    huge = cell_text(nb, "100_000_000")
    assert len(huge) <= grading.OUTPUT_CHARS + 100 and "output cut" in huge
    path = grading._notebook_path(graded["course"], "autograded", "limits")
    assert path.stat().st_size < 3_000_000
    assert len(feedback_html(graded, "limits")) < 5_000_000


def test_course_files_are_unchanged_and_read_only_to_students(graded):
    assert grading.course_file_hashes(graded["copy"]) == graded["hashes_before"]
    nb = autograded_notebook(graded, "cells")
    append = next(c for c in nb.cells if "make the helpers accept anything" in c.source)
    [err] = [o for o in append.outputs if o.output_type == "error"]
    if grading.sandbox_available():  # read-only, and not the sandbox user's
        assert "Read-only file system" in err.evalue or "Permission denied" in err.evalue


def test_wrong_answers_get_messages_that_say_what_is_wrong(graded):
    nb = autograded_notebook(graded, "wrong")
    messages = {gid: " ".join(e.evalue for e in cell_errors(nb, gid))
                for gid in ("ex1_score_test", "ex2_success_test", "ex2_plot_test", "ex4_own_work_test")}
    assert "start_image(seed)" in messages["ex1_score_test"]
    assert "classified correctly before the attack" in messages["ex2_success_test"]
    assert "cannot be seen in the figure" in messages["ex2_plot_test"]
    assert "grad_cam" in messages["ex4_own_work_test"] and "yourself" in messages["ex4_own_work_test"]
    loop = next(c for c in nb.cells if "a student's endless loop" in c.source)
    assert {o.ename for o in loop.outputs if o.output_type == "error"} & {"KeyboardInterrupt", "CellTimeoutError"}


def test_failed_submissions_keep_what_ran_and_say_why(graded):
    rows = graded["rows"]
    assert "kernel died" in rows["crash"]["flags"]
    assert "could not be interrupted" in rows["stuck"]["flags"]
    assert "could not be read" in rows["unreadable"]["flags"] and rows["unreadable"]["status"] == "failed"
    nb = autograded_notebook(graded, "crash")
    [err] = cell_errors(nb, "ex3_conservation_test")
    assert err.ename == "NotRun" and "kernel died" in err.evalue
    for student in ("crash", "stuck"):
        assert "Score" in feedback_html(graded, student)


# ---------------------------------------------------------------------------
# Feedback
# ---------------------------------------------------------------------------

def test_feedback_shows_results_and_messages_but_no_hidden_test(graded):
    for student in EXPECTED:
        html = feedback_html(graded, student)
        for secret in ("BEGIN HIDDEN", "_reference_ascent", "_reference_sign", "_reference_rate", "_ref_lrp",
                       "_ref_heat", "check_not_calling", "R = a * ((R / (z + eps", "LRP on the hand-worked network",
                       "reference_ascent", "ref_lrp", "atol=2e-3", "X20_23", "LEAK-MARKER", CANARY):
            assert secret not in html, (student, secret)
    html = feedback_html(graded, "wrong")
    assert "cannot be seen in the figure" in html
    assert "more tests run when grading" in html
    assert "Traceback" not in html.split("ex4_own_work_test")[-1][:5000]


def test_written_answers_read_to_be_graded(graded):
    html = feedback_html(graded, "instructor")
    assert "to be graded" in html
    assert "12.0 of these points are still to be graded by hand" in html
    assert "Score: 0.0 / 2.0" not in html


def test_instructors_notebook_states_what_its_outputs_show(graded):
    """The graded instructors' answers are the notebook run top to bottom: its claims hold."""
    from conftest import notebook_values

    nb = autograded_notebook(graded, "instructor")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    values = notebook_values(nb)
    assert values["slice_misclassified"] == 4 and values["slice_accuracy"] == 60 / 64
    # the model answers of 2d and 3c hold for what the notebook shows: some predictions flip and some
    # resist, clipping keeps pixels still, the strokes stay visible; LRP and saliency rank pixels
    # differently and almost all of the LRP relevance is positive
    assert 0 < values["fgsm_figure_flipped"] < values["fgsm_figure_n"], values
    assert values["fgsm_clipped"] > 0.05 and values["fgsm_stroke_gap"] > 0.5, values
    assert sum(values["lrp_saliency_rank_correlation"]) / len(values["lrp_saliency_rank_correlation"]) < 0.8
    assert max(values["lrp_negative_share"]) < 0.1, values["lrp_negative_share"]
    stderr = [o for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert stderr == [], "TensorFlow's start-up lines (or other stderr) reach the graded notebook"


# ---------------------------------------------------------------------------
# Configuration, sandbox and check helpers (no notebook runs)
# ---------------------------------------------------------------------------

def test_config_puts_the_course_steps_into_nbgrader():
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT)).load_config()
    assert grading.SandboxedExecute in config.Autograde.autograde_preprocessors
    assert grading.RestoreCells in config.Autograde.sanitize_preprocessors
    assert grading.FeedbackView in config.GenerateFeedback.preprocessors
    assert config.SandboxedExecute.cell_timeout > 30  # nbgrader's default would stop slow optimisation cells
    assert Path(config.CourseDirectory.root) == ROOT / "nbgrader"


def test_course_directory_is_git_ignored():
    assert "/nbgrader/" in (ROOT / ".gitignore").read_text().split()


def test_sandbox_hides_solutions_network_and_the_grader():
    cmd = grading.sandbox_command(["python"])
    for option in ("--unshare-net", "--unshare-pid", "--unshare-user", "--as-pid-1", "--new-session",
                   "--die-with-parent", "--clearenv", "--cap-drop"):
        assert option in cmd
    assert cmd[cmd.index("--size") + 2:cmd.index("--size") + 4] == ["--tmpfs", "/tmp"]  # a size-limited /tmp
    bound = [cmd[i + 1] for i, a in enumerate(cmd) if a in ("--ro-bind-try", "--bind", "--ro-bind")]
    for secret in ("instructors", "nbgrader", "build", ".git"):
        assert str(ROOT / secret) not in bound
    assert str(ROOT) not in bound  # only the runtime files of the course, one by one
    assert str(ROOT / "cnn_utils.py") in bound and str(ROOT / "cnnlib") in bound
    assert "/etc" not in bound and "/etc/shadow" not in bound
    assert "--bind" not in cmd  # nothing writable but the sandbox's own /tmp
    own_cmd = grading.sandbox_command(["python"], grading.course_binds(own_work=True))
    own = {Path(own_cmd[i + 1]).name for i, a in enumerate(own_cmd) if a == "--ro-bind"}
    assert own == {"grading_sandbox.py", "grading_ownwork.py", "mnist_cnn.keras", "mnist.npz"}  # no course code


def test_own_work_stand_in_has_no_attribution_code():
    text = (ROOT / "cnnlib" / "grading_ownwork.py").read_text()
    for name in ("gradient", "GradientTape", "import cnn_utils", "import cnnlib", "from cnnlib"):
        assert name not in text


def test_feedback_view_strips_hidden_tests_and_tracebacks():
    nb = nbformat.v4.new_notebook()
    test = nbformat.v4.new_code_cell("check(1)\n### BEGIN HIDDEN TESTS\nsecret()\n### END HIDDEN TESTS\n")
    test.metadata["nbgrader"] = {"grade": True, "solution": False, "grade_id": "t", "points": 1, "score": 0}
    test.outputs = [nbformat.v4.new_output("error", ename="AssertionError", evalue="x is wrong",
                                           traceback=["----> 3 secret()", "AssertionError: x is wrong"]),
                    nbformat.v4.new_output("stream", name="stderr", text="secret path")]
    answer = nbformat.v4.new_markdown_cell("YOUR ANSWER HERE")
    answer.metadata["nbgrader"] = {"grade": True, "solution": True, "grade_id": "a", "points": 2, "score": None}
    nb.cells = [test, answer]
    nb, resources = grading.FeedbackView().preprocess(nb, {"nbgrader": {"waiting": ["a"]}})
    assert "secret" not in json.dumps(nb)
    assert nb.cells[0].outputs[0].traceback == ["AssertionError: x is wrong"]
    assert nb.cells[1].metadata["nbgrader"]["to_be_graded"] and resources["nbgrader"]["to_be_graded"] == 2


def test_grade_refuses_a_missing_folder(tmp_path, capsys):
    assert course.main(["grade", str(tmp_path / "nowhere"), "--course-dir", str(tmp_path)]) == 1
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(course.CourseError, match="No submissions"):
        course.collect(tmp_path / "empty", tmp_path / "course")


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
    assert cnn_utils.check_close(np.array([0.9]), 0.9, "tv") is None  # one value vs a scalar
    with pytest.raises(AssertionError) as info:
        cnn_utils.check_close([[1.0, 2.0], [3.0, 5.0]], [[1.0, 2.0], [3.0, 4.0]], "R", hint="Check z.")
    assert str(info.value) == ("R is wrong in 1 of 4 value(s); the largest difference is 1 at index (1, 1) "
                               "(got 5, expected 4). Check z.")
    assert cnn_utils.check_close([100.5], [100.0], "x", rtol=0.01, atol=0) is None
    with pytest.raises(AssertionError):
        cnn_utils.check_close([100.5], [100.0], "x", rtol=0.001, atol=0)


def test_check_visible_sees_only_what_is_drawn():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for style, visible in [({"marker": "o"}, True), ({"visible": False}, False), ({"alpha": 0.0}, False),
                           ({"linewidth": 0}, False), ({"color": "white"}, False)]:
        fig, ax = plt.subplots()
        line, = ax.plot([0, 1], [0, 1], **style)
        if visible:
            assert cnn_utils.check_visible(fig, line, "the line") > 100
        else:
            with pytest.raises(AssertionError, match="cannot be seen"):
                cnn_utils.check_visible(fig, line, "the line")
        assert line.get_visible() == style.get("visible", True)  # the figure is left as it was
        plt.close(fig)


def _reference(images, class_index=None):
    return ("reference", images)


def _helper(images):
    return _reference(images)


def test_check_not_calling_finds_the_reference_under_any_name():
    import types

    forbidden = [_reference]
    alias = _reference

    def honest(images):
        return images * 2

    def renamed(images):
        return alias(images)

    def through_helper(images):
        return _helper(images)

    def through_getattr(images):
        return getattr(types.SimpleNamespace(f=_reference), "f")(images)

    assert cnn_utils.check_not_calling(honest, forbidden, "mine", args=(3,)) == 6
    for cheat in (renamed, through_helper, through_getattr):
        with pytest.raises(AssertionError, match="yourself"):
            cnn_utils.check_not_calling(cheat, forbidden, "mine", args=(3,))



# ---------------------------------------------------------------------------
# The fallback without bubblewrap
# ---------------------------------------------------------------------------

def test_grading_without_bubblewrap_gives_each_submission_its_own_copy(tmp_path, monkeypatch):
    """CNN_COURSE_SANDBOX=none: no sandbox, but the submission that appends to cnn_utils.py
    changes only its private copy; the course files and the next student's score are untouched."""
    import contextlib
    import io

    monkeypatch.setenv("CNN_COURSE_SANDBOX", "none")
    assert not grading.sandbox_available()
    course_dir, inbox = tmp_path / "course", tmp_path / "inbox"
    inbox.mkdir()
    student_copy = tmp_path / "student_version.ipynb"
    course.release(course_dir, student_copy=student_copy)
    made = submissions(nbformat.read(str(SOURCE), as_version=4), nbformat.read(str(student_copy), as_version=4))
    for student in ("cells", "untouched"):  # graded in this order by one job
        nbformat.write(made[student], str(inbox / f"{student}.ipynb"))
    before = grading.course_file_hashes()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = course.main(["grade", str(inbox), "--course-dir", str(course_dir), "--jobs", "1",
                              f"--cell-timeout={CELL_TIMEOUT}", "--notebook-timeout=600"])
    assert status == 0, out.getvalue()
    assert "NO sandbox" in out.getvalue()
    assert grading.course_file_hashes() == before
    rows = {r["student_id"]: r for r in _read_csv(course_dir / "reports" / "scores.csv")}
    assert rows["cells"]["status"] == "flagged" and float(rows["cells"]["autograded_total"]) == 15
    assert rows["untouched"]["status"] == "graded" and float(rows["untouched"]["autograded_total"]) == 0


def test_private_course_copy_holds_what_a_notebook_imports(tmp_path):
    root, data = grading.private_course_copy(tmp_path / "copy")
    assert (root / "cnn_utils.py").read_bytes() == (grading.PROJECT_DIR / "cnn_utils.py").read_bytes()
    assert (root / "cnnlib" / "grading_sandbox.py").is_file()
    assert sorted(p.name for p in (root / "saved_models").iterdir()) == \
        sorted(p.name for p in (grading.PROJECT_DIR / "saved_models").iterdir())
    assert {p.name for p in Path(data).glob("*.npz")} >= {"mnist.npz"}
    assert not (root / "instructors").exists() and not (root / "nbgrader_config.py").exists()
    assert (root / "cnn_utils.py").stat().st_mode & 0o222 == 0


def test_grade_exits_non_zero_when_no_submission_could_run():
    """A broken installation (here: the sandbox's code missing) grades nothing: `grade` says why, exits 1."""
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="cnn-course-broken-", dir="/tmp"))
    try:
        copy = copy_of_the_course(tmp / "cnn-course")
        (copy / "cnnlib" / "grading_sandbox.py").unlink()
        inbox = tmp / "inbox"
        inbox.mkdir()
        shutil.copyfile(course.STUDENT_NOTEBOOK, inbox / "blank.ipynb")
        status, out = grade_in(copy, str(inbox), "--course-dir", str(tmp / "nbgrader-course"), "--jobs", "1")
        assert status == 1, out
        assert "No submission could be run" in out, out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
