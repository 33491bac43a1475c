"""Every notebook over a grid of the settings its parameters cell invites (issue 24).

A notebook may not raise for a value it invites: other seeds, the other dataset, every cue
class up to the edge values, another VGG16 layer, the student's own photos, one epoch. The
other notebook tests run each notebook with its defaults on both datasets; this grid adds the
settings they leave out, each once, without the full cross-product (fast mode). Measured for
the first 25 cases: 10 CPU minutes (user + sys, kernels included); 39 minutes of wall time on
the shared 2-core machine at a load average of 12-15, where the kernels got a quarter of a core.
A value outside the invited range must be refused before any work, by a ValueError that says
what to do.

The grid runs in fast mode: fewer images and steps than `make course`, so it catches a notebook
that breaks on a setting, not every number that only full mode produces.
"""
import numpy as np
import pytest

import course
from conftest import ROOT, notebook_values, run_notebook

#: (notebook, parameters, what the run must record). "{tmp}", "{photo}" and "{gray_photo}" are
#: replaced by the test's folder and by two photos written there (a JPEG and a grey PNG, not square).
GRID = [
    # 00: the cue on another class, both datasets, edge classes (0 and 9) and the classes that
    # once stopped the notebook on its own claims (0 and 1 on MNIST, 0 and 3 on Fashion-MNIST)
    ("00_why_interpret.ipynb", {"CUE_CLASS": 0}, {"dataset": "mnist"}),
    ("00_why_interpret.ipynb", {"CUE_CLASS": 1, "SEED": 2024}, {"dataset": "mnist"}),
    ("00_why_interpret.ipynb", {"CUE_CLASS": 9, "SEED": 7}, {"dataset": "mnist"}),
    ("00_why_interpret.ipynb", {"DATASET": "fashion_mnist", "CUE_CLASS": 0}, {"dataset": "fashion_mnist"}),
    ("00_why_interpret.ipynb", {"DATASET": "fashion_mnist", "CUE_CLASS": 3, "SEED": 2024}, {"dataset": "fashion_mnist"}),
    # 01: a new model with two epochs (a curve to read), another seed and dataset; EPOCHS without
    # TRAIN_NEW_MODEL (the shipped model's history is read)
    ("01_train_mnist_cnn.ipynb", {"DATASET": "fashion_mnist", "TRAIN_NEW_MODEL": True, "EPOCHS": 2, "SEED": 2024,
                                  "MODEL_OUT_DIR": "{tmp}"}, {"epochs": 2}),
    ("01_train_mnist_cnn.ipynb", {"TRAIN_NEW_MODEL": True, "EPOCHS": 1, "SEED": 7, "MODEL_OUT_DIR": "{tmp}"},
     {"epochs": 1, "train_loss_falls": False}),
    ("01_train_mnist_cnn.ipynb", {"EPOCHS": 1, "SEED": 2024}, {}),
    # 02-06, 10: another seed on each dataset
    ("02_layer_activations.ipynb", {"DATASET": "fashion_mnist", "SEED": 2024}, {}),
    ("03_filters_and_feature_visualization.ipynb", {"SEED": 2024}, {}),
    ("03_filters_and_feature_visualization.ipynb", {"DATASET": "fashion_mnist", "SEED": 7}, {}),
    ("04_saliency_and_cam.ipynb", {"SEED": 2024}, {}),
    ("04_saliency_and_cam.ipynb", {"DATASET": "fashion_mnist", "SEED": 2024}, {}),
    ("05_prediction_confidence.ipynb", {"DATASET": "fashion_mnist", "SEED": 2024}, {}),
    ("06_feature_space.ipynb", {"DATASET": "fashion_mnist", "SEED": 2024}, {}),
    ("09_evaluating_explanations.ipynb", {"DATASET": "fashion_mnist", "SEED": 3, "CUE_CLASS": 0,
                                          "CUES": ["left_edge", "stripes", "corner"], "VGG_PRETRAINED": False}, {}),
    ("10_concepts.ipynb", {"DATASET": "fashion_mnist", "SEED": 2024, "LAYERS": ["conv2", "dense1"], "CONCEPTS": ["slanted", "closed loop"],
                           "N_RANDOM": 10, "NMF_LAYER": "pool2", "NMF_FACTORS": 4, "BLOCKS_LAYER": "conv2",
                           "IMAGE_INDEX": 9, "ABLATION_MODE": "mean", "PRETRAINED": False}, {}),
    ("12_live_explorer.ipynb", {"DATASET": "fashion_mnist", "SEED": 2024}, {}),
    ("13_what_next.ipynb", {"SEED": 2024}, {}),
    # 07, 08: VGG16 (random weights offline) with the student's photos, another seed and layer
    ("07_vgg16_feature_inversion.ipynb", {"SEED": 2024, "USER_IMAGE": "{photo}", "PRETRAINED": False}, {}),
    ("08_vgg16_photos.ipynb", {"LAYER": "conv5_3", "SEED": 2024, "USER_IMAGES": ["{photo}", "{gray_photo}"]},
     {"explorer_layer": "conv5_3"}),
    ("08_vgg16_photos.ipynb", {"LAYER": "pool5", "PRETRAINED": False, "USER_IMAGES": "{photo}"},
     {"explorer_layer": "pool5"}),
]

