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

PROJECT_DIR = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = PROJECT_DIR / "notebooks"
DATA_ENV_VAR = "CNN_COURSE_DATA"


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
#: Limits per submission (nbgrader_config.py can change them).
CELL_TIMEOUT = 120
NOTEBOOK_TIMEOUT = 900
MEMORY_LIMIT_MB = 6144
MIN_MEMORY_MB = 2048
TMP_LIMIT_MB = 256          # the sandbox's /tmp (memory-backed): part of what a submission may use
PROCESS_LIMIT = 512         # processes and threads of the sandbox's user (a kernel with TensorFlow: about 60)
CHANNEL_BYTES = 64 * 2 ** 20
OUTPUT_CHARS = 20_000       # characters of text kept per cell (cut in the sandbox, cut again here)
IMAGE_BYTES = 4_000_000     # bytes of images kept per cell
#: The course files a submission must not change (checked by hash after grading).
PROTECTED_PATHS = ("cnn_utils.py", "cnnlib", "course.py", "nbgrader_config.py", "saved_models", "data", "instructors")
#: What a graded notebook may see of the course: mounted read-only at /course, or copied.
RUNTIME_FILES = ("cnn_utils.py", "cnnlib", "course.py", "saved_models")
STATUSES = ("graded", "failed", "flagged")
SANDBOX_COURSE = "/course"                 # where the sandbox sees the course's runtime files
SANDBOX_DATA = "/data"                     # ... and the datasets
SANDBOX_GRADER = "/grader"                 # ... and grading_sandbox.py
SANDBOX_WORKDIR = "/tmp/work"
SANDBOX_UID = 65534                        # when the grader is root, the sandbox runs as nobody


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


def course_file_hashes(root=PROJECT_DIR):
    """SHA-256 of every course file a submission could try to change, by relative path (Python's
    ``__pycache__`` folders left out: importing writes them)."""
    import hashlib

    hashes = {}
    data_dir = os.environ.get(DATA_ENV_VAR)
    roots = [(root / p, p) for p in PROTECTED_PATHS]
    if data_dir:
        roots.append((Path(data_dir), "$CNN_COURSE_DATA"))
    for path, label in roots:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and
                                                     "__pycache__" not in p.parts) if path.is_dir() else []
        for f in files:
            name = label if f == path else f"{label}/{f.relative_to(path)}"
            hashes[name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashes


def changed_course_files(before):
    """The course files added, changed or removed since ``before = course_file_hashes()``, sorted."""
    after = course_file_hashes()
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


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


# ---------------------------------------------------------------------------
# The sandbox
# ---------------------------------------------------------------------------

def sandbox_available():
    """True when bubblewrap (``bwrap``) can start the grading sandbox on this machine and
    ``$CNN_COURSE_SANDBOX`` is not ``none`` (grading then uses a private copy of the course)."""
    global _SANDBOX_OK
    if os.environ.get("CNN_COURSE_SANDBOX", "").lower() == "none":
        return False
    if _SANDBOX_OK is None:
        _SANDBOX_OK = bool(shutil.which("bwrap")) and subprocess.run(
            sandbox_command(["/bin/true"], binds=[]), capture_output=True, env={}).returncode == 0
    return _SANDBOX_OK


_SANDBOX_OK = None
#: What the sandbox sees of /etc: what the dynamic linker, locales and time zones need.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "hosts", "alternatives",
             "fonts", "mime.types", "ssl/certs")


def _system_binds():
    """(source, destination, kind) of the system and the Python environment, read-only."""
    import site

    binds = []
    for top in ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin"):
        path = Path(top)
        if path.is_symlink():
            binds.append((os.readlink(path), top, "symlink"))
        elif path.is_dir():
            binds.append((top, top, "ro"))
    binds += [(f"/etc/{name}", f"/etc/{name}", "ro") for name in ETC_FILES if Path("/etc", name).exists()]
    for path in (sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent),
                 *site.getsitepackages()):
        if Path(path).exists() and not path.startswith("/usr/"):
            binds.append((str(Path(path).resolve()), str(Path(path).resolve()), "ro"))
            if str(Path(path)) != str(Path(path).resolve()):
                binds.append((str(Path(path).resolve()), str(Path(path)), "ro"))
    return binds


