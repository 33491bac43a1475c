"""Shared test fixtures.

Import order matters with the pinned versions: importing torchvision after
TensorFlow crashes the process (see README, known trap). pytest collects every test file
into one process, so torch and torchvision are imported here first, before any
test module can import TensorFlow.
"""
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:  # torch before tensorflow, never the other way round
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:  # pragma: no cover - the PyTorch tests skip themselves
    pass


def pytest_configure(config):
    # The notebooks' disk cache (cnn_utils.cached) goes to a fresh folder per test run: a test never
    # reads what an earlier run (or `make course`) computed, and never fills the course's build/cache.
    import tempfile

    os.environ["CNN_COURSE_CACHE"] = tempfile.mkdtemp(prefix="cnn-course-test-cache-")
    config.addinivalue_line("markers", "notebook: executes a course notebook")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(scope="session")
def notebook_04_mnist(tmp_path_factory):
    """Notebook 04 executed once per test run (FAST, MNIST): its own test and notebook 13's share it."""
    return run_notebook("04_saliency_and_cam.ipynb", tmp_path_factory.mktemp("nb04"))


@pytest.fixture(scope="session")
def mnist():
    import cnn_utils

    return cnn_utils.load_dataset("mnist")


@pytest.fixture(scope="session")
def mnist_model():
    import cnn_utils

    return cnn_utils.load_model("mnist")


def run_notebook(name, tmp_path, **parameters):
    """Execute ``notebooks/<name>`` with FAST=True through the runner of ``make course``.

    Returns the executed notebook (nbformat node). Fails with the failing cell.
    """
    import nbformat

    import course

    src = ROOT / "notebooks" / name
    assert src.is_file(), f"missing notebook {src}"
    out = course.execute_notebook(src, Path(tmp_path) / name, {"FAST": True, **parameters},
                                  progress_bar=False, kernel_name="python3")
    return nbformat.read(str(out), as_version=4)


def stored_notebook(name):
    """``notebooks/<name>`` as stored, checked for the storage conventions: one cell tagged
    ``parameters`` with ``FAST = False``, no outputs or execution counts, discussion questions.

    Returns ``(nb, markdown, code)``: the notebook as a dict and the joined source of its
    markdown cells and of its code cells.
    """
    import json

    nb = json.loads((ROOT / "notebooks" / name).read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name}: {len(tagged)} cells tagged 'parameters', expected 1"
    assert "FAST = False" in "".join(tagged[0]["source"]), f"{name}: the parameters cell must set FAST = False"
    stored = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
              and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not stored, f"{name}: code cells {stored} are stored with outputs or execution counts"

    def source(kind):
        return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind)

    markdown, code = source("markdown"), source("code")
    assert "Discussion questions" in markdown, f"{name}: no 'Discussion questions' section"
    return nb, markdown, code


#: The explorer's attribution methods, in the order of its menu.
EXPLORER_METHODS = ("Saliency", "SmoothGrad", "Integrated Gradients", "Grad-CAM", "Grad-CAM++", "Score-CAM")


def explorer_reference(model, x, method, class_index, layer, samples=32):
    """What the explorer must show for ``method``, written out with the public attribution
    functions (not the explorer's own table): maps (N, H, W) in [0, 1]."""
    import numpy as np

    import cnn_utils as cu

    if method == "Saliency":
        return cu.saliency_map(model, x, class_index=class_index)
    if method == "SmoothGrad":
        return cu.smoothgrad(model, x, class_index=class_index, samples=samples, seed=0)
    if method == "Integrated Gradients":   # |IG| summed over colour channels, min-max scaled
        ig = cu.integrated_gradients(model, x, class_index=class_index, steps=samples)
        return cu.normalize_maps(np.abs(ig).sum(axis=-1))
    cam = {"Grad-CAM": cu.grad_cam, "Grad-CAM++": cu.grad_cam_plus_plus, "Score-CAM": cu.score_cam}[method]
    return cam(model, x, class_index=class_index, layer=layer)


def notebook_text(nb):
    """All text output of an executed notebook (stdout and text/plain results)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


def notebook_values(nb):
    """Every value the notebook stored with ``cnn_utils.record`` (later ones win)."""
    import cnn_utils

    values = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            values.update(out.get("data", {}).get(cnn_utils.VALUES_MIMETYPE, {}))
    return values


def count_images(nb):
    """Number of PNG figures in an executed notebook's outputs."""
    return sum(
        1 for cell in nb.cells for out in cell.get("outputs", [])
        if "data" in out and "image/png" in out["data"]
    )


def find_number(text, label):
    """The number printed after ``label`` (e.g. 'Test accuracy: 99.1 %')."""
    m = re.search(re.escape(label) + r"\s*[:=]?\s*(-?[0-9.]+(?:e-?\d+)?)", text)
    assert m, f"{label!r} not found in the notebook output"
    return float(m.group(1))
