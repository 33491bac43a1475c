"""The readable code a notebook shows equals the module's fast functions.

The reference functions are not copied here: they are read from the notebook's cells
tagged ``reference-...`` and executed, so the code students read and the code tested
cannot drift apart.
"""
import json

import numpy as np
import pytest

import cnn_utils as cu
from conftest import ROOT


def notebook_reference(notebook, tag):
    """Execute the code cell of ``notebooks/<notebook>`` tagged ``tag``; return its namespace."""
    nb = json.loads((ROOT / "notebooks" / notebook).read_text())
    cells = [c for c in nb["cells"] if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1 and cells[0]["cell_type"] == "code", f"{notebook}: expected one code cell tagged {tag!r}"
    namespace = {"cnn_utils": cu, "np": np}
    exec(compile("".join(cells[0]["source"]), f"{notebook}[{tag}]", "exec"), namespace)
    return namespace


NB04 = "04_saliency_and_cam.ipynb"


@pytest.fixture(scope="module")
def images_and_classes(mnist, mnist_model):
    (_, _), (x_test, _) = mnist
    x = x_test[:12]
    # the predicted class for some images, another class for the others
    classes = np.argmax(cu.predict_logits(mnist_model, x), axis=1)
    classes[::3] = (classes[::3] + 3) % 10
    return x, classes.astype(np.int32)


def test_plain_saliency_equals_saliency_map(mnist_model, images_and_classes):
    plain_saliency = notebook_reference(NB04, "reference-saliency")["plain_saliency"]
    x, classes = images_and_classes
    plain = plain_saliency(mnist_model, x, classes)
    assert plain.shape == x.shape[:3]
    fast = cu.saliency_map(mnist_model, x, classes, normalize=False)
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-6 * plain.max())
    np.testing.assert_allclose(cu.saliency_map(mnist_model, x, classes), cu.normalize_maps(plain), atol=1e-5)


@pytest.mark.parametrize("layer", ["conv3", "conv2"])
def test_plain_grad_cam_equals_grad_cam(mnist_model, images_and_classes, layer):
    plain_grad_cam = notebook_reference(NB04, "reference-grad-cam")["plain_grad_cam"]
    x, classes = images_and_classes
    cam = plain_grad_cam(mnist_model, x, classes, layer)
    assert cam.shape == (len(x),) + tuple(mnist_model.get_layer(layer).output.shape[1:3])
    r_y, r_x = cu.cam_upsampling_matrices(mnist_model, layer, x.shape[1:3])
    expected = np.einsum("ij,njk,lk->nil", r_y, cam, r_x)
    fast = cu.grad_cam(mnist_model, x, classes, layer=layer, normalize=False)
    np.testing.assert_allclose(fast, expected, rtol=1e-4, atol=1e-5 * expected.max())
    unseen = ~cu.receptive_fields(mnist_model, layer).seen
    assert unseen.sum() == {"conv3": 28 * 28 - 26 * 26, "conv2": 0}[layer]
    assert np.all(fast[:, unseen] == 0)                                   # seen by no unit: 0

