"""The course's command line: ``python -m course --help``.

    run        execute the notebook series into build/ (ipynb + html)
    prefetch   download the datasets and the VGG16 weights for offline use
    train      retrain a course CNN (never replaces a shipped model by accident)
    release    write the student version of the exercise notebook (nbgrader)
    grade      autograde a folder of submissions, isolated and in parallel (README, for instructors)

Library functions here raise exceptions; only ``main`` turns them into one-line
messages and exit codes. The teaching helpers live in ``cnn_utils.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import cnnlib.data
import cnnlib.vgg16
import cnn_utils
from cnn_utils import BUILD_DIR, DATA_ENV_VAR, DATASETS, DEFAULT_SEED, NOTEBOOKS_DIR, PROJECT_DIR

DEFAULT_EPOCHS = {"mnist": 4, "fashion_mnist": 15}


class CourseError(Exception):
    """A command could not do what was asked; the message says what to do."""


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------

def train_and_save(dataset="mnist", epochs=None, seed=DEFAULT_SEED, out_dir=None,
                   replace=False, verbose=None):
    """Train the course CNN on ``dataset``, measure it, save it with its metadata.

    Fitted on 90 % of the training images; the other 10 % (``train_val_split(...,
    seed)``) stay unseen as a validation set. Without ``replace`` the model goes to
    ``out_dir`` (default ``build/models/``) and nothing shipped is touched. With
    ``replace`` it replaces ``saved_models/<dataset>_cnn.keras`` (for a seed other than
    the default, ``<dataset>_cnn_seed<seed>.keras``) only when its test accuracy is at
    least the shipped one's; otherwise it stays in ``build/models/``
    and ``info["replaced"]`` is False. Outside ``saved_models/`` nothing is overwritten:
    when ``mnist_cnn.keras`` exists, the model goes to ``mnist_cnn_2.keras`` (``_3`` ...).
    Returns the metadata dict written beside it (``info["path"]``: where the model went).
    """
    if dataset not in DATASETS:
        raise CourseError(f"Unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}.")
    if epochs is None:
        epochs = DEFAULT_EPOCHS[dataset]
    if not cnn_utils._is_int(epochs) or epochs < 1:
        raise CourseError(f"epochs must be a whole number of at least 1, got {epochs!r}.")
    if replace and out_dir is not None:
        raise CourseError("Give either replace=True (saved_models/) or out_dir, not both.")
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    (x_train, y_train), (x_test, y_test) = cnn_utils.load_dataset(dataset)
    (x_fit, y_fit), (x_val, y_val) = cnn_utils.train_val_split(x_train, y_train, seed=seed)
    model = cnn_utils.build_mnist_cnn(seed=seed)
    start = time.perf_counter()
    history = cnn_utils.train_model(model, x_fit, y_fit, epochs=int(epochs), seed=seed,
                                    verbose=verbose, validation_data=(x_val, y_val))
    train_seconds = time.perf_counter() - start
    _, test_acc = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    info = {
        "dataset": dataset,
        "test_accuracy": round(float(test_acc), 4),
        "epochs": int(epochs),
        "seed": seed,
        "fit_images": int(len(x_fit)),
        "validation": f"train_val_split(x_train, y_train, val_fraction=0.1, seed={seed})",
        "train_seconds": round(train_seconds, 1),
        "keras_version": cnn_utils._keras().__version__,
        "command": f"python -m course train --dataset {dataset}"
                   + (f" --seed {seed}" if seed != DEFAULT_SEED else "") + " --replace",
        "history": {k: [round(float(v), 5) for v in vals] for k, vals in history.history.items()},
    }
    shipped = cnn_utils.model_path(dataset, seed)   # another seed ships beside the course model
    info["replaced"] = False
    if replace:
        old = _shipped_accuracy(dataset, seed)
        if old is None or info["test_accuracy"] >= old:
            out = shipped.parent
            info["replaced"] = True
        else:
            out = BUILD_DIR / "models"
            info["kept_shipped_accuracy"] = old
    else:
        out = Path(out_dir) if out_dir else BUILD_DIR / "models"
    out.mkdir(parents=True, exist_ok=True)
    path = out / shipped.name
    if not info["replaced"]:  # never write over an earlier model (or any file of that name)
        path = _free_path(path)
    model.save(path)
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    info["path"] = str(path)
    return info


def _free_path(path):
    """``path``, or ``<stem>_2<suffix>``, ``_3`` ... : the first name taken by neither the model nor
    its JSON record."""
    candidate, n = path, 1
    while candidate.exists() or candidate.with_suffix(".json").exists():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def _shipped_accuracy(dataset, seed=DEFAULT_SEED):
    meta = cnn_utils.model_path(dataset, seed).with_suffix(".json")
    try:
        return float(json.loads(meta.read_text())["test_accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------
# prefetch
# ---------------------------------------------------------------------------

def prefetch(datasets=DATASETS, vgg16=True):
    """Fetch every dataset and weight file the course needs, ahead of a class.

    A dataset already found where ``load_dataset`` looks (``$CNN_COURSE_DATA``,
    ``data/``) is validated and kept; a missing one is downloaded to ``data/``.
    VGG16 weights go to torchvision's cache, fetched in a child process (the
    TensorFlow/torchvision import-order trap).
    """
    cnn_utils.DATA_DIR.mkdir(exist_ok=True)
    for name in datasets:
        found = next((p for p in cnn_utils.dataset_search_paths(name) if p.is_file()), None)
        if found:
            cnnlib.data._read_npz(found)
            print(f"{name}: already in {found}")
            continue
        (x_train, y_train), (x_test, y_test) = cnnlib.data._download_dataset(name)
        target = cnn_utils.DATA_DIR / f"{name}.npz"
        np.savez_compressed(target, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
        print(f"{name}: saved to {target}")
    if vgg16:
        code = (  # the same weights enum and torchvision cache as load_vgg16; one line on failure
            f"import sys; sys.path.insert(0, {str(PROJECT_DIR)!r}); import cnn_utils\n"
            "import cnnlib.vgg16\ntry:\n    cnnlib.vgg16._download_vgg16_state_dict(timeout=60)\n"
            "except Exception as err:\n"
            "    sys.exit(f'VGG16 weights: {type(err).__name__}: {str(err)[:300]}')\n"
            "print('VGG16 ImageNet weights (VGG16_Weights.IMAGENET1K_V1): cached in', "
            "cnn_utils.vgg16_weights_path())"
        )
        if subprocess.run([sys.executable, "-c", code]).returncode != 0:
            raise CourseError("Downloading the VGG16 weights failed (see above). Check the "
                              "network and run `python -m course prefetch` again.")


# ---------------------------------------------------------------------------
# setup on Colab, Binder or a fresh JupyterHub user (every notebook's first cell calls it)
# ---------------------------------------------------------------------------

#: Requirements the notebooks never install for themselves: the notebook server and the tools of
#: `make course` and grading (Colab and a hub bring their own server).
SERVER_TOOLS = frozenset({"jupyterlab", "voila", "ipykernel", "nbformat", "nbconvert", "nbclient", "papermill",
                          "nbgrader"})


def _distribution_name(name):
    return "".join("-" if ch in "_." else ch for ch in name.strip().lower())


def missing_requirements(requirements=PROJECT_DIR / "requirements.txt"):
    """The pinned requirements (``name==version``) the notebooks need whose package is not installed
    at all. An installed package counts whatever its version: Colab's TensorFlow and PyTorch stay."""
    from importlib import metadata

    have = {_distribution_name(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
    lines = (line.split("#")[0].strip() for line in Path(requirements).read_text().splitlines())
    return [line for line in lines if "==" in line
            and _distribution_name(line.split("==")[0]) not in have | SERVER_TOOLS]


def install_missing(requirements=PROJECT_DIR / "requirements.txt"):
    """pip-install ``missing_requirements()`` into this Python; returns a sentence saying what it did."""
    missing = missing_requirements(requirements)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
        return f"Installed what was missing: {', '.join(missing)}."
    return "Every package the notebooks need was already installed."


# ---------------------------------------------------------------------------
# run: the notebook series (the tests run notebooks through the same function)
# ---------------------------------------------------------------------------

def notebook_paths(names=None):
    """The course notebooks in teaching order; ``names`` keeps those whose file name
    contains one of the given strings."""
    paths = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    # The exercise notebook runs in its instructors' version (the student version has no answers);
    # a copy of the course without instructors/ leaves it to the student.
    paths = [EXERCISE_SOURCE if p.name == EXERCISE_SOURCE.name else p for p in paths
             if p.name != EXERCISE_SOURCE.name or EXERCISE_SOURCE.is_file()]
    if names:
        chosen = [p for p in paths if any(n in p.name for n in names)]
        if not chosen:
            raise CourseError(f"No notebook matches {', '.join(names)}; notebooks: "
                              f"{', '.join(p.name for p in paths)}.")
        paths = chosen
    return paths


def execute_notebook(path, out_path, parameters=None, progress_bar=True, kernel_name=None):
    """Execute one notebook headless in a fresh kernel (papermill), cwd ``notebooks/``.

    Raises ``CourseError`` naming the notebook and the failing cell.
    """
    import papermill as pm

    path, out_path = Path(path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(str(path), str(out_path), parameters=parameters or {},
                            cwd=str(NOTEBOOKS_DIR), progress_bar=progress_bar,
                            kernel_name=kernel_name)
    except pm.PapermillExecutionError as err:
        raise CourseError(f"{path.name} failed in cell {err.exec_count} ({err.ename}: "
                          f"{err.evalue}). The partly executed notebook is at {out_path}.") from None
    return out_path


def run_notebooks(names=None, out_dir=BUILD_DIR, parameters=None, html=True, kernel_name=None):
    """Execute the notebook series in order, each in a fresh kernel, into ``out_dir``
    (executed ``.ipynb`` and, with ``html``, an ``.html`` rendering of each).
    Returns ``[(notebook name, seconds), ...]``."""
    paths = notebook_paths(names)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    for path in paths:  # before anything runs: never write over a source or someone's own file
        _check_output(path, out_dir / path.name)
    timings = []
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name}", flush=True)
        start = time.perf_counter()
        out_path = execute_notebook(path, out_dir / path.name, parameters, kernel_name=kernel_name)
        seconds = time.perf_counter() - start
        timings.append((path.name, seconds))
        if html:
            to_html(out_path)
        print(f"    done in {seconds:.0f} s -> {out_path}", flush=True)
    print(f"All {len(timings)} notebooks ran in {sum(s for _, s in timings):.0f} s. Output in {out_dir}/")
    return timings


def _written_by_run(ipynb_path):
    """True for a notebook that papermill wrote (an earlier output of `run`)."""
    try:
        return "papermill" in json.loads(Path(ipynb_path).read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out_dir):
    """The output folder: an existing file, or a place that cannot be written, is refused
    before anything runs (nothing is overwritten)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CourseError(f"--out {out_dir} is a file, not a folder; nothing was written. Choose a folder "
                          "(it is created if missing), e.g. --out build/.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".course-write-test-", delete=True)
        probe.close()
    except OSError as err:
        raise CourseError(f"Cannot write into --out {out_dir} ({err.strerror or err}); nothing was written. "
                          "Choose a folder you can write to, e.g. --out build/ or --out ~/cnn-course-output.") from None


def _check_output(source, out_path):
    """Refuse an output path that is the source notebook itself, or a file `run` did not write."""
    out_path = Path(out_path)
    if out_path.resolve() == Path(source).resolve():
        raise CourseError(f"The output folder {out_path.parent} holds the source notebooks: running into it "
                          f"would overwrite {source.name}. Choose another folder with --out (default: build/).")
    html = out_path.with_suffix(".html")
    if (out_path.exists() and not _written_by_run(out_path)) or (html.exists() and not out_path.exists()):
        mine = out_path if out_path.exists() else html
        raise CourseError(f"{mine} exists and was not written by `python -m course run`; running would "
                          "overwrite it. Move it away, or choose another folder with --out.")


def to_html(ipynb_path):
    """Render an executed notebook to HTML beside it (widget state included when stored).

    A code cell whose source is collapsed in JupyterLab (cell metadata ``jupyter.source_hidden``,
    or the tag ``hide-input``: the cells that only build the sentences under a figure) shows its
    output without its code: the handout reads as text, and the code stays one click away in the
    notebook.
    """
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(ipynb_path), as_version=4)
    for cell in nb.cells:
        meta = cell.get("metadata", {})
        if meta.get("jupyter", {}).get("source_hidden") or "hide-input" in meta.get("tags", []):
            cell.metadata["transient"] = {"remove_source": True}   # as nbconvert's TagRemovePreprocessor marks it
    body, _ = HTMLExporter().from_notebook_node(nb)
    out = Path(ipynb_path).with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


# ---------------------------------------------------------------------------
# release and grade: the exercise notebook with nbgrader
# ---------------------------------------------------------------------------
# nbgrader does the bookkeeping (student version, gradebook, restoring read-only cells and
# hidden tests, scores, formgrader, feedback). Two of its steps are replaced through
# nbgrader_config.py, so that `nbgrader autograde` itself grades safely:
#   * ``RestoreCells`` (before nbgrader's OverwriteCells) puts deleted read-only cells back
#     and notes edited or deleted ones;
#   * ``SandboxedExecute`` (instead of nbgrader's Execute) runs the notebook in a separate
#     process under bubblewrap (read-only course files, no network, a private /tmp, memory
#     and time limits) with a guard that restores pristine helpers before every test cell;
# and ``FeedbackView`` shows students each test's result and message, never hidden tests.

#: nbgrader's course directory (git-ignored; see nbgrader_config.py).
GRADING_DIR = PROJECT_DIR / "nbgrader"
#: The assignment, and its one notebook, in nbgrader's layout.
EXERCISE_ASSIGNMENT = "11_exercises"
#: The nbgrader source with solutions and hidden tests (instructors only) ...
INSTRUCTORS_DIR = PROJECT_DIR / "instructors"
EXERCISE_SOURCE = INSTRUCTORS_DIR / f"{EXERCISE_ASSIGNMENT}.ipynb"
#: ... and the student version generated from it, committed in notebooks/.
STUDENT_NOTEBOOK = NOTEBOOKS_DIR / f"{EXERCISE_ASSIGNMENT}.ipynb"
#: Limits per submission (nbgrader_config.py can change them).
CELL_TIMEOUT = 120
NOTEBOOK_TIMEOUT = 900
MEMORY_LIMIT_MB = 6144
MIN_MEMORY_MB = 2048
#: The course files a submission must not change (checked by hash after grading).
PROTECTED_PATHS = ("cnn_utils.py", "cnnlib", "course.py", "nbgrader_config.py", "saved_models", "data", "instructors")
#: What a graded notebook may see of the course: mounted read-only by bubblewrap, or copied.
RUNTIME_FILES = ("cnn_utils.py", "cnnlib", "course.py", "saved_models")
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


def course_file_hashes(root=PROJECT_DIR):
    """SHA-256 of every course file a submission could try to change, by relative path."""
    import hashlib

    hashes = {}
    data_dir = os.environ.get(DATA_ENV_VAR)
    roots = [(root / p, p) for p in PROTECTED_PATHS]
    if data_dir:
        roots.append((Path(data_dir), "$CNN_COURSE_DATA"))
    for path, label in roots:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
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
        else:
            lines = [l for l in (str(result.get("error") or "") + "\n" + str(result.get("log") or "")).splitlines()
                     if l.strip()]
            errors = [l for l in lines if "ERROR" in l or "Error" in l] or lines or ["no message"]
            report = {"status": "failed", "flags": [],
                      "reason": f"nbgrader could not grade it: {errors[-1].strip()[:300]}"}
        report["seconds"] = round(time.perf_counter() - start, 1)
        print(_RESULT + json.dumps({"student": student, "report": report}), flush=True)


def _grading_worker(todo, reports, settings, on_done):
    """A thread of ``grade``: feeds student ids from the queue ``todo`` to its own grading
    process and stores each answer in ``reports``; restarts the process if it dies."""
    import queue

    proc = None
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # nbgrader runs alembic
    try:
        while True:
            try:
                student = todo.get_nowait()
            except queue.Empty:
                return
            if proc is None or proc.poll() is not None:
                proc = subprocess.Popen([sys.executable, "-c", "import course; course._grading_process()",
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
    unreadable: the reason is in ``flags``) and ``flagged`` (tampering found) need an
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

    threads = [threading.Thread(target=_grading_worker, args=(todo, reports, settings, on_done))
               for _ in range(min(jobs, max(1, len(students))))]
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


# --- sandbox ---------------------------------------------------------------

def sandbox_available():
    """True when bubblewrap (``bwrap``) can start a sandbox on this machine and
    ``$CNN_COURSE_SANDBOX`` is not ``none`` (grading then uses a private copy of the course)."""
    global _SANDBOX_OK
    if os.environ.get("CNN_COURSE_SANDBOX", "").lower() == "none":
        return False
    if _SANDBOX_OK is None:
        bwrap = shutil.which("bwrap")
        _SANDBOX_OK = bool(bwrap) and subprocess.run(
            [bwrap, "--ro-bind", "/", "/", "--unshare-net", "--unshare-pid", "--cap-drop", "ALL", "true"],
            capture_output=True).returncode == 0
    return _SANDBOX_OK


_SANDBOX_OK = None


def sandbox_command(command, workdir="/tmp/work"):
    """``command`` wrapped in bubblewrap: system and Python read-only, the course's runtime
    files read-only (not instructors/, nbgrader/, build/ or .git), a private /tmp, no network,
    own PID namespace, no capabilities. Only /tmp (memory-backed, private) is writable."""
    ro = ["/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin", "/etc", sys.prefix, sys.base_prefix,
          sys.exec_prefix, str(Path(sys.executable).resolve().parent)]
    import site

    ro += [p for p in site.getsitepackages() if Path(p).exists()]
    ro += [str(PROJECT_DIR / name) for name in (*RUNTIME_FILES, "data")]
    data = os.environ.get("CNN_COURSE_DATA")
    if data:
        ro.append(str(Path(data).resolve()))
    args = ["bwrap"]
    for path in dict.fromkeys(ro):
        args += ["--ro-bind-try", path, path]
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--dir", workdir,
             "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--new-session",
             "--die-with-parent", "--cap-drop", "ALL", "--chdir", workdir]
    return args + list(command)


def _limit_memory(megabytes):
    import resource

    limit = int(megabytes) * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# The guard: loaded into the kernel before the first cell; its `check` runs before every test
# cell. It restores what the tests rely on (module attributes, IPython's input and AST
# transformers, event hooks, sys hooks, builtins, the names the read-only cells defined) and
# reports what it found changed by the student's code.
_GUARD = r'''
def _course_guard_install(token, course_dir):
    import builtins, hashlib, json, os, sys, types
    sys.path.insert(0, course_dir)
    _fd, _null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(_null, 2)
    try:
        import numpy, numpy.testing, numpy.linalg, tensorflow, keras, keras.losses, keras.layers
        import matplotlib, matplotlib.pyplot, matplotlib.figure, cnn_utils
    finally:
        os.dup2(_fd, 2); os.close(_fd); os.close(_null)
    ip = get_ipython()
    get_ipython().run_line_magic("matplotlib", "inline")
    mods = [builtins, numpy, numpy.testing, numpy.linalg, tensorflow, keras, keras.losses, keras.layers,
            matplotlib.pyplot, matplotlib.figure, cnn_utils]
    mods += [m for n, m in sorted(sys.modules.items()) if n.startswith("cnnlib.") and m is not None]
    per_request = {"input", "raw_input", "getpass"}  # ipykernel rebinds these for every request
    snap_mods = {m.__name__: (m, {k: v for k, v in vars(m).items() if not k.startswith("_") and k not in per_request})
                 for m in mods}
    sys_names = ("displayhook", "meta_path", "path_hooks")
    snap_sys = {n: getattr(sys, n) for n in sys_names}
    snap_sys_lists = {"meta_path": list(sys.meta_path), "path_hooks": list(sys.path_hooks)}
    snap_io = (sys.stdout, sys.stderr)
    shell_lists = ("input_transformers_cleanup", "input_transformers_post", "ast_transformers")
    snap_lists = {n: (getattr(ip, n), list(getattr(ip, n))) for n in shell_lists}
    itm = ip.input_transformer_manager
    itm_lists = ("cleanup_transforms", "line_transforms", "token_transformers")
    snap_itm = (itm, {n: list(getattr(itm, n)) for n in itm_lists})
    snap_events = {e: list(cbs) for e, cbs in ip.events.callbacks.items()}
    objects = [ip, ip.kernel, ip.compile, itm, ip.displayhook, ip.display_pub]
    snap_classes = {}
    for obj in objects:
        for cls in type(obj).__mro__:
            if cls is not object and id(cls) not in snap_classes:
                snap_classes[id(cls)] = (cls, {k: v for k, v in vars(cls).items() if callable(v)})
    snap_inst = {id(o): (o, {k for k in vars(o)}) for o in objects}
    snap_handlers = dict(getattr(ip.kernel, "shell_handlers", {}))
    snap_custom = (ip.custom_exceptions, ip.CustomTB)
    sys_trace, sys_profile = sys.gettrace(), sys.getprofile()
    names = {}

    def fingerprint(v):
        try:
            if hasattr(v, "get_weights") and hasattr(v, "layers"):
                return hashlib.sha1(b"".join(numpy.ascontiguousarray(w).tobytes() for w in v.get_weights())).hexdigest()
            if isinstance(v, numpy.ndarray):
                return hashlib.sha1(numpy.ascontiguousarray(v).tobytes()).hexdigest() + str(v.shape)
            if isinstance(v, (list, tuple)):
                return repr([fingerprint(x) for x in v])
            if isinstance(v, types.FunctionType):
                return (id(v.__code__), v.__defaults__, v.__kwdefaults__)
        except Exception:
            return None
        return None

    def saved_copy(v):
        if isinstance(v, numpy.ndarray):
            return v.copy()
        if hasattr(v, "get_weights") and hasattr(v, "layers"):
            return [numpy.array(w) for w in v.get_weights()]
        if isinstance(v, list):
            return list(v)
        if isinstance(v, types.FunctionType):
            return (v.__code__, v.__defaults__, v.__kwdefaults__)
        return None

    before = {}

    def remember_before():
        before.clear()
        before.update({k: id(v) for k, v in ip.user_ns.items()})

    def remember_after():
        for k, v in list(ip.user_ns.items()):
            if not k.startswith("_i") and before.get(k) != id(v) and k not in ("_", "__", "___", "In", "Out"):
                names[k] = (v, fingerprint(v), saved_copy(v))

    def check():
        found = []
        if sys.gettrace() is not sys_trace:
            found.append("a trace function (sys.settrace)"); sys.settrace(sys_trace)
        if sys.getprofile() is not sys_profile:
            found.append("a profile function (sys.setprofile)"); sys.setprofile(sys_profile)
        for n, v in snap_sys.items():
            if n in snap_sys_lists:
                if list(getattr(sys, n)) != snap_sys_lists[n] or getattr(sys, n) is not v:
                    found.append(f"sys.{n}"); setattr(sys, n, v); v[:] = snap_sys_lists[n]
            elif getattr(sys, n) != v:
                found.append(f"sys.{n}"); setattr(sys, n, v)
        sys.stdout, sys.stderr = snap_io
        for n, (lst, items) in snap_lists.items():
            if getattr(ip, n) is not lst or list(lst) != items:
                found.append(f"IPython's {n}"); lst[:] = items; setattr(ip, n, lst)
        if ip.input_transformer_manager is not snap_itm[0]:
            found.append("IPython's input_transformer_manager"); ip.input_transformer_manager = snap_itm[0]
        for n, items in snap_itm[1].items():
            if list(getattr(snap_itm[0], n)) != items:
                found.append(f"IPython's input transformer list {n}"); setattr(snap_itm[0], n, list(items))
        for e, cbs in ip.events.callbacks.items():
            if list(cbs) != snap_events.get(e, []):
                found.append(f"an IPython event callback ({e})"); cbs[:] = snap_events.get(e, [])
        for cls, funcs in snap_classes.values():
            for k, v in funcs.items():
                if vars(cls).get(k) is not v:
                    found.append(f"{cls.__name__}.{k}"); setattr(cls, k, v)
        for obj, keys in snap_inst.values():
            for k in set(vars(obj)) - keys:
                if any(k in vars(c) for c in type(obj).__mro__):
                    found.append(f"{type(obj).__name__}.{k} (replaced on the instance)"); delattr(obj, k)
        if getattr(ip.kernel, "shell_handlers", {}) != snap_handlers:
            found.append("the kernel's message handlers"); ip.kernel.shell_handlers.clear(); ip.kernel.shell_handlers.update(snap_handlers)
        if (ip.custom_exceptions, ip.CustomTB) != snap_custom:
            found.append("IPython's custom exception handler"); ip.custom_exceptions, ip.CustomTB = snap_custom
        for name, (m, attrs) in snap_mods.items():
            if sys.modules.get(name) is not m:
                found.append(f"the module {name} in sys.modules"); sys.modules[name] = m
            d = vars(m)
            for k, v in attrs.items():
                if d.get(k, d) is not v:
                    found.append(f"{name}.{k}"); setattr(m, k, v)
        restored = []
        for k, (v, fp, copy) in names.items():
            if ip.user_ns.get(k, names) is not v:
                restored.append(k); ip.user_ns[k] = v
            if fp is not None and fingerprint(v) != fp:
                restored.append(k)
                if isinstance(v, numpy.ndarray):
                    v.setflags(write=True); v[...] = copy
                elif isinstance(v, list):
                    v[:] = copy
                elif isinstance(v, types.FunctionType):
                    v.__code__, v.__defaults__, v.__kwdefaults__ = copy
                elif copy is not None:
                    v.set_weights(copy)
        return found, restored

    def report():
        found, restored = check()
        sys.__stdout__.flush()
        print(token + json.dumps({"tampered": sorted(set(found)), "restored": sorted(set(restored))}))

    guard = types.SimpleNamespace(before=remember_before, after=remember_after, report=report)
    return guard
'''


class _Channel:
    """The worker's private result channel: a pipe the kernel does not inherit."""

    def __init__(self):
        fd = os.dup(1)                      # os.dup makes a non-inheritable descriptor
        os.dup2(2, 1)                       # whatever else writes to stdout goes to the log
        self.stream = os.fdopen(fd, "w", buffering=1)

    def send(self, **message):
        self.stream.write(json.dumps(message) + "\n")
        self.stream.flush()


def _sandbox_worker():
    """Run inside the sandbox: execute the notebook given on stdin, cell by cell, with the
    guard before every test cell; send results to the grader as JSON lines (``_Channel``)."""
    import ctypes
    import secrets

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    job = json.loads(sys.stdin.read())
    channel = _Channel()
    try:  # not dumpable: the kernel (same user) cannot open this process's descriptors in /proc
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        pass
    if job.get("memory_mb"):
        _limit_memory(job["memory_mb"])
    nb = nbformat.from_dict(job["notebook"])
    token = "@@course-guard-" + secrets.token_hex(16) + "@@"
    workdir = Path(job.get("workdir") or os.getcwd())
    env = dict(os.environ, CNN_COURSE_DIR=str(PROJECT_DIR), TF_CPP_MIN_LOG_LEVEL="3", MPLBACKEND="agg",
               TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS=str(job.get("threads", 1)),
               OMP_NUM_THREADS=str(job.get("threads", 1)), PYTHONDONTWRITEBYTECODE="1")
    client = NotebookClient(nb, timeout=job["cell_timeout"], interrupt_on_timeout=True, allow_errors=True,
                            kernel_name="python3", resources={"metadata": {"path": str(workdir)}},
                            record_timing=False, startup_timeout=120, shutdown_kernel="immediate",
                            error_on_timeout={"ename": "CellTimeoutError", "evalue": "the cell ran past the "
                                              f"{job['cell_timeout']} s limit and was interrupted",
                                              "traceback": [f"CellTimeoutError: the cell ran past the "
                                                            f"{job['cell_timeout']} s limit and was interrupted"]})

    replies = {}
    client.on_cell_executed = lambda **kw: replies.__setitem__("last", kw["execute_reply"].get("content", {}))

    def run(cell, index, **kwargs):
        """Execute one cell; True when it ran past its limit (the reply is then the timeout's)."""
        replies.clear()
        client.execute_cell(cell, index, **kwargs)
        timed_out = replies.get("last", {}).get("ename") == "CellTimeoutError"
        if timed_out:
            _add_error(cell, "CellTimeoutError", client.error_on_timeout["evalue"])
        return timed_out

    def hidden(code, timeout=60):
        cell = nbformat.v4.new_code_cell(code)
        client.timeout, saved = timeout, client.timeout
        try:
            cell.timed_out = run(cell, -1, store_history=False)
        finally:
            client.timeout = saved
        return cell

    def guard_report():
        cell = hidden("_course_guard.report()")
        for out in cell.outputs:
            for line in out.get("text", "").splitlines() if out.output_type == "stream" else []:
                if line.startswith(token):
                    return json.loads(line[len(token):])
        return None

    status, reason = "graded", ""
    with client.setup_kernel(env=env, cwd=str(workdir)):
        try:
            started = time.perf_counter()
            setup = hidden(_GUARD + f"\n_course_guard = _course_guard_install({token!r}, {str(PROJECT_DIR)!r})\n"
                                    "del _course_guard_install\n", timeout=180)
            if any(o.output_type == "error" for o in setup.outputs):
                raise RuntimeError("the grader could not prepare the kernel: "
                                   + "; ".join(f"{o.ename}: {o.evalue}" for o in setup.outputs if o.output_type == "error"))
            channel.send(kind="setup", seconds=round(time.perf_counter() - started, 2))
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                meta = cell.metadata.get("nbgrader", {})
                is_test = bool(meta.get("grade")) and not meta.get("solution")
                is_given = bool(meta.get("locked")) and not is_test
                guard = None
                if is_test:
                    guard = guard_report()
                if is_test or is_given:
                    hidden("_course_guard.before()")
                started = time.perf_counter()
                timed_out = run(cell, index)
                seconds = round(time.perf_counter() - started, 2)
                if timed_out:  # interrupted: is the kernel listening again?
                    if hidden("1", timeout=20).timed_out:
                        channel.send(kind="cell", index=index, outputs=cell.outputs, count=cell.execution_count,
                                     guard=guard, seconds=seconds)
                        raise TimeoutError(f"cell {index} ran past the {job['cell_timeout']} s limit and could not "
                                           "be interrupted (e.g. a loop in compiled code); the kernel was stopped")
                if job.get("fast") and "parameters" in cell.metadata.get("tags", []):
                    hidden("FAST = True  # the grader draws the demonstration figures small")
                if is_test or is_given:
                    hidden("_course_guard.after()")
                channel.send(kind="cell", index=index, outputs=cell.outputs, count=cell.execution_count, guard=guard,
                             seconds=seconds)
        except DeadKernelError:
            status, reason = "failed", f"the kernel died while running cell {index} (e.g. os._exit, a crash or too much memory)"
        except TimeoutError as err:
            status, reason = "failed", str(err)
        except Exception as err:  # the grader's own trouble: report it, never hang
            status, reason = "failed", f"{type(err).__name__}: {err}"
        finally:
            try:
                client.km.kill_kernel() if status == "failed" else None
            except Exception:
                pass
    channel.send(kind="end", status=status, reason=reason)


def run_sandboxed(nb, cell_timeout=CELL_TIMEOUT, notebook_timeout=NOTEBOOK_TIMEOUT, memory_mb=MEMORY_LIMIT_MB,
                  log_path=None, threads=1, fast=True):
    """Execute a notebook in its own process (bubblewrap sandbox where available).

    Returns ``{"cells": {index: {"outputs", "count", "guard"}}, "status", "reason", "sandbox"}``;
    ``fast`` sets ``FAST = True`` after the parameters cell (smaller demonstration figures;
    the checks are the same). ``status`` is ``failed`` when the kernel died, a cell could not be interrupted or the
    whole notebook ran past ``notebook_timeout`` seconds (the cells that ran are kept).
    """
    import queue
    import threading

    use_bwrap = sandbox_available()
    workdir, course_root, before = "/tmp/work", PROJECT_DIR, None
    env = dict(os.environ)
    if not use_bwrap:
        import tempfile

        workdir = tempfile.mkdtemp(prefix="course-grade-")
        course_root, env[DATA_ENV_VAR] = private_course_copy(Path(workdir) / "course")
        before = course_file_hashes()
    command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(course_root)!r}); "
                                     "import course; course._sandbox_worker()"]
    if use_bwrap:
        command = sandbox_command(command, workdir)
    env.update(HOME=workdir if not use_bwrap else "/tmp/home", MPLCONFIGDIR="/tmp/mpl"
               if use_bwrap else workdir, JUPYTER_RUNTIME_DIR=f"{workdir}/.runtime", IPYTHONDIR=f"{workdir}/.ipython",
               JUPYTER_PLATFORM_DIRS="1", PYTHONUNBUFFERED="1")
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                            cwd=workdir if not use_bwrap else "/", start_new_session=True, text=True)
    job = {"notebook": nb, "cell_timeout": cell_timeout, "memory_mb": memory_mb, "workdir": workdir,
           "threads": threads, "fast": fast}
    lines = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
    except BrokenPipeError:
        pass
    result = {"cells": {}, "status": "failed", "reason": "the grading process ended without a result",
              "sandbox": use_bwrap}
    deadline = time.monotonic() + notebook_timeout
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                result["reason"] = f"the notebook ran past its limit of {notebook_timeout} s as a whole"
                break
            if line is None:
                break
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("kind") == "cell":
                result["cells"][int(message["index"])] = message
            elif message.get("kind") == "setup":
                result["setup_seconds"] = message["seconds"]
            elif message.get("kind") == "end":
                result["status"], result["reason"] = message["status"], message["reason"]
                break
    finally:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
        if log_path:
            log.close()
        if not use_bwrap:
            for path in Path(workdir).rglob("*"):  # the private copy is read-only
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)
            shutil.rmtree(workdir, ignore_errors=True)
            changed = changed_course_files(before)
            if changed:
                result["status"] = "failed"
                result["reason"] = (f"the course files changed while this submission ran ({', '.join(changed)}); "
                                    "restore them (git checkout) and grade with bubblewrap installed")
    return result


