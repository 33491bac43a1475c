"""Notebook 07 (VGG16 feature inversion, PyTorch) in FAST mode with the offline fallback (random weights).

Never imports TensorFlow: the notebook runs in its own kernel, PyTorch only. The test reads the
values the notebook stores with ``cnn_utils.record``.
"""
import math

import pytest

from conftest import count_images, notebook_values, run_notebook

pytest.importorskip("torch")
pytest.importorskip("torchvision")


@pytest.mark.notebook
def test_notebook_07_runs_fast_with_random_weights(tmp_path, monkeypatch):
    # An empty torchvision cache and no download: the fallback path, on any machine.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CNN_COURSE_OFFLINE", "1")
    nb = run_notebook("07_vgg16_feature_inversion.ipynb", tmp_path)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    v = notebook_values(nb)

    assert v["pretrained"] is False and v["weights"] == "RANDOM"
    # the architecture: weights, head, receptive field
    assert v["total_weights"] == 138_357_544 and v["fc1_weights"] == 25088 * 4096 + 4096
    assert v["rf_conv5_3"] == 196
    # random weights: flat predictions, structureless filters, about half of every layer switched off
    assert all(p < 0.05 for _, p in v["top1"].values()) and set(v["top1"]) == {"chelsea", "astronaut", "coffee"}
    assert abs(v["filter_neighbour_correlation"]) < 0.1
    assert all(0.35 < z < 0.65 for z in v["zero_share"].values())
    # the readable loop shown in the notebook computes what cnn_utils.feature_inversion computes
    assert v["loop_vs_fast_max_diff"] < 1e-4
    # quality falls with depth and stays in range
    assert v["layers"] == ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"]
    ssim, psnr = v["ssim"], v["psnr"]
    assert 0 <= ssim[-1] < ssim[0] <= 1
    assert psnr[-1] < psnr[0] and all(math.isfinite(p) for p in psnr)
    assert all(0 <= loss < 0.5 for loss in v["final_feature_loss"].values())
    # both inversions of section 5 lower the feature loss, and the deep one keeps less of the photo
    assert v["feature_loss_drop"]["relu2_2"] > 2 and v["feature_loss_drop"]["relu5_3"] > 2
    assert v["ssim_late"] < v["ssim_early"]
    # section 8's interpretation leads with the weights it describes
    depth_text = [o["data"]["text/markdown"] for c in nb.cells if c.get("id") == "1f4712d2"
                  for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
    assert len(depth_text) == 1 and depth_text[0].startswith("**Interpretation.** With these RANDOM weights, ")
    # so does section 6's; "a lot" only when both feature losses fell by more than a factor of 10
    early_text = [o["data"]["text/markdown"] for c in nb.cells if c.get("id") == "d445e908"
                  for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
    assert len(early_text) == 1 and early_text[0].startswith("**Interpretation.** With these RANDOM weights, ")
    fell_far = min(v["feature_loss_drop"].values()) > 10
    assert ("relative feature loss a lot" in early_text[0]) == fell_far
    # predictions, filters, 2 feature-map figures + depth, 2 inversions, 5 depths, SSIM/PSNR, saliency
    assert count_images(nb) == 10
    # PyTorch only: the notebook and cnn_utils' PyTorch code never import TensorFlow
    assert v["tf_in_kernel"] is False
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "tensorflow" not in code.replace('"tensorflow" in sys.modules', "")
    assert "cnn_utils._" not in code   # only the public API


@pytest.mark.parametrize("name, label", [("07_vgg16_feature_inversion.ipynb", "WEIGHTS"), ("08_vgg16_photos.ipynb", "TAG")])
def test_every_vgg16_figure_says_which_weights(name, label):
    """Issue 24: a figure of an untrained VGG16 must not pass for a trained one. Every code cell
    that draws a figure puts the weights' label (RANDOM or ImageNet) into its title."""
    import nbformat

    from conftest import ROOT

    nb = nbformat.read(str(ROOT / "notebooks" / name), as_version=4)
    drawing = [c for c in nb.cells if c.cell_type == "code"
               and ("cnn_utils.plot_" in c.source or "plt.subplots(" in c.source)]
    assert drawing, name
    unlabelled = [c.source.splitlines()[0] for c in drawing if label not in c.source]
    assert not unlabelled, f"{name}: figures without the weights in their title: {unlabelled}"
    # 07: the figures the first reader found unlabelled (feature maps by depth, two channel grids)
    if name.startswith("07"):
        code = "\n".join(c.source for c in drawing)
        assert "plot_feature_maps_by_depth" in code and 'fig.suptitle(f"Feature maps' in code
        assert code.count('layer_name=f"relu') == 2 and code.count("{WEIGHTS} weights)\")") >= 2