def course_binds(own_work=False, root=None, data_dir=None):
    """(source, destination) of the course's runtime files in the sandbox (read-only): the course at
    /course, the datasets at /data, the sandbox's own code at /grader; from ``root`` (default: the
    course) and ``data_dir`` (default: where ``load_dataset`` finds them). ``own_work``: only the
    MNIST model, the MNIST test data and ``grading_ownwork.py`` as the one ``cnn_utils.py``."""
    import cnn_utils

    root = Path(root or PROJECT_DIR)

    def dataset(name):
        paths = [Path(data_dir) / f"{name}.npz"] if data_dir else cnn_utils.dataset_search_paths(name)
        return next((p.resolve() for p in paths if p.is_file()), None)

    binds = [(str(root / "cnnlib" / "grading_sandbox.py"), f"{SANDBOX_GRADER}/grading_sandbox.py")]
    if own_work:
        binds += [(str(root / "cnnlib" / "grading_ownwork.py"), f"{SANDBOX_COURSE}/cnn_utils.py"),
                  (str(root / "saved_models" / "mnist_cnn.keras"), f"{SANDBOX_COURSE}/saved_models/mnist_cnn.keras")]
        names = ("mnist",)
    else:
        binds += [(str(root / name), f"{SANDBOX_COURSE}/{name}") for name in RUNTIME_FILES if (root / name).exists()]
        names = ("mnist", "fashion_mnist")
    return binds + [(str(dataset(n)), f"{SANDBOX_DATA}/{n}.npz") for n in names if dataset(n)]


def _readable_by_all(path):
    """True when every folder above ``path`` lets anyone through and ``path`` lets anyone read."""
    import stat

    path = Path(path).resolve()
    if not path.exists() or not path.stat().st_mode & stat.S_IROTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)


_STAGED = None


def staged_course():
    """``(root, data_dir)`` the sandbox mounts: when it runs as another user (the grader is root), a
    read-only copy readable by anyone, made once per grading process (the course may sit in a
    private folder, e.g. under a private /tmp); else the course itself (``(None, None)``)."""
    global _STAGED
    if not _sandbox_user():
        return None, None
    if _STAGED is None:
        import atexit
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="cnn-course-grading-"))
        tmp.chmod(0o755)
        _STAGED = private_course_copy(tmp / "course")

        def remove():
            for path in [tmp, *tmp.rglob("*")]:
                if path.is_dir():
                    path.chmod(0o755)
            shutil.rmtree(tmp, ignore_errors=True)
        atexit.register(remove)
    return _STAGED


def _sandbox_user():
    """The user id the sandbox runs as when the grader is root (one per grading job, so that one
    submission's processes cannot use up another's), or None: the grader's own user."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or \
            not all(_readable_by_all(p) for p in (sys.prefix, sys.base_prefix, sys.executable)):
        return None
    return int(os.environ.get("CNN_COURSE_SANDBOX_UID", SANDBOX_UID))


def sandbox_env(threads=1, own_work=False):
    """The whole environment of the sandbox: nothing of the grader's."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp/home",
           "USER": "student", "LOGNAME": "student", "LANG": "C.UTF-8", "PYTHONPATH": SANDBOX_COURSE,
           "CNN_COURSE_DIR": SANDBOX_COURSE, DATA_ENV_VAR: SANDBOX_DATA, "MPLCONFIGDIR": "/tmp/mpl",
           "JUPYTER_RUNTIME_DIR": "/tmp/jupyter", "IPYTHONDIR": "/tmp/ipython", "JUPYTER_PLATFORM_DIRS": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": str(threads)}
    if own_work:
        env["CNN_COURSE_OWN_WORK_DIR"] = "/tmp/grader-job"
    return env


