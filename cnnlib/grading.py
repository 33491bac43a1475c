"""Grading the exercise notebook with nbgrader, behind a trust boundary (``python -m course grade``).

**Threat model.** A submission is code written by a student who knows the student version of
the notebook, the course's shipped files and the installed packages, and who wants points that
their functions do not earn, or to see the hidden tests, or to read or disturb what else runs on
the grading machine. Everything the student's code runs in is theirs: the kernel, the process that
drives it (``cnnlib/grading_sandbox.py``), every file they can write, every byte they send back.

**Guarantee.** No verdict is computed where student code runs. The notebook runs in a bubblewrap
sandbox (own user, PID, network, IPC and UTS namespaces, no capabilities, an empty environment
but for a few fixed variables, only the system, the Python environment and the course's runtime
files visible and read-only, ``/etc`` reduced to what the dynamic linker needs, a size-limited
``/tmp``, limits on memory, processes, time and output characters). Where a test cell stood, the
sandbox calls the student's functions with inputs the grader chose and sends back only data (JSON
text and numbers, ``.npy`` arrays read with ``allow_pickle=False``, at most ``CHANNEL_BYTES``) on a
pipe that only the sandbox's first process holds. The grader's own process decides every test
(``instructors/grading_tests.py``: its inputs, reference code and tolerances, never shipped, never
sent into the sandbox) with its own model and comparisons, and writes the verdicts into the
autograded notebook nbgrader scores: a test passes only when the data returned for the grader's
inputs passes the grader's check. The own-work test of exercise 4 calls the student's method in a
second sandbox where the course's attribution code does not exist (``cnnlib/grading_ownwork.py``
is its only ``cnn_utils``). Feedback shows a test's name, pass/fail and the grader's message;
nothing printed while a test's calls ran is kept. Without bubblewrap (``CNN_COURSE_SANDBOX=none``)
the verdicts are still the grader's, but the submission runs as the grader's user with no isolation.

nbgrader does the bookkeeping (student version, gradebook, restoring read-only cells, scores,
formgrader, feedback); ``nbgrader_config.py`` puts ``RestoreCells`` before its OverwriteCells,
``SandboxedExecute`` in place of its Execute and ``FeedbackView`` into its feedback.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .data import NOTEBOOKS_DIR, PROJECT_DIR
from .sandbox import (  # noqa: F401 (re-exported for course.py, the tests and benchmarks)
    CELL_TIMEOUT, CHANNEL_BYTES, ETC_FILES, MEMORY_LIMIT_MB, NOTEBOOK_TIMEOUT, PROCESS_LIMIT, PROTECTED_PATHS,
    RUNTIME_FILES, SANDBOX_COURSE, SANDBOX_DATA, SANDBOX_GRADER, SANDBOX_UID, SANDBOX_WORKDIR, TMP_LIMIT_MB,
    changed_course_files, course_binds, course_file_hashes, limits_command, private_course_copy, run_sandboxed,
    sandbox_available, sandbox_command, sandbox_env, staged_course)


class CourseError(Exception):
    """A command could not do what was asked; the message says what to do."""


#: nbgrader's course directory (git-ignored; see nbgrader_config.py).
GRADING_DIR = PROJECT_DIR / "nbgrader"
#: The assignment, and its one notebook, in nbgrader's layout.
EXERCISE_ASSIGNMENT = "11_exercises"
#: The nbgrader source with solutions, and the tests as the grader runs them (instructors only) ...
INSTRUCTORS_DIR = PROJECT_DIR / "instructors"
EXERCISE_SOURCE = INSTRUCTORS_DIR / f"{EXERCISE_ASSIGNMENT}.ipynb"
GRADING_TESTS = INSTRUCTORS_DIR / "grading_tests.py"
#: ... and the student version generated from it, committed in notebooks/.
STUDENT_NOTEBOOK = NOTEBOOKS_DIR / f"{EXERCISE_ASSIGNMENT}.ipynb"
MIN_MEMORY_MB = 2048
OUTPUT_CHARS = 20_000       # characters of text kept per cell (cut in the sandbox, cut again here)
IMAGE_BYTES = 4_000_000     # bytes of images kept per cell
STATUSES = ("graded", "failed", "flagged")


def _course_dir(course_dir):
    return Path(course_dir) if course_dir else GRADING_DIR


def _notebook_path(course, kind, student=None):
    parts = [kind] + ([student] if student else []) + [EXERCISE_ASSIGNMENT, f"{EXERCISE_ASSIGNMENT}.ipynb"]
    return course.joinpath(*parts)


def run_nbgrader(*args, course_dir=None, check=True, timeout=None):
    """Run ``python -m nbgrader ARGS`` from the course folder (it reads nbgrader_config.py).

    nbgrader calls the ``alembic`` program of its environment, so the environment's
    ``bin`` goes first on PATH. Raises ``CourseError`` with nbgrader's last lines on failure.
    """
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["CNN_COURSE_DIR"] = str(PROJECT_DIR)
    cmd = [sys.executable, "-m", "nbgrader", *args, f"--CourseDirectory.root={_course_dir(course_dir)}"]
    result = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise CourseError(f"`nbgrader {' '.join(args)}` failed:\n{tail}")
    return result


def release(course_dir=None, student_copy=STUDENT_NOTEBOOK):
    """Generate the student version of the exercise notebook with nbgrader.

    Copies ``instructors/11_exercises.ipynb`` to nbgrader's ``source/``, runs
    ``nbgrader generate_assignment`` (solutions and hidden tests removed; the gradebook
    keeps the tests) and copies the result to ``student_copy`` (default: the notebook
    students open, ``notebooks/11_exercises.ipynb``; None: leave it). Returns the path
    of nbgrader's release copy.
    """
    course = _course_dir(course_dir)
    source = _notebook_path(course, "source")
    source.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(EXERCISE_SOURCE, source)
    run_nbgrader("generate_assignment", EXERCISE_ASSIGNMENT, "--force", course_dir=course)
    released = _notebook_path(course, "release")
    if student_copy is not None:
        shutil.copyfile(released, student_copy)
    return released


def _ensure_released(course):
    """Release again when the gradebook is missing or the instructors' source changed."""
    source = _notebook_path(course, "source")
    if (course / "gradebook.db").is_file() and source.is_file() \
            and source.read_bytes() == EXERCISE_SOURCE.read_bytes() and _notebook_path(course, "release").is_file():
        return
    release(course, student_copy=None)


