"""The course's command line: ``python -m course --help``.

    run        execute the notebook series into build/ (ipynb + html)
    prefetch   download the datasets and the VGG16 weights for offline use
    train      retrain a course CNN (never replaces a shipped model by accident)
    release    write the student version of the exercise notebook (nbgrader)
    grade      autograde a folder of submissions, isolated and in parallel (README, for instructors)

Library functions here raise exceptions; only ``main`` turns them into one-line
messages and exit codes. The teaching helpers live in ``cnn_utils.py``, the grading
machinery in ``cnnlib/grading.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import cnnlib.data
import cnnlib.vgg16
import cnn_utils
from cnn_utils import BUILD_DIR, DATASETS, DEFAULT_SEED, NOTEBOOKS_DIR, PROJECT_DIR
from cnnlib.grading import (CELL_TIMEOUT, EXERCISE_ASSIGNMENT, EXERCISE_SOURCE, GRADING_DIR,  # noqa: F401
                            MEMORY_LIMIT_MB, MIN_MEMORY_MB, NOTEBOOK_TIMEOUT, STATUSES, STUDENT_NOTEBOOK,
                            CourseError, collect, fill_answers, grade, instructor_answers, release)

DEFAULT_EPOCHS = {"mnist": 4, "fashion_mnist": 15}


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

#: The instructors' executed exercise notebook goes into this folder of the output folder, under this
#: name and behind ``INSTRUCTOR_BANNER``: never beside the handouts.
INSTRUCTOR_DIR_NAME = "instructors"
INSTRUCTOR_NOTEBOOK_NAME = f"{EXERCISE_ASSIGNMENT}_INSTRUCTOR.ipynb"
INSTRUCTOR_BANNER = "INSTRUCTOR VERSION — contains the reference solutions; do not hand out"
#: What an exercise left to the student raises (nbgrader's stub); the handout leaves those cells unrun.
ANSWER_MISSING = "NotImplementedError"


def notebook_paths(names=None):
    """The course notebooks in teaching order, as they are handed out: the exercises in their student
    version (``notebooks/11_exercises.ipynb``, no solutions). ``names`` keeps those whose file name
    contains one of the given strings. ``run_notebooks`` adds the instructors' version apart."""
    paths = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if names:
        chosen = [p for p in paths if any(n in p.name for n in names)]
        if not chosen:
            raise CourseError(f"No notebook matches {', '.join(names)}; notebooks: "
                              f"{', '.join(p.name for p in paths)}.")
        paths = chosen
    return paths


def instructor_output(out_dir):
    """Where ``run`` writes the instructors' executed exercise notebook: ``out_dir/instructors/``."""
    return Path(out_dir) / INSTRUCTOR_DIR_NAME / INSTRUCTOR_NOTEBOOK_NAME


def _failed(path, cell, ename, evalue, out_path):
    """The one message for a notebook that stopped on an error: which notebook, which cell, where it is."""
    return CourseError(f"{path.name} failed in cell {cell} ({ename}: {evalue}). The partly executed notebook "
                       f"is at {out_path}.")


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
        raise _failed(path, err.exec_count, err.ename, err.evalue, out_path) from None
    return out_path


