"""The course's command line: ``python -m course --help``.

    run        execute the notebook series into build/ (ipynb + html)
    prefetch   download the datasets and the VGG16 weights for offline use
    train      retrain a course CNN (never replaces a shipped model by accident)
    grading    nbgrader glue for the exercise notebook (see README, for instructors)

Library functions here raise exceptions; only ``main`` turns them into one-line
messages and exit codes. The teaching helpers live in ``cnn_utils.py``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import cnn_utils
from cnn_utils import BUILD_DIR, DATASETS, DEFAULT_SEED, NOTEBOOKS_DIR, PROJECT_DIR

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
    ``replace`` it replaces ``saved_models/<dataset>_cnn.keras`` only when its test
    accuracy is at least the shipped one's; otherwise it stays in ``build/models/``
    and ``info["replaced"]`` is False. Returns the metadata dict written beside it.
    """
    if dataset not in DATASETS:
        raise CourseError(f"Unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}.")
    if epochs is None:
        epochs = DEFAULT_EPOCHS[dataset]
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
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
        "command": f"python -m course train --dataset {dataset} --replace",
        "history": {k: [round(float(v), 5) for v in vals] for k, vals in history.history.items()},
    }
    shipped = cnn_utils.model_path(dataset)
    info["replaced"] = False
    if replace:
        old = _shipped_accuracy(dataset)
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
    model.save(path)
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    info["path"] = str(path)
    return info


