"""Activation maximization speed: every filter of a layer in one batch vs one at a time.

    CNN_COURSE_DATA=/path/to/datasets .venv/bin/python benchmarks/bench_feature_visualization.py [--steps 100]

For conv1 (32 filters), conv2 (64 filters) and the 10 classes (``logits``) of the shipped
MNIST model, times ``cnn_utils.activation_maximization`` with ``index=None`` (all at once,
one batch) against a loop of single-index calls (the reference), same steps and settings,
in the same run, each after a warm-up call (the compiled function is traced once per layer
and reused by both). Prints seconds and the ratio one-at-a-time / batched (above 1 = the
batch is faster).
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cnn_utils as cu  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dataset", default="mnist")
    args = parser.parse_args(argv)
    model = cu.load_model(args.dataset)
    settings = dict(steps=args.steps, seed=0, tv=0.005, jitter=1)
    print(f"Activation maximization, {args.steps} steps, model {args.dataset}")
    print(f"{'target':8s} {'units':>5s} {'batched s':>10s} {'one-by-one s':>13s} {'per unit ms':>12s} {'ratio':>7s}")
    for layer in ("conv1", "conv2", "logits"):
        n = cu._layer_units(model, layer)[1]
        cu.activation_maximization(model, layer, [0], **settings)          # warm-up (trace)
        batched = timed(lambda: cu.activation_maximization(model, layer, None, **settings))
        single = timed(lambda: [cu.activation_maximization(model, layer, i, **settings) for i in range(n)])
        print(f"{layer:8s} {n:5d} {batched:10.2f} {single:13.2f} {1000 * batched / n:12.1f} "
              f"{single / batched:6.1f}x")


if __name__ == "__main__":
    main()