def execute_student_version(path, out_path, parameters=None, kernel_name=None):
    """Execute the student version of the exercises as a handout, in a fresh kernel (cwd ``notebooks/``).

    Every cell that needs no answer runs: the setup, the given code, the worked ideas. A cell that
    needs one raises ``NotImplementedError`` (the stubs, and the checks and figures that call them):
    it is left as the student finds it, without output, rather than as a page of tracebacks. Any
    other error stops the run and names the cell, as in every notebook. A note under the title says so.
    """
    import nbformat
    import papermill as pm
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path, out_path = Path(path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # the parameters go in as papermill injects them into every notebook (and mark the output as run's)
    pm.execute_notebook(str(path), str(out_path), parameters=parameters or {}, prepare_only=True,
                        kernel_name=kernel_name, progress_bar=False)
    nb = nbformat.read(str(out_path), as_version=4)
    client = NotebookClient(nb, kernel_name=kernel_name or "", allow_error_names=[ANSWER_MISSING],
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    try:
        client.execute()
    except CellExecutionError as err:
        nbformat.write(nb, str(out_path))
        failed = next((c.execution_count for c in nb.cells if c.cell_type == "code" and any(
            o.get("output_type") == "error" and o.get("ename") != ANSWER_MISSING for o in c.get("outputs", []))), "?")
        raise _failed(path, failed, err.ename, err.evalue, out_path) from None
    for cell in nb.cells:
        if cell.cell_type == "code" and any(o.get("output_type") == "error" and o.get("ename") == ANSWER_MISSING
                                            for o in cell.outputs):
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
    note = nbformat.v4.new_markdown_cell(
        f"*Student version, as handed out. The cells that need your answers (the exercises, and the checks "
        f"and figures that use them) have no output here: they run once you have written your code. Work in "
        f"`notebooks/{path.name}`.*")
    note.metadata["course"] = "handout-note"
    nb.cells.insert(1, note)
    nbformat.write(nb, str(out_path))
    return out_path


def mark_instructor_version(ipynb_path):
    """Put ``INSTRUCTOR_BANNER`` at the top of an executed instructors' notebook (its first cell, and the
    HTML page's title)."""
    import nbformat

    nb = nbformat.read(str(ipynb_path), as_version=4)
    banner = nbformat.v4.new_markdown_cell(
        '<div style="background:#b00020;color:#ffffff;padding:12px 18px;border-radius:6px">\n'
        f'<h1 style="color:#ffffff;margin:0">{INSTRUCTOR_BANNER}</h1>\n'
        '<p style="color:#ffffff;margin:6px 0 0 0">The exercises executed from <code>instructors/'
        f'{EXERCISE_SOURCE.name}</code>, every exercise answered with its model solution. The handout for '
        f'students is <code>{EXERCISE_SOURCE.name}</code> (and <code>.html</code>) one folder up: the student '
        'version, without solutions.</p>\n</div>')
    banner.metadata["course"] = "instructor-banner"
    nb.cells.insert(0, banner)
    nb.metadata["title"] = f"{INSTRUCTOR_BANNER} · {EXERCISE_ASSIGNMENT}"
    nbformat.write(nb, str(ipynb_path))
    return ipynb_path


def run_notebooks(names=None, out_dir=BUILD_DIR, parameters=None, html=True, kernel_name=None):
    """Execute the notebook series in order, each in a fresh kernel, into ``out_dir``
    (executed ``.ipynb`` and, with ``html``, an ``.html`` rendering of each): only what can be
    handed out. The exercises go there in their student version (``execute_student_version``).
    Where ``instructors/`` exists, the instructors' version runs too, into its own folder
    (``instructor_output``: ``out_dir/instructors/11_exercises_INSTRUCTOR.ipynb`` and ``.html``)
    under a banner. Returns ``[(notebook name, seconds), ...]``."""
    paths = notebook_paths(names)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    instructor_path = instructor_output(out_dir)
    jobs = []
    for path in paths:
        jobs.append((path, out_dir / path.name))
        if path.name == EXERCISE_SOURCE.name and EXERCISE_SOURCE.is_file():
            jobs.append((EXERCISE_SOURCE, instructor_path))
    # before anything runs: never write over a source or someone's own file
    for source, out_path in jobs:
        if out_path.parent != out_dir and out_path.parent.exists() and not out_path.parent.is_dir():
            raise CourseError(f"{out_path.parent} is a file; `run` puts the instructors' version of the exercises "
                              "in a folder of that name. Nothing was written: move the file away, or choose "
                              "another folder with --out.")
        _check_output(source, out_path)
    for stale in _stale_instructor_version(out_dir):
        stale.unlink()
        print(f"Removed {stale}: an earlier run's instructors' version (with the solutions) beside the handouts.",
              flush=True)
    timings = []
    for i, (path, out_path) in enumerate(jobs, 1):
        instructors = out_path == instructor_path
        label = f"{path.name} (the instructors' version, with the solutions)" if instructors else path.name
        print(f"[{i}/{len(jobs)}] {label}", flush=True)
        start = time.perf_counter()
        if path.name == EXERCISE_SOURCE.name and not instructors:
            execute_student_version(path, out_path, parameters, kernel_name=kernel_name)
        else:
            execute_notebook(path, out_path, parameters, kernel_name=kernel_name)
        if instructors:
            mark_instructor_version(out_path)
        seconds = time.perf_counter() - start
        timings.append((out_path.relative_to(out_dir).as_posix(), seconds))
        if html:
            to_html(out_path)
        print(f"    done in {seconds:.0f} s -> {out_path}", flush=True)
    print(f"All {len(timings)} notebooks ran in {sum(s for _, s in timings):.0f} s. Output in {out_dir}/")
    if any(out_path == instructor_path for _, out_path in jobs):
        print(f"The handouts are the files in {out_dir}/; {instructor_path.parent}/ holds the "
              "instructors' version of the exercises, with the solutions: do not hand it out.")
    return timings


def _stale_instructor_version(out_dir):
    """An earlier run's instructors' exercise notebook (and its HTML) beside the handouts in ``out_dir``:
    runs before the handout split executed ``instructors/11_exercises.ipynb`` into ``out_dir/11_exercises.*``."""
    ipynb = Path(out_dir) / EXERCISE_SOURCE.name
    if not _written_by_run(ipynb):
        return []
    try:
        source = json.loads(ipynb.read_text(encoding="utf-8"))["metadata"]["papermill"]["input_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if Path(str(source)).parent.name != EXERCISE_SOURCE.parent.name:
        return []
    return [p for p in (ipynb, ipynb.with_suffix(".html")) if p.exists()]


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
    body, _ = HTMLExporter().from_notebook_node(nb, resources={"metadata": {"name": Path(ipynb_path).stem}})
    out = Path(ipynb_path).with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


# ---------------------------------------------------------------------------
# release and grade: the exercise notebook with nbgrader (the machinery: cnnlib/grading.py)
# ---------------------------------------------------------------------------

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
    p_run.add_argument("--out", default=str(BUILD_DIR),
                       help="output folder (default: build/); the instructors' version of the exercises, with "
                            "the solutions, goes to its subfolder instructors/")
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
