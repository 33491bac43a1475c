"""nbgrader configuration for the course's exercise notebook (instructors/11_exercises.ipynb).

The course's command line runs nbgrader with this file (see README, "For instructors"):

    python -m course release         # student version -> notebooks/11_exercises.ipynb
    python -m course grade FOLDER    # FOLDER/<student_id>.ipynb: autograde, feedback, scores.csv

nbgrader's own commands read it too when run from this folder (`nbgrader autograde
11_exercises`, `nbgrader formgrader`, ...), and then grade in the same way: two of
nbgrader's steps are replaced by the course's (cnnlib/grading.py), nothing else changes.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from nbconvert.preprocessors import ClearMetadataPreprocessor, CSSHTMLHeaderPreprocessor  # noqa: E402
from nbgrader.preprocessors import (AssignLatePenalties, CheckCellMetadata, ClearOutput,  # noqa: E402
                                    DeduplicateIds, GetGrades, IgnorePattern, LimitOutput,
                                    OverwriteCells, OverwriteKernelspec, SaveAutoGrades)

from cnnlib import grading  # noqa: E402

c = get_config()  # noqa: F821 (injected by traitlets when nbgrader loads this file)

# The course directory (source/, release/, submitted/, autograded/, feedback/, reports/,
# gradebook.db) is `nbgrader/` beside this file, git-ignored, wherever nbgrader is run from.
c.CourseDirectory.root = os.path.join(HERE, "nbgrader")

# Autograding. Sanitising restores deleted read-only cells and notes edited ones
# (grading.RestoreCells) before nbgrader overwrites read-only cells. Executing is
# grading.SandboxedExecute instead of nbgrader's Execute: the submission runs under bubblewrap
# (course files read-only, no network, a size-limited /tmp, limits on time, memory, processes and
# output), the sandbox calls the student's functions with the grader's inputs and returns only
# data, and the grader's own process decides every test cell (instructors/grading_tests.py).
c.Autograde.sanitize_preprocessors = [ClearOutput, DeduplicateIds, OverwriteKernelspec,
                                      grading.RestoreCells, OverwriteCells, CheckCellMetadata]
c.Autograde.autograde_preprocessors = [grading.SandboxedExecute, IgnorePattern, ClearMetadataPreprocessor,
                                       LimitOutput, SaveAutoGrades, AssignLatePenalties, CheckCellMetadata]
c.SandboxedExecute.cell_timeout = grading.CELL_TIMEOUT        # seconds; nbgrader's default (30) is too short
c.SandboxedExecute.notebook_timeout = grading.NOTEBOOK_TIMEOUT
c.SandboxedExecute.memory_limit_mb = grading.MEMORY_LIMIT_MB
# nbgrader's own Execute settings, for `nbgrader validate` (it executes without the sandbox).
c.Execute.timeout = grading.CELL_TIMEOUT
c.Execute.interrupt_on_timeout = True

# Feedback: each test's result and message, never hidden tests or tracebacks into them;
# written answers not graded yet read "to be graded".
c.GenerateFeedback.preprocessors = [GetGrades, grading.FeedbackView, CSSHTMLHeaderPreprocessor]
c.HTMLExporter.extra_template_basedirs = [str(grading.feedback_template_dir())]
c.HTMLExporter.template_name = "course_feedback"

# Where a student writes code or text, the student version says so.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