def private_course_copy(dest):
    """Without bubblewrap: a private, read-only copy of what a graded notebook imports
    (``cnn_utils.py``, ``cnnlib/``, ``course.py``, ``saved_models/``, the datasets), so that a submission
    that edits the helpers changes only its own copy. Returns ``(course_dir, data_dir)``."""
    dest.mkdir(parents=True)
    for name in RUNTIME_FILES:
        source = PROJECT_DIR / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, dest / name)
    data = dest / "data"
    data.mkdir()
    for name in DATASETS:                       # the file load_dataset would read, where it would find it
        found = next((p for p in cnn_utils.dataset_search_paths(name) if p.is_file()), None)
        if found is not None:
            shutil.copy2(found, data / found.name)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return dest, str(data)


# --- nbgrader preprocessors (configured in nbgrader_config.py) ------------

def _course_of(resources):
    """nbgrader's course directory, from the gradebook address nbgrader hands its preprocessors."""
    url = resources["nbgrader"]["db_url"]
    return Path(url.split("sqlite:///", 1)[1]).parent


def _grading_meta(nb):
    return nb.metadata.setdefault("course_grading", {"flags": [], "zero": {}})


def _normalise(source):
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


try:
    from nbgrader.preprocessors import NbGraderPreprocessor as _NbGraderPreprocessor
    from traitlets import Bool as _Bool, Integer as _Integer
