"""How fast does the live explorer answer a control change?

For each method: the time from setting the image control to the updated heatmap
(callback: compute + render + widget update), against the bare method call on the
same image in the same run (the reference), after a warm-up. Prints a table with
the ratio callback / bare call. Goal: under 150 ms for gradient methods and under
400 ms for Score-CAM on the MNIST model.

    CNN_COURSE_DATA=/path/to/datasets .venv/bin/python benchmarks/bench_explorer.py
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cnn_utils  # noqa: E402

REPEATS = 20


def median_ms(fn):
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main():
    model = cnn_utils.load_model("mnist")
    _, (x, y) = cnn_utils.load_dataset("mnist")
    x, y = x[:200], y[:200]
    app = cnn_utils.explorer(model, x, y, cnn_utils.CLASS_NAMES["mnist"])
    methods = cnn_utils.explorer_methods()
    print(f"{'method':22s} {'callback ms':>12s} {'bare call ms':>13s} {'ratio':>7s}  goal")
    for name in list(methods) + [cnn_utils.ACTIVATIONS_METHOD]:
        app.controls["method"].value = name
        for i in range(3):  # warm-up: compile for this method
            app.controls["index"].value = i
        step = iter(range(10, 10 + 10 * REPEATS))

        def change():
            app.controls["index"].value = next(step) % len(x)

        cb = median_ms(change)
        xi = x[5:6]
        if name == cnn_utils.ACTIVATIONS_METHOD:
            bare = median_ms(lambda: cnn_utils.get_activations(model, xi, ["conv3"]))
        else:
            f = methods[name]
            bare = median_ms(lambda: f(model, xi, None, "conv3"))
        goal = 400 if name == "Score-CAM" else 150
        print(f"{name:22s} {cb:12.1f} {bare:13.1f} {cb / bare:7.2f}  < {goal} ms "
              f"{'ok' if cb < goal else 'MISSED'}")


if __name__ == "__main__":
    main()