def _submission_files(folder):
    """``{student_id: path}`` of a submissions folder (``<student_id>.ipynb``, or nbgrader's
    ``<student_id>/11_exercises/11_exercises.ipynb``); CourseError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CourseError(f"{folder} is not a folder: give the folder that holds the <student_id>.ipynb files.")
    files = {path.stem: path for path in sorted(folder.glob("*.ipynb"))}
    if not files:  # nbgrader's layout
        files = {path.parent.parent.name: path for path in
                 sorted(folder.glob(f"*/{EXERCISE_ASSIGNMENT}/{EXERCISE_ASSIGNMENT}.ipynb"))}
    if not files:
        raise CourseError(f"No submissions in {folder}: expected files named <student_id>.ipynb "
                          f"(or nbgrader's <student_id>/{EXERCISE_ASSIGNMENT}/{EXERCISE_ASSIGNMENT}.ipynb).")
    return files


def collect(folder, course_dir=None):
    """Put ``FOLDER/<student_id>.ipynb`` into nbgrader's ``submitted/<id>/11_exercises/``.

    FOLDER may also be laid out as nbgrader's ``submitted/`` folder after ``nbgrader collect``
    (``<student_id>/11_exercises/11_exercises.ipynb``), the course's own one included.
    Returns ``(students, unreadable)``: the ids collected, and ``{id: reason}`` for files
    that are not readable notebooks (they are not collected).
    """
    import nbformat

    files = _submission_files(folder)
    course = _course_dir(course_dir)
    students, unreadable = [], {}
    for student, path in files.items():
        try:
            nbformat.validate(nbformat.read(str(path), as_version=4))
        except Exception as err:  # any reason: the file is not a notebook we can grade
            unreadable[student] = f"could not be read as a notebook ({type(err).__name__}: {str(err)[:200]})"
            continue
        target = _notebook_path(course, "submitted", student)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.resolve() != path.resolve():
            shutil.copyfile(path, target)
        students.append(student)
    return students, unreadable


def instructor_answers(source_nb):
    """The instructors' answer in every solution cell of the source (markers removed), by grade id.

    With ``fill_answers`` it builds graded-to-be submissions for tests and benchmarks."""
    answers = {}
    for cell in source_nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            answers[meta["grade_id"]] = "\n".join(l for l in cell.source.split("\n")
                                                  if "### BEGIN SOLUTION" not in l and "### END SOLUTION" not in l)
    return answers


def fill_answers(release_nb, answers):
    """A copy of the student version with the cells named in ``{grade_id: source}`` replaced."""
    import nbformat

    nb = nbformat.from_dict(release_nb)  # a deep copy
    for cell in nb.cells:
        name = cell.metadata.get("nbgrader", {}).get("grade_id")
        if name in answers:
            cell.source = answers[name]
    return nb




def grading_scores(course_dir=None):
    """Per-student, per-cell scores from nbgrader's gradebook (after autograding).

    Returns ``{student: {grade_id: {"auto", "manual", "max", "needs_manual", "by_hand"}}}``;
    ``by_hand`` marks written answers (markdown cells).
    """
    from nbgrader.api import Gradebook, MissingEntry

    course = _course_dir(course_dir)
    db = course / "gradebook.db"
    if not db.is_file():
        raise CourseError(f"No gradebook at {db}: run `python -m course grade FOLDER` first "
                          "(see README, for instructors).")
    scores = {}
    with Gradebook(f"sqlite:///{db}") as gb:
        for student in gb.students:
            try:
                nb = gb.find_submission_notebook(EXERCISE_ASSIGNMENT, EXERCISE_ASSIGNMENT, student.id)
            except MissingEntry:
                continue
            scores[student.id] = {
                g.name: {"auto": g.auto_score, "manual": g.manual_score, "max": float(g.max_score),
                         "needs_manual": bool(g.needs_manual_grade), "by_hand": g.cell_type == "markdown"}
                for g in nb.grades
            }
    return scores


def _report_path(course, student):
    """Status, reason and flags of one graded submission (beside its kernel's log)."""
    return course / "reports" / "grading" / f"{student}.json"


_RESULT = "@@course-grading-result@@"


def _grading_process():
    """One grading process (``grade`` starts ``--jobs`` of them): nbgrader imported once,
    then every student id read from stdin autograded (sandboxed).
    Answers one line per student on stdout, prefixed with ``_RESULT``."""
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config.loader import PyFileConfigLoader

    settings = json.loads(sys.argv[1])
    course = Path(settings["course"])
    config = PyFileConfigLoader("nbgrader_config.py", path=str(PROJECT_DIR)).load_config()
    config.CourseDirectory.root = str(course)
    for key, value in settings["limits"].items():
        setattr(config.SandboxedExecute, key, value)
    api = NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)
    for line in sys.stdin:
        student = line.strip()
        if not student:
            continue
        start = time.perf_counter()
        path = _report_path(course, student)
        path.unlink(missing_ok=True)
        result = api.autograde(EXERCISE_ASSIGNMENT, student, force=True, create=True)
        if result.get("success") and path.is_file():
            report = json.loads(path.read_text())
            report["ran"] = bool(report.get("ran"))
        else:
            lines = [l for l in (str(result.get("error") or "") + "\n" + str(result.get("log") or "")).splitlines()
                     if l.strip()]
            errors = [l for l in lines if "ERROR" in l or "Error" in l] or lines or ["no message"]
            report = {"status": "failed", "flags": [],
                      "reason": f"nbgrader could not grade it: {errors[-1].strip()[:300]}"}
        report["seconds"] = round(time.perf_counter() - start, 1)
        print(_RESULT + json.dumps({"student": student, "report": report}), flush=True)