#: Values outside the invited range: refused before any work (the cell given: 1 sets up, 2 holds the
#: parameters, 3 papermill's injected ones), by a ValueError that says what to do.
REFUSED = [
    ("00_why_interpret.ipynb", {"CUE_CLASS": 10}, 4,
     "ValueError: CUE_CLASS must be a class index from 0 to 9, got 10: set it in the parameters cell"),
    ("00_why_interpret.ipynb", {"CUE_CLASS": -1, "DATASET": "fashion_mnist"}, 4,
     "ValueError: CUE_CLASS must be a class index from 0 to 9 (0: T-shirt/top, 1: Trouser"),
    ("01_train_mnist_cnn.ipynb", {"TRAIN_NEW_MODEL": True, "EPOCHS": 0}, 4,
     "ValueError: EPOCHS must be None (the course default) or a whole number from 1 up, got 0: set it in the "
     "parameters cell"),
    ("08_vgg16_photos.ipynb", {"LAYER": "relu6_1"}, 5,
     "ValueError: Unknown layer 'relu6_1'; VGG16's layers are: conv1_1, relu1_1"),
]


def _ids(grid):
    return [f"{name[:2]}-" + "-".join(f"{k}={v}" for k, v in params.items() if k != "MODEL_OUT_DIR")
            for name, params, *_ in grid]


@pytest.fixture
def photos(tmp_path):
    """Two photos of a student's own: an RGB JPEG and a grey PNG, neither square."""
    import skimage.data
    from PIL import Image

    jpeg, png = tmp_path / "my photo.jpg", tmp_path / "grey.png"
    Image.fromarray(skimage.data.astronaut()[:300, :420]).save(jpeg, quality=85)
    Image.fromarray(skimage.data.camera()[100:400, :250]).save(png)
    return {"{photo}": str(jpeg), "{gray_photo}": str(png)}


def _fill(value, names):
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    return names.get(value, value) if isinstance(value, str) else value


@pytest.fixture
def offline_vgg(tmp_path, monkeypatch):
    """An empty torchvision cache and no download: VGG16 with random weights, on any machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CNN_COURSE_OFFLINE", "1")


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("name, parameters, expected", GRID, ids=_ids(GRID))
def test_an_invited_setting_runs(name, parameters, expected, tmp_path, photos, offline_vgg):
    names = {"{tmp}": str(tmp_path / "models"), **photos}
    parameters = {k: _fill(v, names) for k, v in parameters.items()}
    nb = run_notebook(name, tmp_path / "run", **parameters)   # raises, naming the cell, on any exception
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    values = notebook_values(nb)
    assert values, f"{name} recorded nothing: did it run at all?"
    for key, want in expected.items():
        assert values.get(key) == want, (key, values.get(key), want)
    assert all(np.all(np.isfinite(v)) for v in values.values() if isinstance(v, float)), \
        {k: v for k, v in values.items() if isinstance(v, float) and not np.isfinite(v)}


@pytest.mark.notebook
@pytest.mark.parametrize("name, parameters, cell, message", REFUSED, ids=_ids(REFUSED))
def test_a_value_outside_the_invited_range_is_refused_before_any_work(name, parameters, cell, message, tmp_path,
                                                                     offline_vgg):
    with pytest.raises(course.CourseError) as err:
        run_notebook(name, tmp_path, **parameters)
    text = str(err.value)
    assert message in text, text
    assert f"failed in cell {cell} " in text, text


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.skipif(not course.EXERCISE_SOURCE.is_file(), reason="a copy of the course without instructors/")
def test_the_exercises_run_with_another_seed(tmp_path):
    out = course.execute_notebook(course.EXERCISE_SOURCE, tmp_path / course.EXERCISE_SOURCE.name, {"FAST": True, "SEED": 2024},
                                  progress_bar=False, kernel_name="python3")
    assert out.is_file()


def test_the_grid_covers_every_invited_parameter():
    """Each parameter of a notebook's parameters cell (but FAST, the device and the sizes and steps
    that fast mode overrides) appears in the grid with a value other than its default."""
    import nbformat

    covered = {}
    for name, params, *_ in GRID + REFUSED:
        covered.setdefault(name, set()).update(params)
    not_varied = {"FAST", "DEVICE", "MODEL_OUT_DIR", "IMAGE_SIZE", "PREDICT_SIZE", "ITERATIONS", "SAMPLES",
                  "SCORE_CAM_SIZE", "FV_SIZE", "FV_STEPS"}
    missing = {}
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        if path.name == course.STUDENT_NOTEBOOK.name:   # run from its instructors' source, above
            continue
        nb = nbformat.read(str(path), as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        names = {line.split("=")[0].strip() for line in cell.source.splitlines()
                 if "=" in line and not line.lstrip().startswith("#")}
        left = names - not_varied - covered.get(path.name, set())
        if left:
            missing[path.name] = sorted(left)
    assert not missing, f"parameters never varied by the grid: {missing}"
