"""How long does grading a class take, and what does one submission cost?

Builds a class of N submissions (default 100) from the instructors' version: blank, correct,
partly wrong (LRP and the FGSM success rate wrong) and slow (correct, plus a cell that
sleeps SLOW_SECONDS) in the proportions of MIX, and grades it with ``python -m course grade``
(sandboxed, every test judged by the grader, ``--jobs`` = cores). Reference in the same run:
nbgrader's own ``nbgrader autograde`` (stock Execute: no sandbox, the visible tests run in the
kernel, one nbgrader process per student) on a few blank and correct submissions, one after the other.
Prints wall time, seconds per submission (wall time x jobs / N: what one submission costs a
core), the ratio to the reference, the fixed cost of a blank notebook, and the projected wall
time for a class of 200 on this machine.

    CNN_COURSE_DATA=/path/to/datasets .venv/bin/python benchmarks/bench_grading.py [--n 100] [--jobs 2]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nbformat  # noqa: E402

import course  # noqa: E402

MIX = {"blank": 0.3, "correct": 0.3, "partly_wrong": 0.25, "slow": 0.15}
SLOW_SECONDS = 20
REFERENCE = ["blank", "correct"]  # graded twice each by stock nbgrader


def build_class(folder, n, release_nb, source_nb):
    ok = course.instructor_answers(source_nb)
    wrong = {**ok, "ex3_lrp": ok["ex3_lrp"].replace("R = a * (s @ W.T)", "R = s @ W.T"),
             "ex2_fgsm": ok["ex2_fgsm"].replace("labels[correct], eps)", "labels[correct], -eps)")}
    kinds = {"blank": {}, "correct": ok, "partly_wrong": wrong,
             "slow": {**ok, "ex1_tv": f"import time\ntime.sleep({SLOW_SECONDS})\n" + ok["ex1_tv"]}}
    counts = {k: round(share * n) for k, share in MIX.items()}
    counts["blank"] += n - sum(counts.values())
    made = []
    for kind, count in counts.items():
        for i in range(count):
            nbformat.write(course.fill_answers(release_nb, kinds[kind]), str(folder / f"{kind}_{i:03d}.ipynb"))
            made.append(kind)
    return counts


def stock_nbgrader(tmp, release_nb, source_nb):
    """Seconds per submission with nbgrader's own autograde (the reference)."""
    root = tmp / "stock"
    (root / "source" / course.EXERCISE_ASSIGNMENT).mkdir(parents=True)
    shutil.copyfile(course.EXERCISE_SOURCE, root / "source" / course.EXERCISE_ASSIGNMENT / f"{course.EXERCISE_ASSIGNMENT}.ipynb")
    (tmp / "nbgrader_config.py").write_text(
        f"c = get_config()\nc.CourseDirectory.root = {str(root)!r}\nc.Execute.timeout = 120\n")
    env = dict(os.environ, CNN_COURSE_DIR=str(course.PROJECT_DIR),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))

    def nbgrader(*args):
        subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=tmp, env=env, check=True, capture_output=True)

    nbgrader("generate_assignment", course.EXERCISE_ASSIGNMENT, "--force")
    ok = course.instructor_answers(source_nb)
    students = []
    for i, kind in enumerate(REFERENCE * 2):
        sid = f"{kind}_{i}"
        target = root / "submitted" / sid / course.EXERCISE_ASSIGNMENT / f"{course.EXERCISE_ASSIGNMENT}.ipynb"
        target.parent.mkdir(parents=True)
        nbformat.write(course.fill_answers(release_nb, ok if kind == "correct" else {}), str(target))
        students.append(sid)
    start = time.perf_counter()
    for sid in students:
        nbgrader("autograde", course.EXERCISE_ASSIGNMENT, f"--student={sid}", "--force")
        nbgrader("generate_feedback", course.EXERCISE_ASSIGNMENT, f"--student={sid}", "--force")
    return (time.perf_counter() - start) / len(students)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="submissions in the class (default 100)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-grading-"))
    try:
        course_dir = tmp / "course"
        student_copy = tmp / "student.ipynb"
        course.release(course_dir, student_copy=student_copy)
        release_nb = nbformat.read(str(student_copy), as_version=4)
        source_nb = nbformat.read(str(course.EXERCISE_SOURCE), as_version=4)
        inbox = tmp / "inbox"
        inbox.mkdir()
        counts = build_class(inbox, args.n, release_nb, source_nb)

        reference = stock_nbgrader(tmp, release_nb, source_nb)

        start = time.perf_counter()
        rows = course.grade(inbox, jobs=args.jobs, course_dir=course_dir, verbose=False)
        wall = time.perf_counter() - start
        reports = {p.stem: json.loads(p.read_text()) for p in (course_dir / "reports" / "grading").glob("*.json")}
        by_kind = {}
        for row in rows:
            by_kind.setdefault(row["student_id"].rsplit("_", 1)[0], []).append(float(row["autograded_total"]))
        per_submission = wall * args.jobs / args.n
        print(f"class of {args.n} ({', '.join(f'{v} {k}' for k, v in counts.items())}), {args.jobs} jobs, "
              f"{os.cpu_count()} cores")
        print(f"wall time {wall:.0f} s = {wall / args.n:.1f} s per submission; one submission costs a core "
              f"{per_submission:.1f} s")
        print(f"reference, stock nbgrader autograde + feedback, one at a time: {reference:.1f} s per submission")
        print(f"ratio (course grade wall time per submission / stock): {wall / args.n / reference:.2f}")
        print("points by kind: " + ", ".join(f"{k} {min(v):g}-{max(v):g}" for k, v in sorted(by_kind.items())))
        print("statuses: " + ", ".join(f"{s} {sum(r['status'] == s for r in rows)}" for s in course.STATUSES))
        own = sorted(r["own_work_seconds"] for r in reports.values() if r.get("own_work_seconds"))
        if own:
            print(f"own-work run (a second sandbox, exercise 4) where it ran ({len(own)}): median "
                  f"{own[len(own) // 2]:.1f} s")
        print(f"projected: a class of 200 in {200 * wall / args.n / 60:.0f} min on this machine")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
