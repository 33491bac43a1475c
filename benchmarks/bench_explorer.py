"""How fast does the live explorer answer a control change?

For each method: the time from setting the image control to the updated heatmap
(callback: compute + render + widget update; the heatmap cache emptied first, so every
update computes), against the bare method call on the same image in the same run (the
reference), after a warm-up. Prints a table with the ratio callback / bare call.

Two models: VGG16 (PyTorch) on the sample photos at 224 x 224 (goal: <= 1 s per update for
the one-pass gradient methods Saliency, Grad-CAM, Grad-CAM++), then the MNIST CNN (goal:
under 150 ms for gradient methods, 400 ms for Score-CAM). ``--skip-score-cam`` leaves out
VGG16's Score-CAM (512 forward passes per update), ``--photos-only`` the MNIST CNN;
``--repeats N`` sets VGG16's timed updates per method (default 5; the MNIST CNN's: 20).

    CNN_COURSE_DATA=/path/to/datasets .venv/bin/python benchmarks/bench_explorer.py
"""
import cnnlib.frameworks
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cnn_utils  # noqa: E402


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def bench(app, model, x, layer, goals, repeats, skip=()):
    methods = cnn_utils.explorer_methods(samples=app.samples)
    print(f"{'method':22s} {'callback ms':>12s} {'bare call ms':>13s} {'ratio':>7s}  goal")
    for name in [m for m in list(methods) + [cnn_utils.ACTIVATIONS_METHOD] if m not in skip]:
        app.controls["method"].value = name
        app.controls["index"].value = 1 % len(x)  # warm-up
        step = iter(range(2, 2 + 10 * repeats))

        def change():
            app.cache.clear()
            app.controls["index"].value = next(step) % len(x)

        cb = median_ms(change, repeats)
        assert "error" not in app.last, app.status.value
        xi = x[:1]
        if name == cnn_utils.ACTIVATIONS_METHOD:
            if cnnlib.frameworks._is_torch_module(model):
                bare = median_ms(lambda: cnn_utils.vgg_layer_activations(model, xi, layer), repeats)
            else:
                bare = median_ms(lambda: cnn_utils.get_activations(model, xi, [layer]), repeats)
        else:
            f = methods[name]
            bare = median_ms(lambda: f(model, xi, None, layer), repeats)
        goal = goals.get(name)
        verdict = "" if goal is None else f"<= {goal} ms {'ok' if cb <= goal else 'MISSED'}"
        print(f"{name:22s} {cb:12.1f} {bare:13.1f} {cb / bare:7.2f}  {verdict}", flush=True)


def main():
    import torch  # noqa: F401  (torch before TensorFlow: the import-order trap)

    skip = ("Score-CAM",) if "--skip-score-cam" in sys.argv else ()
    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 5
    vgg = cnn_utils.load_vgg16(device="cpu")
    photos = cnn_utils.sample_photos(size=224)
    x = np.stack(list(photos.values()))
    app = cnn_utils.explorer(vgg, x, samples=8)
    print(f"VGG16 ({'ImageNet' if vgg.pretrained else 'random'} weights), 224 x 224 photos, "
          f"{torch.get_num_threads()} threads; SmoothGrad/IG with {app.samples} passes")
    bench(app, vgg, x, "relu5_3", {"Saliency": 1000, "Grad-CAM": 1000, "Grad-CAM++": 1000}, repeats=repeats,
          skip=skip)
    if "--photos-only" in sys.argv:
        return

    model = cnn_utils.load_model("mnist")
    _, (xm, ym) = cnn_utils.load_dataset("mnist")
    app = cnn_utils.explorer(model, xm[:200], ym[:200], cnn_utils.CLASS_NAMES["mnist"])
    print("\nMNIST CNN, 28 x 28")
    goals = {name: 150 for name in cnn_utils.explorer_methods()}
    goals["Score-CAM"] = 400
    bench(app, model, xm[:200], "conv3", goals, repeats=20)


if __name__ == "__main__":
    main()
