"""Peak memory of the attribution methods on large batches (issue 13: memory stays bounded).

Each case runs in a fresh process and reports its peak resident memory (VmHWM) above what
the process held once the model and the images were loaded, and that increase as a ratio
of the images' own size (the reference measured in the same run: 1.0 = one more copy of
the images). Memory does not depend on the batch: every method splits its work into calls
below ``cnn_utils.ATTRIBUTION_MEMORY_BUDGET`` (1 GiB of activations).

    CNN_COURSE_DATA=/path/to/datasets python benchmarks/bench_memory.py            # all cases
    python benchmarks/bench_memory.py saliency_mnist                                # one case
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    # name: (framework, method, images, keyword arguments)
    "saliency_mnist": ("keras", "saliency_map", 60000, {}),
    "grad_cam_mnist": ("keras", "grad_cam", 60000, {}),
    "score_cam_mnist": ("keras", "score_cam", 2000, {}),
    "saliency_vgg16": ("torch", "saliency_map", 8, {}),
    "grad_cam_vgg16": ("torch", "grad_cam", 8, {}),
    "score_cam_vgg16": ("torch", "score_cam", 1, {"size": 64}),
}


def peak_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def reset_peak():
    """Reset VmHWM to the current resident size (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def run_case(name):
    framework, method, n, kwargs = CASES[name]
    sys.path.insert(0, str(ROOT))
    import numpy as np

    if framework == "torch":
        import torch  # noqa: F401  (torch before TensorFlow: the import-order trap)
    import cnn_utils

    kwargs = dict(kwargs)
    if framework == "keras":
        (x, _), _ = cnn_utils.load_dataset("mnist")
        x = x[:n]
        model = cnn_utils.load_model("mnist")
    else:
        size = kwargs.pop("size", 224)
        photos = cnn_utils.sample_photos(size=size)
        x = np.stack([photos[k] for k in sorted(photos)] * 2)[:n]
        model = cnn_utils.load_vgg16(pretrained=False)
    fn = getattr(cnn_utils, method)
    if framework == "keras":
        fn(model, x[:2], **kwargs)      # trace the compiled function outside the measurement
    reset_peak()
    base = peak_kib()
    start = time.perf_counter()
    maps = fn(model, x, **kwargs)
    seconds = time.perf_counter() - start
    extra = peak_kib() - base
    return {"case": name, "images": int(len(x)), "image_shape": list(x.shape[1:]), "seconds": round(seconds, 1),
            "peak_extra_mib": round(extra / 1024, 1), "images_mib": round(x.nbytes / 2 ** 20, 1),
            "ratio_to_images": round(extra * 1024 / max(x.nbytes, 1), 2), "maps_shape": list(np.shape(maps))}


def main(names):
    rows = []
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CNN_COURSE_OFFLINE="1"))
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode or not lines:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        row = json.loads(lines[-1])
        rows.append(row)
        print(f"{name:16s} {row['images']:6d} images {str(tuple(row['image_shape'])):14s} "
              f"{row['seconds']:7.1f} s   peak +{row['peak_extra_mib']:7.1f} MiB   "
              f"images {row['images_mib']:6.1f} MiB   ratio {row['ratio_to_images']:.2f}", flush=True)
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(run_case(sys.argv[2])))
    else:
        main(sys.argv[1:] or list(CASES))
