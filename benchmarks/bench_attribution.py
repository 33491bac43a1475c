"""Attribution speed: cnn_utils against tf-keras-vis 0.8.7, same model, same inputs, one run.

    CNN_COURSE_DATA=/path/to/datasets .venv/bin/python benchmarks/bench_attribution.py [--repeats 20]

Prints milliseconds per call (median over repeats, after a warm-up call) for one
image and for a batch, and the ratio ours / theirs (below 1 = we are faster).
tf-keras-vis is given the pre-softmax model (``cnn_utils.logits_model``): its
``ReplaceToLinear`` cannot strip a separate Softmax layer, and the course uses
pre-softmax scores. Its visualizer objects are built once, outside the timing.
The live-demo targets of the course are checked in the last column.
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import cnn_utils as cu  # noqa: E402

# Targets (ms) from the course's performance requirements.
TARGETS = {
    ("saliency", 1): 20, ("Grad-CAM", 1): 20, ("Grad-CAM++", 1): 20, ("Score-CAM", 1): 150,
    ("saliency", 1000): 2000, ("Grad-CAM", 1000): 2000,
}


def plain_integrated_gradients(logits_model, x, classes, steps=50):
    """Reference for the method tf-keras-vis lacks: a straightforward eager GradientTape
    implementation (one batch per image, trapezoidal rule), as a tutorial would write it."""
    import tensorflow as tf

    alphas = tf.linspace(0.0, 1.0, steps + 1)[:, None, None, None]
    out = []
    for xi, ci in zip(x, classes):
        path = alphas * xi[None]                      # black baseline
        with tf.GradientTape() as tape:
            tape.watch(path)
            score = logits_model(path, training=False)[:, int(ci)]
        g = tape.gradient(score, path).numpy()
        avg = (g[:-1] + g[1:]).mean(axis=0) / 2
        out.append(xi * avg)
    return np.stack(out)


def quiet(fn, *args):
    """Run fn without its stdout (tf-keras-vis' Score-CAM prints model.predict progress bars)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def timed(fn, repeats):
    fn()  # warm-up (tracing, first allocation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per single-image case")
    parser.add_argument("--batch", type=int, default=1000, help="batch size for the batch cases")
    parser.add_argument("--samples", type=int, default=20, help="SmoothGrad samples (both libraries)")
    args = parser.parse_args(argv)

    import tensorflow as tf
    import tf_keras_vis
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.saliency import Saliency
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.scores import CategoricalScore

    model = cu.load_model("mnist")
    lm = cu.logits_model(model)
    (_, _), (x_test, _) = cu.load_dataset("mnist")
    layer = "conv3"
    tkv = {
        "saliency": Saliency(lm), "Grad-CAM": Gradcam(lm),
        "Grad-CAM++": GradcamPlusPlus(lm), "Score-CAM": Scorecam(lm),
    }
    s = args.samples
    methods = {
        # name: (ours, theirs); both take (images, classes)
        "saliency": (lambda x, c: cu.saliency_map(model, x, c),
                     lambda x, c: tkv["saliency"](CategoricalScore(list(c)), x)),
        f"SmoothGrad ({s} samples)": (
            lambda x, c: cu.smoothgrad(model, x, c, samples=s, noise=0.2, seed=0),
            lambda x, c: tkv["saliency"](CategoricalScore(list(c)), x, smooth_samples=s, smooth_noise=0.2)),
        "Integrated Gradients (50 steps)*": (lambda x, c: cu.integrated_gradients(model, x, c, steps=50),
                                             lambda x, c: plain_integrated_gradients(lm, x, c, steps=50)),
        "Grad-CAM": (lambda x, c: cu.grad_cam(model, x, c, layer=layer),
                     lambda x, c: tkv["Grad-CAM"](CategoricalScore(list(c)), x, penultimate_layer=layer)),
        "Grad-CAM++": (lambda x, c: cu.grad_cam_plus_plus(model, x, c, layer=layer),
                       lambda x, c: tkv["Grad-CAM++"](CategoricalScore(list(c)), x, penultimate_layer=layer)),
        "Score-CAM": (lambda x, c: cu.score_cam(model, x, c, layer=layer),
                      lambda x, c: tkv["Score-CAM"](CategoricalScore(list(c)), x, penultimate_layer=layer)),
    }
    import keras

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, tf-keras-vis {tf_keras_vis.__version__}, "
          f"{os.cpu_count()} CPU cores; model: saved_models/mnist_cnn.keras, CAM layer {layer}")
    rows = []
    cases = [(1, args.repeats), (100, max(3, args.repeats // 5)), (args.batch, 3)]
    for n, repeats in cases:
        x = x_test[:n]
        _, c = cu.class_scores(model, x)
        for name, (ours, theirs) in methods.items():
            if n == args.batch and name not in ("saliency", "Grad-CAM"):
                continue  # the batch target concerns saliency and Grad-CAM
            t_ours = timed(lambda: ours(x, c), repeats)
            t_theirs = timed(lambda: quiet(theirs, x, c), repeats) if theirs else None
            rows.append((name, n, t_ours, t_theirs))
            print(".", end="", flush=True)
    print()
    header = f"{'method':34s} {'images':>6s} {'ours ms':>9s} {'tf-keras-vis ms':>16s} {'ratio':>7s}  target"
    print(header)
    print("-" * len(header))
    for name, n, t_ours, t_theirs in rows:
        ratio = f"{t_ours / t_theirs:7.2f}" if t_theirs else "      -"
        theirs = f"{t_theirs:16.1f}" if t_theirs else f"{'(none)':>16s}"
        target = TARGETS.get((name, n))
        verdict = f"< {target} ms: {'ok' if t_ours < target else 'MISSED'}" if target else ""
        print(f"{name:34s} {n:6d} {t_ours:9.1f} {theirs} {ratio}  {verdict}")
    print("ratio = ours / tf-keras-vis (below 1: cnn_utils is faster). Median of repeated calls after warm-up.")
    print("* tf-keras-vis has no Integrated Gradients: that row's reference is a plain eager GradientTape loop.")


if __name__ == "__main__":
    main()
