"""Benchmark: t-SNE of the penultimate-layer (dense1) features of 10,000 test images.

Runs scikit-learn's TSNE (Barnes-Hut) and openTSNE (FFT-accelerated) in one
process on the same features, with the same perplexity, number of iterations
(750, the first 250 with early exaggeration: openTSNE's default schedule), PCA
initialisation and n_jobs,
and prints each time, their ratio and each map's trustworthiness (k = 10).
The goal is under 60 s on a 2-core CPU; the faster one is the notebook's default
(``cnn_utils.tsne_embedding(method=...)``).

    CNN_COURSE_DATA=/path/to/datasets .venv/bin/python benchmarks/bench_tsne.py [--n 10000]

Not a test: timings depend on the machine and on its other load.
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import cnn_utils  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="number of test points (default 10000)")
    parser.add_argument("--dataset", default="mnist", choices=cnn_utils.DATASETS)
    parser.add_argument("--perplexity", type=float, default=30.0)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=cnn_utils.DEFAULT_SEED)
    parser.add_argument("--n-iter", type=int, default=750, help="iterations, 250 of them exaggerated")
    args = parser.parse_args()

    _, (x_test, y_test) = cnn_utils.load_dataset(args.dataset)
    model = cnn_utils.load_model(args.dataset)
    start = time.perf_counter()
    feats = cnn_utils.extract_features(model, x_test[: args.n], layer="dense1")
    print(f"dense1 features of {len(feats)} {args.dataset} test images: shape {feats.shape}, "
          f"{time.perf_counter() - start:.1f} s")
    print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"perplexity {args.perplexity}, n_jobs {args.n_jobs}, {args.n_iter} iterations, PCA init")

    print(f"load average before: {os.getloadavg()[0]:.1f} (other processes share the CPUs; "
          "CPU seconds are printed too, as a load-independent measure)")

    times, trust = {}, {}
    for method in ("sklearn", "opentsne"):
        start, cpu_start = time.perf_counter(), time.process_time()
        emb = cnn_utils.tsne_embedding(feats, perplexity=args.perplexity, method=method,
                                       n_jobs=args.n_jobs, seed=args.seed, n_iter=args.n_iter)
        times[method] = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        trust[method] = cnn_utils.trustworthiness(feats, emb, n_neighbors=10)
        print(f"{method:>9}: {times[method]:6.1f} s wall, {cpu:6.1f} s CPU   "
              f"trustworthiness(k=10) = {trust[method]:.4f}   load average now {os.getloadavg()[0]:.1f}",
              flush=True)

    ratio = times["sklearn"] / times["opentsne"]
    faster = min(times, key=times.get)
    print(f"ratio sklearn / openTSNE time: {ratio:.2f}x  ->  faster: {faster}")
    goal = "met" if times[faster] < 60 else "NOT met"
    print(f"goal (< 60 s for {len(feats)} points): {goal} ({times[faster]:.1f} s)")


if __name__ == "__main__":
    main()
