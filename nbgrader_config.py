"""nbgrader configuration for the course's exercise notebook (notebooks/09_exercises.ipynb).

Run nbgrader from this folder (it reads this file from the working directory):

    python -m course grading source            # notebooks/09_exercises.ipynb -> nbgrader/source/09_exercises/
    nbgrader generate_assignment 09_exercises --force   # student version -> nbgrader/release/09_exercises/
    nbgrader autograde 09_exercises --force       # grades nbgrader/submitted/<student>/09_exercises/
    nbgrader generate_feedback 09_exercises --force

See README.md, "For instructors".
"""
import os

c = get_config()  # noqa: F821 (injected by traitlets when nbgrader loads this file)

# The course directory (source/, release/, submitted/, autograded/, feedback/,
# gradebook.db) is `nbgrader/` beside this file, git-ignored, wherever nbgrader is run from.
c.CourseDirectory.root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbgrader")

# Per-cell execution limit when validating and autograding. nbgrader's default of
# 30 s is too short for a slow student laptop or a busy grading machine running the
# optimisation cells (each takes a few seconds on a 2-core CPU); a cell that exceeds
# the limit, such as an endless loop, is interrupted, recorded as an error (no points
# for the cells that need it), and grading goes on with the next cell.
c.Execute.timeout = 120
c.Execute.interrupt_on_timeout = True

# Where a student writes code or text, the student version says so.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
