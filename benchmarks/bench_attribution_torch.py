"""Attribution speed on VGG16 (PyTorch), 224 x 224: cnn_utils against captum and pytorch-grad-cam,
same model, same photo, one run.

    .venv/bin/python benchmarks/bench_attribution_torch.py [--repeats 3] [--no-score-cam]

VGG16 with random weights (no download needed: the speed does not depend on the weights).
Prints seconds per photo (median over repeats, after a warm-up call) and the ratio
ours / theirs (below 1 = we are faster). References: captum 0.9 (saliency, Integrated
Gradients, occlusion) and pytorch-grad-cam 1.5 (Grad-CAM, Grad-CAM++, Score-CAM with its
default batch of 16 masked images). The course's targets are in the last column.
"""
import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (torch before anything that could import TensorFlow)
import numpy as np  # noqa: E402

import cnn_utils as cu  # noqa: E402

#: Targets (seconds per photo) from the course's requirements.
TARGETS = {"saliency": 1.0, "Grad-CAM": 1.0}


def timed(fn, repeats, warm_up=True):
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # pytorch-grad-cam's tqdm bars
            fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-score-cam", action="store_true", help="skip Score-CAM (512 forward passes)")
    parser.add_argument("--occlusion", action="store_true", help="also time occlusion (225 forward passes)")
    args = parser.parse_args(argv)

    from captum.attr import IntegratedGradients, Occlusion, Saliency
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from skimage import data

    import captum
    import pytorch_grad_cam  # noqa: F401
    from importlib.metadata import version

    model = cu.load_vgg16(pretrained=False, device="cpu")
    photo = cu.preprocess_image(data.chelsea(), 224)                     # normalised, (1, 3, 224, 224)
    x01 = (cu.recreate_image(photo).astype(np.float32) / 255.0)[None]    # (1, 224, 224, 3) in [0, 1]
    t01 = torch.from_numpy(x01.transpose(0, 3, 1, 2).copy())
    _, cls = cu.class_scores(model, x01)
    c = int(cls[0])
    target = [ClassifierOutputTarget(c)]
    layer = model.features[29]                                          # relu5_3, our default

    def pgc(cam_cls):
        cam = cam_cls(model=model, target_layers=[layer])
        return lambda: cam(input_tensor=t01, targets=target)

    methods = {
        "saliency": (lambda: cu.saliency_map(model, x01, c),
                     lambda: Saliency(model).attribute(t01.clone().requires_grad_(True), target=c, abs=True),
                     "captum"),
        "Grad-CAM": (lambda: cu.grad_cam(model, x01, c), pgc(GradCAM), "pytorch-grad-cam"),
        "Grad-CAM++": (lambda: cu.grad_cam_plus_plus(model, x01, c), pgc(GradCAMPlusPlus), "pytorch-grad-cam"),
        "Integrated Gradients (32 steps)": (
            lambda: cu.integrated_gradients(model, x01, c, steps=32),
            lambda: IntegratedGradients(model).attribute(t01, baselines=0.0, target=c, n_steps=33,
                                                         method="riemann_trapezoid", internal_batch_size=17),
            "captum"),
    }
    if not args.no_score_cam:
        methods["Score-CAM (512 masks)"] = (lambda: cu.score_cam(model, x01, c, weighting="channel_softmax"),
                                            pgc(ScoreCAM), "pytorch-grad-cam")
    if args.occlusion:
        methods["occlusion (28 px, stride 14)"] = (
            lambda: cu.occlusion(model, x01, c, window=28, stride=14),
            lambda: Occlusion(model).attribute(t01, sliding_window_shapes=(3, 28, 28), strides=(3, 14, 14),
                                               baselines=0.0, target=c, perturbations_per_eval=16),
            "captum")

    print(f"torch {torch.__version__}, captum {captum.__version__}, pytorch-grad-cam {version('grad-cam')}, "
          f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads; VGG16 (random weights), "
          f"one 224 x 224 photo, CAM layer relu5_3")
    header = f"{'method':34s} {'ours s':>8s} {'reference s':>12s} {'ratio':>6s}  reference         target"
    print(header)
    print("-" * len(header))
    for name, (ours, theirs, ref) in methods.items():
        long = "Score-CAM" in name or "occlusion" in name   # hundreds of passes: no warm-up needed
        t_theirs = timed(theirs, 1 if long else args.repeats, warm_up=not long)
        t_ours = timed(ours, 1 if long else args.repeats, warm_up=not long)
        goal = TARGETS.get(name)
        verdict = f"< {goal} s: {'ok' if t_ours < goal else 'MISSED'}" if goal else ""
        if "Score-CAM" in name:
            verdict = f"<= reference: {'ok' if t_ours <= t_theirs else 'MISSED'}"
        print(f"{name:34s} {t_ours:8.2f} {t_theirs:12.2f} {t_ours / t_theirs:6.2f}  {ref:17s} {verdict}", flush=True)
    print("ratio = ours / reference (below 1: cnn_utils is faster). Median of repeated calls after a warm-up.")


if __name__ == "__main__":
    main()
