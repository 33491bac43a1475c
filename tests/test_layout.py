"""The layout ARCHITECTURE.md describes: cnn_utils.py on top of cnnlib/, imports one way."""
import ast
import re
from pathlib import Path

import pytest

import cnn_utils

ROOT = Path(__file__).resolve().parents[1]
#: cnnlib's modules in the order data flows (cnn_utils' docstring and ARCHITECTURE.md give it).
ORDER = ["frameworks", "checks", "data", "keras_layers", "models", "cache", "photos", "images", "vgg16",
         "keras_engine", "torch_engine", "activations", "geometry", "attribution", "guided", "evaluation", "concepts", "feature_visualization",
         "embeddings", "plotting", "plotting_vgg", "widgets", "exercise_checks"]


def _imported_modules(path):
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("cnn_utils", "cnnlib"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in ("cnn_utils", "cnnlib")}
    return found


def test_every_module_is_in_the_documented_order():
    on_disk = sorted(p.stem for p in (ROOT / "cnnlib").glob("*.py") if p.stem != "__init__")
    documented = set(ORDER)
    extra = [m for m in on_disk if m not in documented]
    # modules that are not part of the teaching helpers (grading, evaluation, ...) may sit beside them,
    # but each must still import only downwards (checked below)
    assert set(ORDER) <= set(on_disk), f"missing modules: {sorted(documented - set(on_disk))}"
    text = (ROOT / "ARCHITECTURE.md").read_text() + cnn_utils.__doc__
    for name in ORDER + extra:
        assert f"`{name}`" in text or f"cnnlib/{name}.py" in text, f"cnnlib/{name}.py is not described"


@pytest.mark.parametrize("name", ORDER)
def test_imports_run_one_way(name):
    imported = _imported_modules(ROOT / "cnnlib" / f"{name}.py")
    assert "cnn_utils" not in imported, f"cnnlib/{name}.py imports cnn_utils (it must not: imports run one way)"
    upward = [m for m in imported if m in ORDER and ORDER.index(m) >= ORDER.index(name)]
    assert not upward, f"cnnlib/{name}.py imports {upward}, which come after it in the order data flows"


def test_module_sizes():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "cnnlib").glob("*.py")}
    assert len((ROOT / "cnn_utils.py").read_text().splitlines()) <= 1800
    assert max(sizes.values()) <= 1000, sizes


def test_grad_cam_reaches_its_formula_in_one_call():
    src = (ROOT / "cnn_utils.py").read_text()
    body = re.search(r"\ndef grad_cam\(.*?\n(?=\ndef )", src, re.S).group(0)
    assert "grad_cam_weights" in body and "\ndef grad_cam_weights(" in src and "\ndef _cam(" in src


def test_settings_take_effect_where_they_are_read(monkeypatch):
    import cnnlib.attribution
    import cnnlib.images
    import cnnlib.photos

    monkeypatch.setattr(cnn_utils, "MAX_PHOTO_PIXELS", 1234)
    monkeypatch.setattr(cnn_utils, "MAX_IMAGE_PIXELS", 4321)
    monkeypatch.setattr(cnn_utils, "ATTRIBUTION_MEMORY_BUDGET", 99)
    assert (cnnlib.photos.MAX_PHOTO_PIXELS, cnnlib.images.MAX_IMAGE_PIXELS,
            cnnlib.attribution.ATTRIBUTION_MEMORY_BUDGET) == (1234, 4321, 99)
    assert cnn_utils.MAX_PHOTO_PIXELS == 1234


def test_settings_restored_after_monkeypatch():
    import cnnlib.attribution

    assert cnnlib.attribution.ATTRIBUTION_MEMORY_BUDGET == cnn_utils.ATTRIBUTION_MEMORY_BUDGET != 99