def sandbox_command(command, binds=None, env=None, tmp_mb=TMP_LIMIT_MB):
    """``command`` wrapped in bubblewrap (see the module's docstring); ``binds``: (source, destination)
    pairs mounted read-only over the size-limited /tmp (default: the course's runtime files)."""
    binds = course_binds() if binds is None else binds
    args = ["bwrap", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--as-pid-1", "--new-session", "--die-with-parent", "--cap-drop", "ALL",
            "--clearenv", "--size", str(tmp_mb * 2 ** 20), "--tmpfs", "/tmp",
            "--dev", "/dev", "--proc", "/proc", "--dir", "/etc"]
    for source, dest, kind in _system_binds():
        args += ["--symlink", source, dest] if kind == "symlink" else ["--ro-bind-try", source, dest]
    for source, dest in binds:
        args += ["--ro-bind", source, dest]
    for key, value in (env or {}).items():
        args += ["--setenv", key, value]
    args += ["--dir", SANDBOX_WORKDIR, "--chdir", SANDBOX_WORKDIR]
    uid = _sandbox_user()
    if uid is not None:  # root's processes escape RLIMIT_NPROC: the sandbox runs as a user of its own
        args = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] + args
    return args + list(command)


def limits_command(memory_mb, processes):
    """``prlimit`` arguments for the limits a sandbox starts with (inherited by every process in it):
    address space, processes and threads of its user, no core files, files up to the /tmp size."""
    if not shutil.which("prlimit"):  # util-linux's; without it only the time and output limits hold
        return []
    return ["prlimit", f"--as={int(memory_mb) * 2 ** 20}", f"--nproc={processes}", "--core=0",
            f"--fsize={TMP_LIMIT_MB * 2 ** 20}", "--"]


def _process_budget():
    """RLIMIT_NPROC counts every process of the sandbox's user: the ones it has now, plus PROCESS_LIMIT."""
    uid = _sandbox_user()
    uid = os.getuid() if uid is None else uid
    count = 0
    for task in Path("/proc").glob("[0-9]*/task/[0-9]*"):
        try:
            count += task.stat().st_uid == uid
        except OSError:
            pass
    return count + PROCESS_LIMIT


def _encode_arrays(arrays):
    out = {}
    for key, value in arrays.items():
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
        out[key] = base64.b64encode(buf.getvalue()).decode()
    return out


