"""nbgrader configuration for the course's exercise notebook (instructors/11_exercises.ipynb).

The course's command line runs nbgrader with this file (see README, "For instructors"):

    python -m course release         # student version -> notebooks/11_exercises.ipynb
    python -m course grade FOLDER    # FOLDER/<student_id>.ipynb: autograde, feedback, scores.csv

nbgrader's own commands read it too when run from this folder (`nbgrader autograde
11_exercises`, `nbgrader formgrader`, ...), and then grade in the same safe way: two of
nbgrader's steps are replaced by the course's (in course.py), nothing else changes.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from nbconvert.preprocessors import ClearMetadataPreprocessor, CSSHTMLHeaderPreprocessor  # noqa: E402
from nbgrader.preprocessors import (AssignLatePenalties, CheckCellMetadata, ClearOutput,  # noqa: E402
                                    DeduplicateIds, GetGrades, IgnorePattern, LimitOutput,
                                    OverwriteCells, OverwriteKernelspec, SaveAutoGrades)

import course  # noqa: E402

c = get_config()  # noqa: F821 (injected by traitlets when nbgrader loads this file)

# The course directory (source/, release/, submitted/, autograded/, feedback/, reports/,
# gradebook.db) is `nbgrader/` beside this file, git-ignored, wherever nbgrader is run from.
c.CourseDirectory.root = os.path.join(HERE, "nbgrader")

# Autograding. Sanitising restores deleted read-only cells and notes edited ones
# (course.RestoreCells) before nbgrader overwrites read-only cells and re-inserts the hidden
# tests. Executing is course.SandboxedExecute instead of nbgrader's Execute: its own process
# under bubblewrap (course files read-only, no network, private /tmp), a time limit per cell
# (interrupted, then grading goes on) and per notebook, a memory limit, and before every test
# cell a guard that restores pristine helpers and reports tampering.
c.Autograde.sanitize_preprocessors = [ClearOutput, DeduplicateIds, OverwriteKernelspec,
                                      course.RestoreCells, OverwriteCells, CheckCellMetadata]
c.Autograde.autograde_preprocessors = [course.SandboxedExecute, IgnorePattern, ClearMetadataPreprocessor,
                                       LimitOutput, SaveAutoGrades, AssignLatePenalties, CheckCellMetadata]
c.SandboxedExecute.cell_timeout = course.CELL_TIMEOUT        # seconds; nbgrader's default (30) is too short
c.SandboxedExecute.notebook_timeout = course.NOTEBOOK_TIMEOUT
c.SandboxedExecute.memory_limit_mb = course.MEMORY_LIMIT_MB
# nbgrader's own Execute settings, for `nbgrader validate` (it executes without the sandbox).
c.Execute.timeout = course.CELL_TIMEOUT
c.Execute.interrupt_on_timeout = True

# Feedback: each test's result and message, never hidden tests or tracebacks into them;
# written answers not graded yet read "to be graded".
c.GenerateFeedback.preprocessors = [GetGrades, course.FeedbackView, CSSHTMLHeaderPreprocessor]
c.HTMLExporter.extra_template_basedirs = [str(course.feedback_template_dir())]
c.HTMLExporter.template_name = "course_feedback"

# Where a student writes code or text, the student version says so.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