except ImportError:  # pragma: no cover - grading needs nbgrader (requirements.txt)
    _NbGraderPreprocessor, _Integer = object, None


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
    """nbgrader's Execute step, isolated and guarded (see ``run_sandboxed``).

    Test cells that ran after tampering was found, or whose test cell was deleted or
    edited, get an error output (so nbgrader scores them 0 and the feedback says why);
    cells that never ran get one too. Writes ``grading.json`` (status, reason, flags)
    beside the autograded notebook.
    """

    if _Integer is not None:
        cell_timeout = _Integer(CELL_TIMEOUT, help="seconds per cell").tag(config=True)
        notebook_timeout = _Integer(NOTEBOOK_TIMEOUT, help="seconds per notebook").tag(config=True)
        memory_limit_mb = _Integer(MEMORY_LIMIT_MB, help="address space per notebook (MB)").tag(config=True)
        threads = _Integer(1, help="TensorFlow threads per notebook").tag(config=True)
        fast = _Bool(True, help="FAST = True: small demonstration figures (the checks are the same)").tag(config=True)

    def preprocess(self, nb, resources):
        import nbformat

        meta = _grading_meta(nb)
        flags, zero = list(meta.get("flags", [])), dict(meta.get("zero", {}))
        report_path = _report_path(_course_of(resources), resources["nbgrader"]["student"])
        report_path.parent.mkdir(parents=True, exist_ok=True)
        clean = nbformat.from_dict(nb)
        clean.metadata.pop("course_grading", None)
        result = run_sandboxed(clean, self.cell_timeout, self.notebook_timeout, self.memory_limit_mb,
                               log_path=report_path.with_suffix(".log"), threads=self.threads, fast=self.fast)
        tampered_since = None
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            done = result["cells"].get(index)
            cell.outputs = [nbformat.from_dict(o) for o in done["outputs"]] if done else []
            cell.execution_count = done.get("count") if done else None
            gmeta = cell.metadata.get("nbgrader", {})
            if not (gmeta.get("grade") and not gmeta.get("solution")):
                continue
            name = gmeta.get("grade_id")
            guard = done.get("guard") if done else None
            if done and guard is None:
                if not any("did not run" in f for f in flags):
                    flags.append(f"the grader's check before {name} did not run (the kernel no longer runs "
                                 "the grader's code, e.g. an input transformer)")
                tampered_since = tampered_since or name
            elif guard and guard["tampered"]:
                flags.append(f"before {name}: changed {', '.join(guard['tampered'])} (restored)")
                tampered_since = tampered_since or name
            if not done:
                _add_error(cell, "NotRun", f"Not run: {result['reason'] or 'grading stopped'}.")
            elif name in zero:
                _add_error(cell, "TestCellTampered", f"0 points: {zero[name]}; it was restored to check your code.")
            elif tampered_since:
                _add_error(cell, "TamperingDetected",
                           f"0 points: the submission changed how the tests run (first noticed before {tampered_since}); "
                           "course staff will review it.")
        report = {"status": result["status"], "reason": result["reason"], "flags": flags,
                  "sandbox": "bubblewrap" if result["sandbox"] else "none",
                  "setup_seconds": result.get("setup_seconds"),
                  "cell_seconds": round(sum(c.get("seconds", 0) for c in result["cells"].values()), 1)}
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


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

