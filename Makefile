# The course's commands. `make course` sets up and runs the notebook series,
# `make test` sets up and runs the tests. See README.md.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The tests read the datasets shipped beside the checkout (no network needed).
SHARED_DATA ?= $(abspath ../shared/data)

.PHONY: setup setup-dev course course-fast test prefetch lab train-models clean

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

## The main job: execute every notebook, in order, into build/ (ipynb + html).
course: setup
	$(BIN)/python -m cnn_utils run

## The same in fast mode (FAST=True), as the tests run it.
course-fast: setup
	$(BIN)/python -m cnn_utils run --fast

## The test suite.
test: setup-dev
	CNN_COURSE_DATA=$${CNN_COURSE_DATA:-$(SHARED_DATA)} $(BIN)/python -m pytest $(PYTEST_ARGS)

## Download datasets and VGG16 weights so the course runs offline.
prefetch: setup
	$(BIN)/python -m cnn_utils prefetch

lab: setup
	$(BIN)/jupyter lab notebooks/

## Rebuild the shipped models in saved_models/.
train-models: setup
	$(BIN)/python -m cnn_utils train --dataset mnist
	$(BIN)/python -m cnn_utils train --dataset fashion_mnist

clean:
	rm -rf build .pytest_cache
