# The course's commands. `make course` sets up and runs the notebook series,
# `make test` sets up and runs the tests. See README.md.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup setup-dev course course-fast test prefetch lab train-models release grade clean

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/python -m pip install -r requirements-dev.txt
	touch $@

## The main job: execute every notebook, in order, into build/ (ipynb + html): the handouts, the
## exercises in their student version; the instructors' version (solutions) apart in build/instructors/.
course: setup
	$(BIN)/python -m course run

## The same in fast mode (FAST=True), as the tests run it.
course-fast: setup
	$(BIN)/python -m course run --fast

## The test suite. Datasets: $$CNN_COURSE_DATA, then data/, then a download.
test: setup-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Download datasets and VGG16 weights so the course runs offline.
prefetch: setup
	$(BIN)/python -m course prefetch

lab: setup
	$(BIN)/jupyter lab notebooks/

## Rebuild the shipped models (each replaces saved_models/ only if at least as accurate).
train-models: setup
	$(BIN)/python -m course train --dataset mnist --replace
	$(BIN)/python -m course train --dataset fashion_mnist --replace

## Instructors: the student version of the exercise notebook (README, for instructors).
release: setup
	$(BIN)/python -m course release

## Instructors: grade a folder of <student_id>.ipynb submissions: make grade SUBMISSIONS=path/to/folder
grade: setup
	@test -n "$(SUBMISSIONS)" || (echo "usage: make grade SUBMISSIONS=path/to/folder" && exit 2)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m course grade "$(SUBMISSIONS)" $(GRADE_ARGS)

clean:
	rm -rf build .pytest_cache