def run_sandboxed(nb, calls, arrays, cell_timeout=CELL_TIMEOUT, notebook_timeout=NOTEBOOK_TIMEOUT,
                  memory_mb=MEMORY_LIMIT_MB, log_path=None, threads=1, fast=True, own_work=False):
    """Run ``nb`` in the sandbox; at each cell with metadata ``grader_test`` (a test's name) the
    sandbox runs ``calls[name]`` (``{"calls": [...]}``) on ``arrays`` (the grader's inputs).

    Returns ``{"cells": {index: {"outputs", "count"}}, "tests": {name: message}, "status",
    "reason", "sandbox", "ran"}``: all of it data from the sandbox, to be judged, never trusted.
    ``status`` is ``failed`` when the kernel died, a cell could not be interrupted, the notebook ran
    past ``notebook_timeout`` seconds or the sandbox sent too much (what arrived is kept).
    """
    import tempfile
    import threading

    use_bwrap = sandbox_available()
    tmp = None
    job = {"notebook": nb, "calls": calls, "arrays": _encode_arrays(arrays), "cell_timeout": cell_timeout,
           "threads": threads, "fast": fast, "max_bytes": CHANNEL_BYTES, "workdir": SANDBOX_WORKDIR}
    env = sandbox_env(threads, own_work)
    if use_bwrap:
        root, data = staged_course()
        command = sandbox_command(["python", f"{SANDBOX_GRADER}/grading_sandbox.py"],
                                  course_binds(own_work, root, data), env)
        before = None
    else:  # a private copy of the course, the grader's user, no isolation
        tmp = Path(tempfile.mkdtemp(prefix="course-grade-"))
        root, data = private_course_copy(tmp / "course", own_work=own_work)
        job["workdir"] = str(tmp / "work")
        env.update(PYTHONPATH=str(root), CNN_COURSE_DIR=str(root), CNN_COURSE_DATA=data, HOME=str(tmp / "home"),
                   MPLCONFIGDIR=str(tmp / "mpl"), JUPYTER_RUNTIME_DIR=str(tmp / "jupyter"),
                   IPYTHONDIR=str(tmp / "ipython"), CNN_COURSE_OWN_WORK_DIR=str(tmp / "grader-job"),
                   CNN_COURSE_OWN_WORK_MODEL=str(root / "saved_models" / "mnist_cnn.keras"),
                   CNN_COURSE_GRADER_JOB=str(tmp / "grader-job"))
        command = [sys.executable, str(root / "cnnlib" / "grading_sandbox.py")]
        before = course_file_hashes()
    read_end, write_end = os.pipe()
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        job["channel_fd"] = write_end
        proc = subprocess.Popen(limits_command(memory_mb, _process_budget()) + command, stdin=subprocess.PIPE,
                                stdout=log, stderr=log, env=env, cwd="/" if use_bwrap else str(tmp),
                                pass_fds=(write_end,), start_new_session=True)
    finally:
        os.close(write_end)
    result = {"cells": {}, "tests": {}, "status": "failed", "ran": False, "sandbox": use_bwrap,
              "reason": "the sandbox ended without a result (see the log beside the scores)"}
    lines, received = [], [0]

    def read():
        with os.fdopen(read_end, "rb") as pipe:
            while True:
                chunk = pipe.readline(CHANNEL_BYTES + 1)
                if not chunk:
                    break
                received[0] += len(chunk)
                if received[0] > CHANNEL_BYTES:
                    lines.append(b'{"kind": "overflow"}')
                    break
                lines.append(chunk)

    def feed():
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    reader, writer = threading.Thread(target=read, daemon=True), threading.Thread(target=feed, daemon=True)
    reader.start()
    writer.start()
    reader.join(notebook_timeout)
    timed_out = reader.is_alive()
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()
    if log_path:
        log.close()
    for line in list(lines):
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        kind = message.get("kind")
        if kind == "overflow":
            result["status"], result["reason"] = "failed", f"the sandbox sent more than {CHANNEL_BYTES // 2 ** 20} MB"
            break
        if kind == "setup":
            result["ran"] = True
        elif kind == "cell" and isinstance(message.get("index"), int) and isinstance(message.get("outputs"), list):
            result["cells"][message["index"]] = {"outputs": message["outputs"], "count": message.get("count")}
        elif kind == "test" and message.get("name") in calls:
            result["tests"].setdefault(message["name"], message)
        elif kind == "end":
            result["status"] = "failed" if message.get("status") == "failed" else "graded"
            result["reason"] = str(message.get("reason") or "")[:500]
            break
    if timed_out:
        result["status"], result["reason"] = "failed", f"the notebook ran past its limit of {notebook_timeout} s as a whole"
    if tmp is not None:
        for path in tmp.rglob("*"):  # the private copy is read-only
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(tmp, ignore_errors=True)
        changed = changed_course_files(before)
        if changed:
            result["status"] = "failed"
            result["reason"] = (f"the course files changed while this submission ran ({', '.join(changed)}); "
                                "restore them (git checkout) and grade with bubblewrap installed")
    return result


def private_course_copy(dest, own_work=False):
    """Without bubblewrap: a private, read-only copy of what a graded notebook imports
    (``cnn_utils.py``, ``cnnlib/``, ``course.py``, ``saved_models/``, the datasets; with ``own_work``
    the stand-in ``cnn_utils.py`` of the own-work run), so that a submission that edits the helpers
    changes only its own copy. Returns ``(course_dir, data_dir)``."""
    dest.mkdir(parents=True)
    data = dest / "data"
    data.mkdir()
    for source, target in course_binds(own_work):
        if target.startswith(SANDBOX_GRADER):
            target = f"{SANDBOX_COURSE}/cnnlib/{Path(target).name}"
        target = (data / Path(target).name) if target.startswith(SANDBOX_DATA) else \
            dest / Path(target).relative_to(SANDBOX_COURSE)
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(source).is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        elif not target.exists():
            shutil.copy2(source, target)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return dest, str(data)


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

