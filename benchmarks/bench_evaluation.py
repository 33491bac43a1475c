"""Speed of the evaluation metrics (cnnlib.evaluation) against Quantus and pytorch-grad-cam,
same model, same images and maps, in one run.

    .venv/bin/python benchmarks/bench_evaluation.py [--n 1000] [--steps 16] [--photos 5]

1. Deletion on MNIST: ``--n`` test images x every attribution method of the course, a PyTorch CNN
   of the course's architecture (random weights: the speed does not depend on them). Ours:
   ``ev.deletion`` (``--steps`` steps, black); Quantus 0.6: ``PixelFlipping`` with the same number
   of pixels per step (its curves are tested equal in tests/test_evaluation.py). Insertion (ours
   only: Quantus has none) is timed too.
2. ROAD on VGG16 photos (random weights, 224 x 224, Grad-CAM maps): ours ``ev.road`` against
   pytorch-grad-cam 1.5's ``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst`` at the same three
   fractions (its noisy linear imputer, lil_matrix + spsolve per image).

Prints seconds and the ratio theirs / ours (above 1 = we are faster). Never a test.
"""
import argparse
import contextlib
import io
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (torch and torchvision before anything that could import TensorFlow)
import torchvision  # noqa: E402,F401
import numpy as np  # noqa: E402

import cnn_utils  # noqa: E402
from cnnlib import evaluation as ev  # noqa: E402


def mnist_cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 64, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(576, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()


def timed(fn):
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn()
    return time.perf_counter() - start, out


def deletion_part(n, steps):
    import quantus

    (_, _), (x_test, _) = cnn_utils.load_dataset("mnist")
    x = x_test[:n]
    model = mnist_cnn()
    methods = {
        "saliency": lambda: cnn_utils.saliency_map(model, x),
        "SmoothGrad": lambda: cnn_utils.smoothgrad(model, x, samples=10, seed=0),
        "Integrated Gradients": lambda: np.abs(cnn_utils.integrated_gradients(model, x, steps=16)).max(-1),
        "Grad-CAM": lambda: cnn_utils.grad_cam(model, x),
        "Grad-CAM++": lambda: cnn_utils.grad_cam_plus_plus(model, x),
        "Score-CAM": lambda: cnn_utils.score_cam(model, x),
        "occlusion": lambda: cnn_utils.occlusion(model, x, window=4, stride=4),
    }
    cls = cnn_utils.class_scores(model, x)[1]
    per_step = 784 // steps
    total_ours = total_q = total_ins = 0.0
    print(f"\n1. Deletion, {n} MNIST images, {steps} steps of {per_step} pixels, black (seconds)")
    print(f"{'method':22s} {'ours':>8s} {'Quantus':>8s} {'ratio':>7s} {'insertion (ours)':>17s} {'max |diff|':>11s}")
    for name, f in methods.items():
        maps = f()
        maps = maps + 1e-7 * np.random.default_rng(0).random(maps.shape)       # no ties: the same order in both
        t_ours, curve = timed(lambda: ev.deletion(model, x, maps, cls, steps=steps, replacement=0.0))
        t_ins, _ = timed(lambda: ev.insertion(model, x, maps, cls, steps=steps, replacement=0.0))
        metric = quantus.PixelFlipping(features_in_step=per_step, perturb_baseline=0.0, abs=False, normalise=False,
                                       disable_warnings=True)
        t_q, q = timed(lambda: metric(model=model, x_batch=x.transpose(0, 3, 1, 2), y_batch=cls,
                                      a_batch=maps[:, None], channel_first=True, softmax=False, batch_size=256))
        diff = np.abs(curve.scores[:, 1:] - np.asarray(q)).max()
        total_ours, total_q, total_ins = total_ours + t_ours, total_q + t_q, total_ins + t_ins
        print(f"{name:22s} {t_ours:8.2f} {t_q:8.2f} {t_q / t_ours:6.1f}x {t_ins:17.2f} {diff:11.1e}")
    print(f"{'all methods':22s} {total_ours:8.2f} {total_q:8.2f} {total_q / total_ours:6.1f}x {total_ins:17.2f}")
    return total_q / total_ours


def road_part(n_photos):
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    vgg = cnn_utils.load_vgg16(pretrained=False)
    names = list(cnn_utils.SAMPLE_PHOTOS)[:n_photos]
    photos = np.stack(list(cnn_utils.sample_photos(names, size=224).values()))
    maps = cnn_utils.grad_cam(vgg, photos)
    maps = maps + 1e-7 * np.random.default_rng(0).random(maps.shape)
    cls = cnn_utils.class_scores(vgg, photos)[1]
    fractions = (0.2, 0.5, 0.8)
    t_ours = 0.0
    for order in ("most", "least"):
        t, _ = timed(lambda: ev.road(vgg, photos, maps, cls, order=order, fractions=fractions))
        t_ours += t
    tensor = torch.from_numpy(np.ascontiguousarray(photos.transpose(0, 3, 1, 2)))
    targets = [ClassifierOutputTarget(int(c)) for c in cls]
    t_theirs = 0.0
    for f in fractions:
        for metric in (ROADMostRelevantFirst(percentile=100 * (1 - f)), ROADLeastRelevantFirst(percentile=100 * f)):
            with torch.no_grad():
                t, _ = timed(lambda: metric(tensor, maps.astype(np.float32), targets, vgg))
            t_theirs += t
    print(f"\n2. ROAD on VGG16 (random weights), {len(photos)} photos 224 x 224, Grad-CAM maps, "
          f"MoRF + LeRF at {fractions} (seconds)")
    print(f"ours {t_ours:.2f}   pytorch-grad-cam {t_theirs:.2f}   ratio {t_theirs / t_ours:.1f}x")
    return t_theirs / t_ours


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="MNIST test images")
    parser.add_argument("--steps", type=int, default=16, help="deletion steps (784 / steps pixels each)")
    parser.add_argument("--photos", type=int, default=5, help="VGG16 sample photos for ROAD")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    deletion_part(args.n, args.steps)
    road_part(args.photos)


if __name__ == "__main__":
    main()
