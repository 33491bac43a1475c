"""Benchmark: feature inversion iterations per second at 224 x 224, VGG16 on this CPU.

Compares ``cnn_utils.feature_inversion`` with a straightforward implementation
measured in the same run: one that, like the widely copied code, recomputes the
target features in every step, runs the whole feature stack (capturing the target
layer with a forward hook) and leaves the weights trainable, so backward also
computes weight gradients. Both use the same losses and Adam.

    python benchmarks/bench_feature_inversion.py [--size 224] [--iterations 5] [--layers 3 8 29]

Prints iterations per second and the ratio for an early and a late layer. Uses
random weights (the timing does not depend on the weights' values). PyTorch only.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cnn_utils  # noqa: E402


def straightforward_inversion(model, image, layer_index, iterations, lr=0.1, alpha=6,
                              alpha_weight=1e-5, tv_beta=2, tv_weight=0.3):
    """The reference: target recomputed each step, whole `features` stack, weights trainable."""
    torch, _ = cnn_utils._torch()
    captured = {}
    hook = model.features[layer_index].register_forward_hook(
        lambda module, inp, out: captured.__setitem__("out", out.clone()))
    x = (0.1 * torch.randn(image.shape)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    try:
        for _ in range(iterations):
            opt.zero_grad()
            model.features(image)                 # the target, again, every step
            target = captured["out"].detach()
            model.features(x)                     # all 31 layers, whatever the target
            loss = (cnn_utils.euclidian_loss(target, captured["out"])
                    + alpha_weight * cnn_utils.alpha_norm(x, alpha) / x.numel()
                    + tv_weight * cnn_utils.total_variation_norm(x, tv_beta) / x.numel())
            loss.backward()
            opt.step()
    finally:
        hook.remove()
    return x


def timed(fn, iterations):
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return iterations / wall, cpu / iterations


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 8, 29])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)

    torch, _ = cnn_utils._torch()
    if args.threads:
        torch.set_num_threads(args.threads)
    import skimage.data

    model = cnn_utils.load_vgg16(pretrained=False, device="cpu")
    names = cnn_utils.vgg_layer_names(model)
    image = cnn_utils.preprocess_image(skimage.data.chelsea(), size=args.size)
    print(f"VGG16 feature inversion, {args.size} x {args.size}, {args.iterations} iterations per "
          f"measurement, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    # warm-up (allocator, kernels)
    cnn_utils.feature_inversion(model, image, 3, iterations=1, progress=False)
    print(f"{'layer':>14} {'ours it/s':>10} {'reference it/s':>15} {'ratio':>6} "
          f"{'ours CPU s/it':>14} {'ref CPU s/it':>13}")
    for layer in args.layers:
        ours, ours_cpu = timed(lambda: cnn_utils.feature_inversion(
            model, image, layer, iterations=args.iterations, progress=False), args.iterations)
        ref, ref_cpu = timed(lambda: straightforward_inversion(
            model, image, layer, args.iterations), args.iterations)
        print(f"{names[layer]:>9} ({layer:2d}) {ours:10.3f} {ref:15.3f} {ours / ref:5.1f}x "
              f"{ours_cpu:14.2f} {ref_cpu:13.2f}", flush=True)


if __name__ == "__main__":
    main()