def _positive_int(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _memory_mb(text):
    """``--memory`` in MB: a graded notebook loads TensorFlow and a model, which needs about 2 GB."""
    import argparse

    value = _positive_int(text)
    if value < MIN_MEMORY_MB:
        raise argparse.ArgumentTypeError(
            f"is in MB and a graded notebook needs at least {MIN_MEMORY_MB} MB (TensorFlow and the model); "
            f"got {value} (for 6 GB write 6144)")
    return value


def _seed(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**32 - 1, got {value}")
    return value


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m course", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_run = sub.add_parser("run", help="execute the notebook series into build/ (ipynb + html)")
    p_run.add_argument("names", nargs="*", help="only notebooks whose file name contains one of these")
    p_run.add_argument("--fast", action="store_true", help="FAST=True: fewer epochs and samples, as the tests run")
    p_run.add_argument("--out", default=str(BUILD_DIR), help="output folder (default: build/)")
    p_pre = sub.add_parser("prefetch", help="download the datasets and VGG16 weights for offline use")
    p_pre.add_argument("--no-vgg16", action="store_true", help="skip the 528 MB VGG16 weights")
    p_train = sub.add_parser("train", help="retrain a course CNN (to build/models/ unless --replace)")
    p_train.add_argument("--dataset", choices=DATASETS, default="mnist")
    p_train.add_argument("--epochs", type=_positive_int, default=None,
                         help=f"default: {DEFAULT_EPOCHS['mnist']} (mnist), {DEFAULT_EPOCHS['fashion_mnist']} (fashion_mnist)")
    p_train.add_argument("--seed", type=_seed, default=DEFAULT_SEED)
    p_train.add_argument("--replace", action="store_true",
                         help="replace the shipped model in saved_models/, only if the new one is at least as accurate")
    p_rel = sub.add_parser("release", help="write the student version of the exercise notebook (nbgrader)")
    p_rel.add_argument("--course-dir", default=str(GRADING_DIR), help="nbgrader course directory (default: nbgrader/)")
    p_grade = sub.add_parser("grade", help="autograde FOLDER/<student_id>.ipynb: isolated, in parallel, with feedback")
    p_grade.add_argument("folder", help="a folder of submissions named <student_id>.ipynb, or nbgrader's "
                         "submitted/ folder after `nbgrader collect`")
    p_grade.add_argument("--jobs", type=_positive_int, default=os.cpu_count() or 1,
                         help="submissions graded at once (default: the number of cores)")
    p_grade.add_argument("--cell-timeout", type=_positive_int, default=CELL_TIMEOUT,
                         help=f"seconds per cell before it is interrupted (default {CELL_TIMEOUT})")
    p_grade.add_argument("--notebook-timeout", type=_positive_int, default=NOTEBOOK_TIMEOUT,
                         help=f"seconds per notebook before grading it stops (default {NOTEBOOK_TIMEOUT})")
    p_grade.add_argument("--memory", type=_memory_mb, default=MEMORY_LIMIT_MB,
                         help=f"address-space limit per notebook in MB (default {MEMORY_LIMIT_MB})")
    p_grade.add_argument("--course-dir", default=str(GRADING_DIR), help="nbgrader course directory (default: nbgrader/)")
    return parser


def main(argv=None):
    """Run one command; returns the exit status (0 success, 1 failure)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            run_notebooks(args.names, out_dir=args.out, parameters={"FAST": True} if args.fast else None)
        elif args.command == "prefetch":
            prefetch(vgg16=not args.no_vgg16)
        elif args.command == "train":
            info = train_and_save(args.dataset, epochs=args.epochs, seed=args.seed, replace=args.replace)
            print(f"{args.dataset}: test accuracy {info['test_accuracy']:.2%} after {info['epochs']} "
                  f"epochs ({info['train_seconds']:.0f} s); saved to {info['path']}")
            if args.replace and not info["replaced"]:
                print(f"The shipped model ({info['kept_shipped_accuracy']:.2%}) is more accurate and was "
                      f"kept in {cnn_utils.model_path(args.dataset, args.seed)}.")
        elif args.command == "release":
            released = release(args.course_dir)
            print(f"Student version (no solutions, no hidden tests): {STUDENT_NOTEBOOK}\n"
                  f"nbgrader's release copy: {released}")
        elif args.command == "grade":
            grade(args.folder, jobs=args.jobs, course_dir=args.course_dir, cell_timeout=args.cell_timeout,
                  notebook_timeout=args.notebook_timeout, memory_mb=args.memory)
    except (CourseError, cnn_utils.DataError, ValueError, TypeError, OSError) as err:
        # OSError: a folder that cannot be written (read-only, a file in the way, disk full ...)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
