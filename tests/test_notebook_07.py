"""Notebook 07 (VGG16 feature inversion, PyTorch) runs in fast mode with the offline fallback.

Never imports TensorFlow: the notebook runs in its own kernel, PyTorch only.
"""
import math
import re

import pytest

from conftest import count_images, find_number, notebook_text, run_notebook

pytest.importorskip("torch")
pytest.importorskip("torchvision")


@pytest.mark.notebook
def test_notebook_07_runs_fast_with_random_weights(tmp_path, monkeypatch):
    # An empty torchvision cache and no download: the fallback path, on any machine.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CNN_COURSE_OFFLINE", "1")
    nb = run_notebook("07_vgg16_feature_inversion.ipynb", tmp_path)
    text = notebook_text(nb)

    # says plainly that the weights are random, and how to get the real ones
    assert "RANDOM weights" in text and "RUNNING WITH RANDOM WEIGHTS" in text
    assert "make prefetch" in text and "python -m course prefetch" in text
    assert "these classes are arbitrary" in text
    # top-5 for the three sample photos
    for name in ("chelsea:", "astronaut:", "coffee:"):
        assert name in text
    assert "conv5_3" in text and "138,357,544" in text   # the architecture table
    # quality falls with depth and stays in range; no NaNs anywhere
    ssim_early, ssim_late = find_number(text, "SSIM relu1_2"), find_number(text, "SSIM relu5_3")
    psnr_early, psnr_late = find_number(text, "PSNR relu1_2"), find_number(text, "PSNR relu5_3")
    assert 0 <= ssim_late < ssim_early <= 1
    assert psnr_late < psnr_early and math.isfinite(psnr_early)
    assert not re.search(r"\bnan\b", text, flags=re.IGNORECASE)
    # predictions, filters, 2 feature-map figures + depth, 2 inversions, 5 depths, SSIM/PSNR, saliency
    assert count_images(nb) == 10
    # PyTorch only: the notebook and cnn_utils' PyTorch code never import TensorFlow
    assert "TensorFlow imported in this kernel: False" in text
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "tensorflow" not in code.replace('"tensorflow" in sys.modules', "")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