def _shipped_accuracy(dataset):
    meta = cnn_utils.model_path(dataset).with_suffix(".json")
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
            cnn_utils._read_npz(found)
            print(f"{name}: already in {found}")
            continue
        (x_train, y_train), (x_test, y_test) = cnn_utils._download_dataset(name)
        target = cnn_utils.DATA_DIR / f"{name}.npz"
        np.savez_compressed(target, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
        print(f"{name}: saved to {target}")
    if vgg16:
        code = (  # the same weights enum and torchvision cache as load_vgg16
            f"import sys; sys.path.insert(0, {str(PROJECT_DIR)!r}); import cnn_utils; "
            "cnn_utils._download_vgg16_state_dict(timeout=60); "
            "print('VGG16 ImageNet weights (VGG16_Weights.IMAGENET1K_V1): cached in', "
            "cnn_utils.vgg16_weights_path())"
        )
        if subprocess.run([sys.executable, "-c", code]).returncode != 0:
            raise CourseError("Downloading the VGG16 weights failed (see above). Check the "
                              "network and run `python -m course prefetch` again.")


# ---------------------------------------------------------------------------
# run: the notebook series (the tests run notebooks through the same function)
# ---------------------------------------------------------------------------

def notebook_paths(names=None):
    """The course notebooks in teaching order; ``names`` keeps those whose file name
    contains one of the given strings."""
    paths = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
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


def to_html(ipynb_path):
    """Render an executed notebook to HTML beside it (widget state included when stored)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(ipynb_path), as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    out = Path(ipynb_path).with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


# ---------------------------------------------------------------------------
# grading: nbgrader glue for the exercise notebook
# ---------------------------------------------------------------------------

#: nbgrader's course directory (git-ignored; see nbgrader_config.py).
GRADING_DIR = PROJECT_DIR / "nbgrader"
#: The assignment, and its one notebook, in nbgrader's layout.
EXERCISE_ASSIGNMENT = "09_exercises"


def grading_source(course_dir=None):
    """Copy the exercise notebook to nbgrader's ``source/<assignment>/``; return the path."""
    course = Path(course_dir) if course_dir else GRADING_DIR
    target = course / "source" / EXERCISE_ASSIGNMENT / f"{EXERCISE_ASSIGNMENT}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(NOTEBOOKS_DIR / f"{EXERCISE_ASSIGNMENT}.ipynb", target)
    return target


def grading_collect(folder, course_dir=None):
    """Put a folder of submissions ``<student_id>.ipynb`` into nbgrader's layout
    (``<course_dir>/submitted/<student_id>/<assignment>/``). Returns the ids, sorted."""
    import nbformat

    folder = Path(folder)
    files = sorted(folder.glob("*.ipynb"))
    if not files:
        raise CourseError(f"No submissions in {folder}: expected files named <student_id>.ipynb.")
    course = Path(course_dir) if course_dir else GRADING_DIR
    students = []
    for path in files:
        try:
            nbformat.read(str(path), as_version=4)
        except Exception as err:
            raise CourseError(f"{path} is not a readable notebook ({type(err).__name__}: {err}).") from None
        target = course / "submitted" / path.stem / EXERCISE_ASSIGNMENT / f"{EXERCISE_ASSIGNMENT}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        students.append(path.stem)
    return students


def grading_scores(course_dir=None):
    """Per-student, per-cell scores from nbgrader's gradebook (after ``nbgrader autograde``).

    Returns ``{student: {grade_id: {"auto", "manual", "max", "needs_manual", "by_hand"}}}``;
    ``by_hand`` marks written answers (markdown cells).
    """
    from nbgrader.api import Gradebook, MissingEntry

    course = Path(course_dir) if course_dir else GRADING_DIR
    db = course / "gradebook.db"
    if not db.is_file():
        raise CourseError(f"No gradebook at {db}: run `nbgrader generate_assignment` and "
                          "`nbgrader autograde` first (see README, for instructors).")
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


def print_scores(scores):
    """A table: autograded points per exercise (grade ids ``exN_...``), in total, and by hand."""
    exercises = sorted({gid.split("_")[0] for cells in scores.values()
                        for gid, g in cells.items() if not g["by_hand"]})
    print("student".ljust(20) + "".join(e.rjust(6) for e in exercises) + "   autograded   by hand")
    for student, cells in sorted(scores.items()):
        auto = {e: 0.0 for e in exercises}
        auto_max = hand = hand_max = 0.0
        to_grade = 0
        for gid, g in cells.items():
            if g["by_hand"]:
                hand_max += g["max"]
                hand += (g["manual"] if g["manual"] is not None else g["auto"] or 0.0)
                to_grade += g["needs_manual"]
            else:
                auto[gid.split("_")[0]] += g["auto"] or 0.0
                auto_max += g["max"]
        pending = f" ({to_grade} to grade)" if to_grade else ""
        print(student.ljust(20) + "".join(f"{auto[e]:6g}" for e in exercises)
              + f"   {sum(auto.values()):g} / {auto_max:g}".ljust(13) + f"   {hand:g} / {hand_max:g}{pending}")


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
    p_train.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p_train.add_argument("--replace", action="store_true",
                         help="replace the shipped model in saved_models/, only if the new one is at least as accurate")
    p_grade = sub.add_parser("grading", help="nbgrader glue for the exercise notebook (README: for instructors)")
    p_grade.add_argument("action", choices=["source", "collect", "scores"],
                         help="source: copy the notebook to nbgrader's source/; collect FOLDER: copy "
                              "<student_id>.ipynb files to submitted/; scores: print the gradebook")
    p_grade.add_argument("folder", nargs="?", help="for collect: a folder of <student_id>.ipynb files")
    p_grade.add_argument("--course-dir", default=str(GRADING_DIR), help="nbgrader course directory")
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
                      f"kept in {cnn_utils.model_path(args.dataset)}.")
        elif args.command == "grading":
            if args.action == "source":
                print(f"Wrote {grading_source(args.course_dir)}")
            elif args.action == "collect":
                if not args.folder:
                    parser.error("grading collect needs a FOLDER of <student_id>.ipynb files")
                students = grading_collect(args.folder, args.course_dir)
                print(f"Collected {len(students)} submission(s): {', '.join(students)}")
            else:
                print_scores(grading_scores(args.course_dir))
    except (CourseError, cnn_utils.DataError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