def _grading_worker(todo, reports, settings, on_done, slot=0):
    """A thread of ``grade``: feeds student ids from the queue ``todo`` to its own grading
    process and stores each answer in ``reports``; restarts the process if it dies."""
    import queue

    proc = None
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # nbgrader runs alembic
    env["CNN_COURSE_SANDBOX_UID"] = str(SANDBOX_UID - 1 - slot)  # each job's sandboxes: a user of their own
    try:
        while True:
            try:
                student = todo.get_nowait()
            except queue.Empty:
                return
            if proc is None or proc.poll() is not None:
                proc = subprocess.Popen([sys.executable, "-c", "from cnnlib import grading; grading._grading_process()",
                                         json.dumps(settings)], cwd=PROJECT_DIR, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            report = None
            try:
                proc.stdin.write(student + "\n")
                proc.stdin.flush()
                for line in proc.stdout:
                    if line.startswith(_RESULT):
                        report = json.loads(line[len(_RESULT):])["report"]
                        break
            except (BrokenPipeError, ValueError):
                pass
            if report is None:
                report = {"status": "failed", "flags": [], "seconds": 0.0,
                          "reason": "the grading process stopped while grading it"}
                proc.kill()
            reports[student] = report
            on_done(student, report)
    finally:
        if proc is not None and proc.poll() is None:
            proc.stdin.close()
            proc.wait()


def grade(folder, jobs=None, course_dir=None, cell_timeout=CELL_TIMEOUT, notebook_timeout=NOTEBOOK_TIMEOUT,
          memory_mb=MEMORY_LIMIT_MB, verbose=True):
    """Collect ``FOLDER/<student_id>.ipynb``, autograde each in isolation, in parallel, with feedback.

    Writes ``<course_dir>/reports/scores.csv`` (``student_id, status, ex1.., autograded_total,
    flags``) and returns its rows as dicts. Status ``failed`` (kernel died, ran out of time,
    unreadable: the reason is in ``flags``) and ``flagged`` (a test cell deleted or edited) need an
    instructor's look. Raises ``CourseError`` when the course files changed.
    """
    import csv

    course = _course_dir(course_dir)
    jobs = jobs or os.cpu_count() or 1
    _submission_files(folder)           # a mistyped folder is reported before nbgrader starts
    before = course_file_hashes()
    _ensure_released(course)
    students, unreadable = collect(folder, course)
    reports = {s: {"status": "failed", "reason": reason, "flags": [], "seconds": 0.0}
               for s, reason in unreadable.items()}
    if verbose:
        print(f"Grading {len(students)} submission(s) with {jobs} job(s) "
              f"({'bubblewrap sandbox' if sandbox_available() else 'NO sandbox (bubblewrap missing or CNN_COURSE_SANDBOX=none): each submission gets a private copy of the course, but file system and network are not isolated'}).",
              flush=True)
    import queue
    import sqlite3
    import threading

    with sqlite3.connect(course / "gradebook.db") as db:  # readers never block the writers
        db.execute("PRAGMA journal_mode=WAL")
    todo = queue.Queue()
    for student in students:
        todo.put(student)
    settings = {"course": str(course), "limits": {
        "cell_timeout": cell_timeout, "notebook_timeout": notebook_timeout, "memory_limit_mb": memory_mb,
        "threads": max(1, (os.cpu_count() or 1) // jobs)}}
    lock, done = threading.Lock(), []

    def on_done(student, report):
        with lock:
            done.append(student)
            if verbose:
                print(f"[{len(done)}/{len(students)}] {student}: {report['status']} in {report['seconds']:.0f} s"
                      + (f" ({report['reason']})" if report.get("reason") else ""), flush=True)

    threads = [threading.Thread(target=_grading_worker, args=(todo, reports, settings, on_done, slot))
               for slot in range(min(jobs, max(1, len(students))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if students:  # one nbgrader run writes every student's feedback page
        run_nbgrader("generate_feedback", EXERCISE_ASSIGNMENT, "--force", course_dir=course, check=False)
    for student in students:
        if not _notebook_path(course, "feedback", student).with_suffix(".html").is_file():
            reports[student].setdefault("flags", []).append("no feedback page could be generated")
    changed = changed_course_files(before)
    if changed:
        raise CourseError(f"Course files changed while grading: {', '.join(changed)}. Restore them "
                          "(git checkout) and grade again; run grading with bubblewrap installed.")
    rows = score_rows(reports, course)
    out = course / "reports" / "scores.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["student_id"])
        writer.writeheader()
        writer.writerows(rows)
    if verbose:
        print_table(rows)
        print(f"Scores: {out}\nFeedback: {course / 'feedback'}/<student_id>/{EXERCISE_ASSIGNMENT}/")
    if students and not any(reports[s].get("ran") for s in students):
        reasons = sorted({reports[s].get("reason") or "no reason given" for s in students})
        raise CourseError(f"No submission could be run, so no grade means anything: {'; '.join(reasons)[:600]}. "
                          f"The logs are in {course / 'reports' / 'grading'}/.")
    return rows


def score_rows(reports, course):
    """One row per student: status, autograded points per exercise and in total, flags."""
    scores = grading_scores(course) if (course / "gradebook.db").is_file() else {}
    cells = next(iter(scores.values()), {})
    exercises = sorted({gid.split("_")[0] for gid, g in cells.items() if not g["by_hand"]})
    rows = []
    for student in sorted(reports):
        report, got = reports[student], scores.get(student, {})
        flags = list(report.get("flags", []))
        status = report.get("status", "failed")
        if status == "failed":
            flags.insert(0, report.get("reason") or "failed")
        elif flags:
            status = "flagged"
        row = {"student_id": student, "status": status}
        total = 0.0
        for ex in exercises:
            points = sum(g["auto"] or 0.0 for gid, g in got.items() if gid.split("_")[0] == ex and not g["by_hand"])
            row[ex] = f"{points:g}"
            total += points
        row["autograded_total"] = f"{total:g}"
        row["flags"] = "; ".join(flags)
        rows.append(row)
    return rows


def print_table(rows):
    """The scores table as text (the CSV's columns; long flags cut)."""
    if not rows:
        print("No submissions.")
        return
    columns = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns if c != "flags"}
    print("  ".join(c.ljust(width[c]) for c in columns if c != "flags") + "  flags")
    for r in rows:
        flags = r["flags"] if len(r["flags"]) <= 100 else r["flags"][:97] + "..."
        print("  ".join(str(r[c]).ljust(width[c]) for c in columns if c != "flags") + "  " + flags)


# ---------------------------------------------------------------------------
# The trusted side: inputs, references and verdicts, in the grader's process
# ---------------------------------------------------------------------------

def load_grading_tests(path=GRADING_TESTS):
    """The tests as the grader runs them (``instructors/grading_tests.py``: CALLS, CHECKS, OWN_WORK)."""
    import types

    if not Path(path).is_file():
        raise CourseError(f"{path} is missing: grading needs the instructors' folder (a private copy of the course).")
    if sys.flags.optimize:
        raise CourseError("Python runs with -O, which removes the tests' assert statements: grade without -O.")
    module = types.ModuleType("course_grading_tests")  # compiled here: no .pyc lands in instructors/
    module.__file__ = str(path)
    exec(compile(Path(path).read_text(), str(path), "exec"), module.__dict__)
    return module


class Trusted:
    """What the grader's checks use: the course model, the notebook's slice of test images, the
    dense head, reference methods and comparisons (``cnn_utils``, imported in this process, which
    runs no student code), and the inputs sent to the sandbox (``array``, ``name``, ``call``
    describe calls as JSON). One per grading process."""

    def __init__(self):
        import cnn_utils  # the trusted process's own copy of the course helpers

        self.cnn_utils = cnn_utils
        self.model = cnn_utils.load_model("mnist")
        self.score_model = cnn_utils.logits_model(self.model)
        (_, _), (x_test, y_test) = cnn_utils.load_dataset("mnist")
        wrong = []       # the notebook's data cell: the first 60 test images and the next 4 it gets wrong
        for start in range(60, len(x_test), 500):
            pred = np.argmax(self.scores(x_test[start:start + 500]), axis=1)
            wrong += (start + np.flatnonzero(pred != y_test[start:start + 500])).tolist()
            if len(wrong) >= 4:
                break
        index = np.concatenate([np.arange(60), wrong[:4]])
        self.X, self.Y = x_test[index], y_test[index]
        import keras

        self._features = keras.Model(self.model.inputs, self.model.get_layer("flatten").output)
        self.HEAD = [tuple(np.asarray(w, np.float64) for w in self.model.get_layer(n).get_weights())
                     for n in ("dense1", "logits")]
        self.HEAD_NO_BIAS = [(W, np.zeros_like(b)) for W, b in self.HEAD]
        self.A0 = self.head_features(self.X[:16])
        self.arrays, self._cache = {}, {}

    # describing calls -------------------------------------------------------
    def array(self, key, value):
        value = np.ascontiguousarray(value)
        if key in self.arrays and not np.array_equal(self.arrays[key], value):
            raise ValueError(f"two different inputs named {key}")
        self.arrays[key] = value
        return {"array": key}

    @staticmethod
    def name(name):
        return {"name": name}

    @staticmethod
    def call(fn, *args, kind="value", **kwargs):
        return ({"kind": "name", "name": fn} if kind == "name" else
                {"kind": kind, "fn": fn, "args": list(args), "kwargs": kwargs})

    # the model and references ----------------------------------------------
    def scores(self, images):
        return np.asarray(self.score_model(np.asarray(images, np.float32)), np.float64)

    def class_score(self, image, c):
        return float(self.scores(np.asarray(image)[None])[0, c])

    @staticmethod
    def start_image(seed=0, shape=(28, 28, 1)):
        rng = np.random.default_rng(seed)
        return np.clip(0.5 + 0.05 * rng.standard_normal(shape), 0.0, 1.0).astype(np.float32)

    def head_features(self, images):
        return np.asarray(self._features(np.asarray(images, np.float32)), np.float64)

    def cam_matrices(self, layer, size=(28, 28)):
        return self.cached(("cam", layer, size), lambda: self.cnn_utils.cam_upsampling_matrices(self.model, layer, size))

    def cached(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def reference(self, method, images, **kwargs):
        key = (method, np.asarray(images).tobytes(), repr(sorted((k, np.asarray(v).tolist()) for k, v in kwargs.items())))
        return self.cached(key, lambda: np.asarray(getattr(self.cnn_utils, method)(self.model, images, **kwargs)))

    def reference_ascent(self, c, steps, lr, seed, tv_weight=0.0, l2_weight=0.0):
        import tensorflow as tf

        def compute():
            x = tf.Variable(self.start_image(seed)[None])
            for _ in range(steps):
                with tf.GradientTape() as tape:
                    tv = (tf.reduce_sum(tf.abs(x[:, 1:] - x[:, :-1])) + tf.reduce_sum(tf.abs(x[:, :, 1:] - x[:, :, :-1])))
                    objective = self.score_model(x)[0, c] - tv_weight * tv - l2_weight * tf.reduce_sum(tf.square(x))
                g = tape.gradient(objective, x)
                x.assign(tf.clip_by_value(x + lr * g / (tf.norm(g) + 1e-8), 0.0, 1.0))
            return x.numpy()[0]
        return self.cached(("ascent", c, steps, lr, seed, tv_weight, l2_weight), compute)

    def _loss_gradient(self, images, labels):
        import keras
        import tensorflow as tf

        x = tf.convert_to_tensor(images, dtype=tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = keras.losses.sparse_categorical_crossentropy(labels, self.score_model(x), from_logits=True)
        return x, tape.gradient(loss, x)

    def reference_fgsm_sign(self):
        return self.cached("fgsm_sign", lambda: np.sign(self._loss_gradient(self.X[:16], self.Y[:16])[1].numpy()))

    def reference_success_rate(self, eps):
        import tensorflow as tf

        def compute():
            x, g = self._loss_gradient(self.X, self.Y)
            adv = tf.clip_by_value(x + eps * tf.sign(g), 0, 1)
            ok = np.argmax(self.scores(self.X), axis=1) == self.Y
            return float(np.mean(np.argmax(self.scores(adv), axis=1)[ok] != self.Y[ok]))
        return self.cached(("rate", eps), compute)

    def gradient_x_input(self):
        import tensorflow as tf

        def compute():
            a = tf.constant(self.A0)
            with tf.GradientTape() as tape:
                tape.watch(a)
                scores = tf.nn.relu(a @ self.HEAD_NO_BIAS[0][0]) @ self.HEAD_NO_BIAS[1][0]
                target = tf.reduce_max(scores, axis=1)
            return (a * tape.gradient(target, a)).numpy()
        return self.cached("gxi", compute)

    def close(self, actual, expected, name, rtol=1e-5, atol=1e-8, hint=""):
        """``|actual - expected| <= atol + rtol * |expected|``, else AssertionError saying where."""
        return self.cnn_utils.check_close(actual, expected, name, rtol=rtol, atol=atol, hint=hint)

    def check_array(self, value, name, shape=None, low=None, high=None):
        """``value`` as a finite float64 array [of ``shape``] [in ``low``..``high``], else AssertionError."""
        return self.cnn_utils.check_array(value, name, shape=shape, low=low, high=high)


class Answers:
    """What the sandbox sent back for one test's calls: ``got[i]`` is call i's array (AssertionError
    with the student's error when it raised or sent nothing usable), ``text``, ``figure``, ``gradient``."""

    def __init__(self, calls, message):
        self.calls = calls
        message = message or {}
        self.answers = message.get("answers") if isinstance(message.get("answers"), list) else []
        self.arrays = {}
        for key, blob in (message.get("arrays") or {}).items():
            try:
                self.arrays[str(key)] = np.load(io.BytesIO(base64.b64decode(blob)), allow_pickle=False)
            except Exception:  # not an .npy array: treated as missing
                continue
        self.timed_out = bool(message.get("timed_out"))

    def _label(self, i):
        call = self.calls[i]
        return call.get("fn") or call.get("name")

    def _answer(self, i):
        if i >= len(self.answers) or not isinstance(self.answers[i], dict):
            raise AssertionError(f"{self._label(i)} gave no result"
                                 + (" (the test's calls ran past the time limit)" if self.timed_out else ""))
        answer = self.answers[i]
        if "error" in answer:
            raise AssertionError(f"{self._label(i)} raised {str(answer['error'])[:300]}")
        return answer

    def __getitem__(self, i):
        self._answer(i)
        if f"{i}" not in self.arrays:
            raise AssertionError(f"{self._label(i)} returned no array of numbers")
        array = self.arrays[f"{i}"]
        if array.dtype.kind not in "biuf":
            raise AssertionError(f"{self._label(i)} returned no array of numbers")
        return array

    def text(self, i):
        value = self._answer(i).get("text")
        return value if isinstance(value, str) else None

    def gradient(self, i):
        answer = self._answer(i)
        return None if answer.get("none") or f"{i}" not in self.arrays else self.arrays[f"{i}"]

    def figure(self, i):
        out = {k: v for k, v in self._answer(i).items() if isinstance(v, (str, int, float))}
        out.update({k.split(".", 1)[1]: v for k, v in self.arrays.items() if k.startswith(f"{i}.")})
        return out


_TRUSTED = None


def trusted_context():
    """The one ``Trusted`` of this process, and the grading tests (loaded on first use)."""
    global _TRUSTED
    if _TRUSTED is None:
        tests = load_grading_tests()
        t = Trusted()
        calls = {gid: make(t) for gid, make in tests.CALLS.items()}
        own = {gid: make(t) for gid, (make, _) in tests.OWN_WORK.items()}
        _TRUSTED = (t, tests, calls, own)
    return _TRUSTED


def verdict(check, t, calls, message):
    """``None`` when ``check`` passes on the sandbox's answers, else the message for the student."""
    try:
        check(t, Answers(calls, message))
    except AssertionError as err:
        return str(err) or "the test failed"
    except Exception as err:  # answers of the wrong kind (a string for an array, ...) fail the test
        return f"the test could not use what your code returned ({type(err).__name__}: {str(err)[:200]})"
    return None


try:
    from nbgrader.preprocessors import NbGraderPreprocessor as _NbGraderPreprocessor
    from traitlets import Bool as _Bool, Integer as _Integer
except ImportError:  # pragma: no cover - grading needs nbgrader (requirements.txt)
    _NbGraderPreprocessor, _Integer = object, None


# ---------------------------------------------------------------------------
# nbgrader preprocessors (configured in nbgrader_config.py)
# ---------------------------------------------------------------------------

def _course_of(resources):
    """nbgrader's course directory, from the gradebook address nbgrader hands its preprocessors."""
    url = resources["nbgrader"]["db_url"]
    return Path(url.split("sqlite:///", 1)[1]).parent


def _grading_meta(nb):
    return nb.metadata.setdefault("course_grading", {"flags": [], "zero": {}})


def _normalise(source):
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def _is_test(cell):
    meta = cell.metadata.get("nbgrader", {})
    return bool(meta.get("grade")) and not meta.get("solution") and cell.cell_type == "code"


def sandbox_notebook(nb, tests, keep=None):
    """What the sandbox gets: the submission without its test cells (each becomes an empty cell
    naming the test, where the sandbox runs the grader's calls) and without outputs; ``keep(cell)``
    chooses the other code cells (default: all; with ``keep``, none after the last test). No test
    source ever enters the sandbox."""
    import nbformat

    out = nbformat.v4.new_notebook()
    out.metadata = {"kernelspec": nb.metadata.get("kernelspec", {})}
    for cell in nb.cells:
        if cell.cell_type != "code":
            out.cells.append(nbformat.v4.new_markdown_cell(""))
        elif _is_test(cell):
            name = cell.metadata["nbgrader"].get("grade_id")
            placeholder = nbformat.v4.new_code_cell("")
            if name in tests:
                placeholder.metadata["grader_test"] = name
            out.cells.append(placeholder)
        elif keep is None or keep(cell):
            copy = nbformat.v4.new_code_cell(cell.source)
            copy.metadata = {k: v for k, v in cell.metadata.items() if k in ("tags", "nbgrader")}
            out.cells.append(copy)
        else:
            out.cells.append(nbformat.v4.new_markdown_cell(""))
    if keep is not None:  # a partial run (own work) stops after its last test
        last = max((i for i, c in enumerate(out.cells) if c.metadata.get("grader_test")), default=-1)
        out.cells = out.cells[:last + 1]
    return out


def _cut(outputs):
    """Outputs as the autograded notebook keeps them: text cut to OUTPUT_CHARS characters per cell,
    images up to IMAGE_BYTES per cell, tracebacks and error messages shortened (whatever the
    sandbox claims)."""
    import nbformat

    kept, chars, image_bytes = [], 0, 0
    for out in outputs if isinstance(outputs, list) else []:
        try:
            out = nbformat.from_dict(out)
            kind = out.get("output_type")
            if kind == "stream":
                text = str(out.get("text", ""))
                out.text = text[:max(0, OUTPUT_CHARS - chars)] + ("\n[output cut]\n" if len(text) > OUTPUT_CHARS - chars else "")
                out.name = "stdout" if out.get("name") != "stderr" else "stderr"
                chars += len(out.text)
            elif kind in ("display_data", "execute_result"):
                data = {}
                for mime, value in dict(out.get("data", {})).items():
                    size = len(value if isinstance(value, str) else json.dumps(value))
                    if mime.startswith("image/") and image_bytes + size <= IMAGE_BYTES:
                        data[mime] = value
                        image_bytes += size
                    elif not mime.startswith("image/") and chars + size <= OUTPUT_CHARS:
                        data[mime] = value
                        chars += size
                out.data = data or {"text/plain": "[output removed: too large]"}
            elif kind == "error":
                out.ename, out.evalue = str(out.get("ename", ""))[:100], str(out.get("evalue", ""))[:1000]
                out.traceback = [str(t)[:2000] for t in list(out.get("traceback", []))[-20:]]
            else:
                continue
            nbformat.validate(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[out])]))
            kept.append(out)
        except Exception:  # not an output nbformat accepts: dropped
            continue
    return kept


class RestoreCells(_NbGraderPreprocessor):
    """Before nbgrader's OverwriteCells: put deleted read-only cells back where they were
    (from the released notebook) and note every deleted or edited read-only cell. A deleted
    or edited *test* cell scores 0 (the test cell runs, restored, for the feedback)."""

    def preprocess(self, nb, resources):
        import copy

        import nbformat

        released = nbformat.read(str(_notebook_path(_course_of(resources), "release")), as_version=4)
        meta = _grading_meta(nb)
        meta["flags"], meta["zero"] = [], {}

        def gid(cell):
            return cell.metadata.get("nbgrader", {}).get("grade_id")

        present = {gid(c): c for c in nb.cells if gid(c)}
        position = 0
        for ref in released.cells:
            name = gid(ref)
            if not name:
                continue
            rmeta = ref.metadata["nbgrader"]
            protected = rmeta.get("locked") or (rmeta.get("grade") and not rmeta.get("solution"))
            is_test = bool(rmeta.get("grade")) and not rmeta.get("solution")
            cell = present.get(name)
            if cell is None:
                cell = copy.deepcopy(ref)
                nb.cells.insert(position, cell)
                if protected:
                    meta["flags"].append(f"deleted read-only cell {name} (restored)")
                    if is_test:
                        meta["zero"][name] = "this test cell was deleted from the submission"
            else:
                if protected and (cell.cell_type != ref.cell_type or _normalise(cell.source) != _normalise(ref.source)):
                    meta["flags"].append(f"edited read-only cell {name} (restored)")
                    if is_test:
                        meta["zero"][name] = "this test cell was edited in the submission"
                if protected and cell.metadata.get("nbgrader", {}) != rmeta and any(
                        cell.metadata.get("nbgrader", {}).get(k) != rmeta.get(k) for k in ("grade", "locked", "points", "solution")):
                    meta["flags"].append(f"changed the grading metadata of cell {name} (restored)")
                    if is_test:
                        meta["zero"][name] = "the grading metadata of this test cell was changed"
                    cell.metadata["nbgrader"] = copy.deepcopy(rmeta)
            position = nb.cells.index(cell) + 1
        return nb, resources


class SandboxedExecute(_NbGraderPreprocessor):
    """nbgrader's Execute step, replaced: the submission runs in the sandbox (``run_sandboxed``)
    and every test cell's outcome is the grader's verdict on the data the sandbox returned.

    A test cell's outputs are exactly one: "passed", or an error with the grader's message
    (``AssertionError``), ``NotRun`` when grading stopped before it, ``TestCellTampered`` when the
    submission deleted or edited it (0 points, the test still judged for the feedback's sake).
    Other code cells keep their outputs, cut to size. Writes ``grading.json`` beside the scores.
    """

    if _Integer is not None:
        cell_timeout = _Integer(CELL_TIMEOUT, help="seconds per cell").tag(config=True)
        notebook_timeout = _Integer(NOTEBOOK_TIMEOUT, help="seconds per notebook").tag(config=True)
        memory_limit_mb = _Integer(MEMORY_LIMIT_MB, help="address space per process of a notebook (MB)").tag(config=True)
        threads = _Integer(1, help="TensorFlow threads per notebook").tag(config=True)
        fast = _Bool(True, help="FAST = True: small demonstration figures (the checks are the same)").tag(config=True)

    def _run(self, nb, calls, arrays, log_path, own_work=False):
        return run_sandboxed(nb, {name: {"calls": c} for name, c in calls.items()}, arrays, self.cell_timeout,
                             self.notebook_timeout, self.memory_limit_mb, log_path=log_path, threads=self.threads,
                             fast=self.fast, own_work=own_work)

    def preprocess(self, nb, resources):
        import nbformat

        meta = _grading_meta(nb)
        flags, zero = list(meta.get("flags", [])), dict(meta.get("zero", {}))
        course = _course_of(resources)
        report_path = _report_path(course, resources["nbgrader"]["student"])
        report_path.parent.mkdir(parents=True, exist_ok=True)
        t, tests, calls, own_calls = trusted_context()
        result = self._run(sandbox_notebook(nb, calls), calls, t.arrays, report_path.with_suffix(".log"))
        messages = {}
        for name, check in tests.CHECKS.items():
            if name in result["tests"]:
                messages[name] = ("AssertionError", verdict(check, t, calls[name], result["tests"][name]))
            else:
                messages[name] = ("NotRun", f"Not run: {result['reason'] or 'grading stopped'}.")
        own_needed = {n: c for n, c in own_calls.items() if messages.get(n, ("", "x"))[1] is None}
        own_seconds = 0.0
        if own_needed:
            started = time.perf_counter()
            released = nbformat.read(str(_notebook_path(course, "release")), as_version=4)
            given = {_normalise(c.source) for c in released.cells if c.cell_type == "code"
                     and not c.metadata.get("nbgrader", {}).get("locked")
                     and not c.metadata.get("nbgrader", {}).get("solution")}
            arrays = dict(t.arrays)
            for layer in ("conv1", "conv2", "conv3"):
                arrays[f"cam_{layer}_28_28_y"], arrays[f"cam_{layer}_28_28_x"] = t.cam_matrices(layer)
            own_nb = sandbox_notebook(nb, own_needed, keep=lambda c: _normalise(c.source) not in given)
            own = self._run(own_nb, own_needed, arrays, report_path.with_suffix(".own-work.log"), own_work=True)
            for name in own_needed:
                if name in own["tests"]:
                    messages[name] = ("AssertionError", verdict(tests.OWN_WORK[name][1], t, own_needed[name],
                                                                own["tests"][name]))
                else:
                    messages[name] = ("AssertionError", "0 points: your code could not be checked without the "
                                      f"course's attribution functions ({own['reason'] or 'no result'}).")
            own_seconds = time.perf_counter() - started
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if not _is_test(cell):
                done = result["cells"].get(index)
                cell.outputs = _cut(done["outputs"]) if done else []
                cell.execution_count = done.get("count") if done and isinstance(done.get("count"), int) else None
                continue
            name = cell.metadata["nbgrader"].get("grade_id")
            cell.outputs, cell.execution_count = [], None
            ename, message = messages.get(name, ("NotRun", "no test is defined for this cell"))
            if name in zero:
                _add_error(cell, "TestCellTampered", f"0 points: {zero[name]}; your code was tested as it stands.")
            elif message is not None:
                _add_error(cell, ename, message)
            else:
                cell.outputs.append(nbformat.v4.new_output("stream", name="stdout", text="passed\n"))
        report = {"status": result["status"], "reason": result["reason"], "flags": flags, "ran": result["ran"],
                  "sandbox": "bubblewrap" if result["sandbox"] else "none", "own_work_seconds": round(own_seconds, 1)}
        report_path.write_text(json.dumps(report, indent=1) + "\n")
        nb.metadata.pop("course_grading", None)
        return nb, resources


def _add_error(cell, ename, evalue):
    import nbformat

    cell.outputs.append(nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"]))


class FeedbackView(_NbGraderPreprocessor):
    """Feedback for students: test cells show only their visible part and, per test, the
    result and the message (``ename: evalue``), never hidden tests or tracebacks into them;
    written answers not yet graded by hand show "to be graded"."""

    def preprocess(self, nb, resources):
        import re

        hidden = re.compile(r"^[ \t]*### BEGIN HIDDEN TESTS.*?### END HIDDEN TESTS[ \t]*\n?", re.S | re.M)
        waiting = _waiting_for_hand_grading(resources)
        pending = 0.0
        for cell in nb.cells:
            gmeta = cell.metadata.get("nbgrader", {})
            if gmeta.get("grade") and gmeta.get("solution") and gmeta.get("grade_id") in waiting:
                gmeta["to_be_graded"] = True
                pending += float(gmeta.get("points", 0))
            if cell.cell_type != "code" or not (gmeta.get("grade") and not gmeta.get("solution")):
                continue
            cell.source = hidden.sub("", cell.source).rstrip() + "\n# (more tests run when grading)"
            outputs = []
            for out in cell.get("outputs", []):
                if out.output_type == "error":
                    out.traceback = [f"{out.ename}: {out.evalue}"]
                    outputs.append(out)
                elif out.output_type == "stream" and out.name == "stdout":
                    outputs.append(out)
            if not any(o.output_type == "error" for o in outputs):
                from nbformat.v4 import new_output

                outputs.append(new_output("stream", name="stdout", text="passed\n"))
            cell.outputs = outputs
        resources["nbgrader"]["to_be_graded"] = pending
        return nb, resources


def _waiting_for_hand_grading(resources):
    """Grade ids of this submission that nbgrader marks as needing a human (no manual score yet)."""
    from nbgrader.api import Gradebook, MissingEntry

    info = resources.get("nbgrader", {})
    if "db_url" not in info:
        return {k for k in info.get("waiting", ())}
    with Gradebook(info["db_url"]) as gb:
        try:
            nb = gb.find_submission_notebook(info["notebook"], info["assignment"], info["student"])
        except MissingEntry:
            return set()
        return {g.name for g in nb.grades if g.needs_manual_grade and g.manual_score is None}


def feedback_template_dir():
    """The folder holding the course's feedback template (nbgrader's, with "to be graded")."""
    return INSTRUCTORS_DIR / "templates"

