"""TCAV speed: cnnlib.concepts against captum's TCAV, same network, same sets, one run.

    .venv/bin/python benchmarks/bench_tcav.py [--random-sets 50] [--images 500] [--set-size 50]

The shipped MNIST CNN (Keras) and an exact PyTorch copy of it (the same weights; captum needs a
torch module). One concept ("thick strokes": the training digits with the largest mean distance
transform) against ``--random-sets`` random sets, plus as many random-vs-random CAVs, at ``conv3``,
scored on ``--images`` test images of one class. Each side does the whole job: activations, CAV
fits, layer gradients, scores. captum runs with its default classifier (scikit-learn's
SGDClassifier through its own data loaders; activations and CAVs cached on disk, in a fresh
temporary folder) and once more with a classifier that fits exactly as cnnlib does, so the scores
can be compared too. Prints seconds and the ratio ours / captum (below 1 = we are faster).
"""
import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402  (torch and torchvision before TensorFlow)
import torchvision  # noqa: E402,F401
import numpy as np  # noqa: E402

import cnn_utils as cu  # noqa: E402
from cnnlib import concepts  # noqa: E402


class TorchCourseCNN(torch.nn.Module):
    """The course CNN in PyTorch with the Keras model's weights (NHWC flatten order kept)."""

    def __init__(self, keras_model):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (torch.nn.Conv2d(i, o, 3) for i, o in ((1, 32), (32, 64), (64, 64)))
        self.pool1, self.pool2 = torch.nn.MaxPool2d(2), torch.nn.MaxPool2d(2)
        self.dense1, self.logits = torch.nn.Linear(576, 128), torch.nn.Linear(128, 10)
        with torch.no_grad():
            for name in ("conv1", "conv2", "conv3"):
                kernel, bias = keras_model.get_layer(name).get_weights()
                getattr(self, name).weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
                getattr(self, name).bias.copy_(torch.from_numpy(bias))
            for name in ("dense1", "logits"):
                kernel, bias = keras_model.get_layer(name).get_weights()
                getattr(self, name).weight.copy_(torch.from_numpy(kernel.T))
                getattr(self, name).bias.copy_(torch.from_numpy(bias))
        self.relu = torch.nn.ReLU()
        self.conv3_out = torch.nn.Identity()       # the layer both sides read: conv3 after its ReLU

    def forward(self, x):
        x = self.pool1(self.relu(self.conv1(x)))
        x = self.pool2(self.relu(self.conv2(x)))
        x = self.conv3_out(self.relu(self.conv3(x)))
        return self.logits(self.relu(self.dense1(x.permute(0, 2, 3, 1).flatten(1))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-sets", type=int, default=50)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--set-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from captum.concept import TCAV, Concept
    from captum.concept._utils.common import concepts_to_str
    from scipy import ndimage
    from torch.utils.data import DataLoader

    from test_concepts import _captum_sklearn_classifier

    keras_model = cu.load_model("mnist")
    torch_model = TorchCourseCNN(keras_model).eval()
    (x_train, _), (x_test, y_test) = cu.load_dataset("mnist")
    pool = x_train[:5000]
    thickness = np.array([ndimage.distance_transform_edt(im[..., 0] > 0.5).sum() / max((im > 0.5).sum(), 1)
                          for im in pool])
    concept = pool[np.argsort(-thickness)[:args.set_size]]
    randoms = concepts.random_image_sets(pool, args.random_sets, args.set_size, seed=args.seed)
    cls = 8
    inputs = x_test[y_test == cls][:args.images]
    gap = np.abs(torch_model(torch.from_numpy(inputs[:64].transpose(0, 3, 1, 2))).detach().numpy()
                 - cu.predict_logits(keras_model, inputs[:64])).max()
    print(f"torch copy of the course CNN: largest logit difference from Keras {gap:.1e}")
    print(f"TCAV at conv3: 1 concept vs {args.random_sets} random sets of {args.set_size} "
          f"(+{args.random_sets} random-vs-random CAVs), {len(inputs)} images of class {cls}; "
          f"torch threads {torch.get_num_threads()}")

    def ours(model, layer):
        start = time.perf_counter()
        cavs = concepts.train_cavs(model, layer, concept, randoms, seed=args.seed)
        result = concepts.tcav(model, inputs, cls, cavs)
        return time.perf_counter() - start, result

    ours(torch_model, "conv3_out")                                   # warm-up (compilation, caches)
    ours(keras_model, "conv3")
    t_torch, r_torch = ours(torch_model, "conv3_out")
    t_keras, r_keras = ours(keras_model, "conv3")

    def as_concept(i, name, images):
        return Concept(i, name, DataLoader(torch.from_numpy(images.transpose(0, 3, 1, 2)), batch_size=args.set_size))
    cc = as_concept(0, "thick", concept)
    rc = [as_concept(i + 1, f"random{i}", r) for i, r in enumerate(randoms)]
    sets = [[cc, r] for r in rc] + [[rc[(i + 1) % len(rc)], rc[i]] for i in range(len(rc))]
    x = torch.from_numpy(inputs.transpose(0, 3, 1, 2))

    def captum_run(classifier):
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            tcav = TCAV(torch_model, ["conv3_out"], classifier=classifier, save_path=folder)
            out = tcav.interpret(x, sets, target=cls)
            seconds = time.perf_counter() - start
        scores = np.array([float(out[concepts_to_str(s)]["conv3_out"]["sign_count"][0]) for s in sets])
        return seconds, scores

    from captum.concept._utils.classifier import DefaultClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = DefaultClassifier()
    t_default, s_default = captum_run(default)
    t_same, s_same = captum_run(_captum_sklearn_classifier(args.seed))
    n = args.random_sets
    same_gap = max(np.abs(s_same[:n] - r_torch.scores).max(), np.abs(s_same[n:] - r_torch.random_scores).max())
    rows = [("cnnlib, Keras course CNN", t_keras), ("cnnlib, torch copy", t_torch),
            ("captum TCAV, default classifier", t_default), ("captum TCAV, cnnlib's fit", t_same)]
    print(f"\n{'':34s} {'seconds':>8s}")
    for name, t in rows:
        print(f"{name:34s} {t:8.2f}")
    print(f"\nratio cnnlib (torch) / captum (default classifier): {t_torch / t_default:.2f}")
    print(f"ratio cnnlib (torch) / captum (same fit):           {t_torch / t_same:.2f}")
    print(f"ratio cnnlib (Keras) / captum (default classifier): {t_keras / t_default:.2f}")
    print(f"\nscores, same fit: largest difference from captum {same_gap:.3f}; p-values "
          f"ours {r_torch.test['p_value']:.3g}")
    print(f"concept mean score: cnnlib {r_torch.test['mean']:.3f} (Keras {r_keras.test['mean']:.3f}), "
          f"captum default {s_default[:n].mean():.3f}; random mean: cnnlib {r_torch.test['random_mean']:.3f}, "
          f"captum default {s_default[n:].mean():.3f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
