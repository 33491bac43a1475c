"""The exercise notebook's tests as the grader runs them (instructors only: never shipped to students).

Each test cell of ``11_exercises.ipynb`` (by grade id) has here the calls of the student's
functions the grader asks for (``CALLS``) and the check of what comes back (``CHECKS``): the
visible self-checks of the notebook and the hidden tests, with the references and tolerances.
The checks run in the grader's own process, never where student code runs, on plain arrays and
text (``cnnlib/grading.py``: ``Trusted`` is ``t`` below, ``Answers`` is ``got``). A check passes by
returning and fails with ``AssertionError(message)``: the message is all the student sees.
``OWN_WORK`` lists calls made in a second run where the course's attribution functions do not exist.
"""
import numpy as np

def _columns():
    return np.tile(np.array([0.0, 0.1, 0.2, 0.3], dtype=np.float32), (3, 1))[..., None]


# --- exercise 1 ------------------------------------------------------------

def calls_ex1_tv(t):
    columns = _columns()
    checker = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)[..., None]
    channels = np.ascontiguousarray(np.broadcast_to(np.array([0.0, 0.5, 1.0], np.float32), (4, 4, 3)))
    batch = np.stack([columns, 2 * columns, np.zeros_like(columns)])
    inputs = [columns, columns.T.reshape(4, 3, 1), np.full((5, 5, 1), 0.7, np.float32), batch,
              np.ascontiguousarray(columns[:, ::-1]), checker, channels]
    calls = [t.call("total_variation", t.array(f"tv{i}", x)) for i, x in enumerate(inputs)]
    return calls + [t.call("total_variation", t.array("tv0", columns), kind="gradient")]


def check_ex1_tv(t, got):
    t.close(got[0], 0.9, "total_variation(image that grows by 0.1 per column)", atol=1e-5,
            hint="Sum |x[i, j+1] - x[i, j]| over rows, columns and channels.")
    t.close(got[1], 0.9, "total_variation(the same image transposed)", atol=1e-5,
            hint="Add the differences between vertical neighbours too: x[i+1, j] - x[i, j].")
    t.close(got[2], 0.0, "total_variation(constant image)", atol=1e-6)
    t.close(got[3], [0.9, 1.8, 0.0], "total_variation(batch of 3 images)", atol=1e-5,
            hint="For a batch (N, H, W, C) return one value per image, not one sum over the batch.")
    t.close(got[4], 0.9, "total_variation(mirrored image)", atol=1e-5, hint="Use the absolute value of each difference.")
    t.close(got[5], 4.0, "total_variation(2x2 checkerboard)", atol=1e-5)
    t.close(got[6], 0.0, "total_variation(image varying across channels only)", atol=1e-6,
            hint="Differences are taken between neighbouring pixels, not channels.")
    grad = got.gradient(7)
    assert grad is not None and np.abs(grad).sum() > 0, \
        "total_variation must be built from TensorFlow operations (no gradient)."


def _ascent_calls(t):
    return [t.call("class_activation_maximization", t.name("score_model"), 8),
            t.call("class_activation_maximization", t.name("score_model"), 3, steps=4, lr=0.05, seed=7),
            t.call("class_activation_maximization", t.name("score_model"), 3, steps=2, lr=0.5, seed=11),
            t.call("class_activation_maximization", t.name("score_model"), 2, seed=3),
            t.call("class_activation_maximization", t.name("score_model"), 5, seed=3),
            t.call("class_activation_maximization", t.name("score_model"), 8, steps=3)]


def calls_ex1_score(t):
    return _ascent_calls(t)


def check_ex1_score(t, got):
    img = t.check_array(got[0], "class_activation_maximization(score_model, 8)", shape=(28, 28, 1), low=0.0, high=1.0)
    before, after = t.class_score(t.start_image(0), 8), t.class_score(img, 8)
    assert after > before + 5, (
        f"The class score rose from {before:.2f} only to {after:.2f}; expected at least 5 more. "
        "Step along +gradient (ascent, not descent), normalise it and take `steps` steps of size `lr`.")
    moved = float(np.linalg.norm(img - t.start_image(0)))
    assert 0.2 < moved <= 60 * 0.2 + 1e-3, (
        f"The result is {moved:.2f} (L2 distance) away from start_image(0); 60 unit-norm steps of lr = 0.2 "
        "move it by more than 0.2 and at most 12. Start from start_image(seed) and normalise every step.")
    for i, kw in ((1, dict(steps=4, lr=0.05, seed=7)), (2, dict(steps=2, lr=0.5, seed=11))):
        t.close(got[i], t.reference_ascent(3, **kw), f"class_activation_maximization(score_model, 3, {kw})",
                atol=2e-3, rtol=0, hint="Start from start_image(seed); each step: gradient of the score, divided by "
                "its L2 norm + 1e-8, x + lr * g, clipped to [0, 1]; exactly `steps` steps.")
    for i, c in ((3, 2), (4, 5)):
        img_c = t.check_array(got[i], f"class_activation_maximization(score_model, {c}, seed=3)", shape=(28, 28, 1),
                              low=0.0, high=1.0)
        gain = t.class_score(img_c, c) - t.class_score(t.start_image(3), c)
        assert gain > 5, f"class {c}: the score rose by only {gain:.2f}"
        pred = int(np.argmax(t.scores(img_c[None])[0]))
        assert pred == c, f"the image synthesised for class {c} is classified as {pred}"
    short = t.check_array(got[5], "class_activation_maximization(score_model, 8, steps=3)", shape=(28, 28, 1))
    assert t.class_score(short, 8) < after, "steps= must set the number of ascent steps"


def calls_ex1_regularization(t):
    sm = t.name("score_model")
    return [t.call("class_activation_maximization", sm, 8),
            t.call("class_activation_maximization", sm, 8, tv_weight=0.02, l2_weight=0.01),
            t.call("class_activation_maximization", sm, 8, l2_weight=0.05),
            t.call("class_activation_maximization", sm, 8, tv_weight=0.05),
            t.call("class_activation_maximization", sm, 6, steps=3, lr=0.3, seed=5, tv_weight=0.05, l2_weight=0.2)]


def _tv(x):
    x = np.asarray(x, np.float64)
    return np.abs(np.diff(x, axis=0)).sum() + np.abs(np.diff(x, axis=1)).sum()


def check_ex1_regularization(t, got):
    plain = t.check_array(got[0], "class_activation_maximization(score_model, 8)", shape=(28, 28, 1))
    smooth = t.check_array(got[1], "class_activation_maximization(..., tv_weight=0.02, l2_weight=0.01)",
                           shape=(28, 28, 1), low=0.0, high=1.0)
    assert _tv(smooth) < 0.8 * _tv(plain), (
        f"With tv_weight=0.02 and l2_weight=0.01 the total variation is {_tv(smooth):.1f}, not clearly below "
        f"the {_tv(plain):.1f} without regularization. Subtract tv_weight * TV(x) and l2_weight * sum(x**2) "
        "from the objective *before* taking the gradient.")
    assert t.class_score(smooth, 8) > t.class_score(t.start_image(0), 8) + 5, \
        "the regularized ascent must still raise the score"
    l2_only = t.check_array(got[2], "class_activation_maximization(..., l2_weight=0.05)", shape=(28, 28, 1))
    assert np.square(l2_only).sum() < np.square(plain).sum(), "the L2 term must lower the image's squared norm"
    tv_only = t.check_array(got[3], "class_activation_maximization(..., tv_weight=0.05)", shape=(28, 28, 1))
    assert _tv(tv_only) < 0.8 * _tv(plain), "the TV term alone must lower the total variation"
    kw = dict(steps=3, lr=0.3, seed=5, tv_weight=0.05, l2_weight=0.2)
    t.close(got[4], t.reference_ascent(6, **kw), f"class_activation_maximization(score_model, 6, {kw})",
            atol=2e-3, rtol=0, hint="The objective is score - tv_weight * TV(x) - l2_weight * sum(x**2); normalise "
            "the gradient of that whole objective.")


# --- exercise 2 ------------------------------------------------------------

def calls_ex2_norm(t):
    sm, x16, y16 = t.name("score_model"), t.array("X16", t.X[:16]), t.array("Y16", t.Y[:16])
    return [t.call("fgsm", sm, x16, y16, eps) for eps in (0.1, 0.01, 0.0)]


def check_ex2_norm(t, got):
    x_adv = t.check_array(got[0], "fgsm(score_model, X[:16], Y[:16], 0.1)", shape=t.X[:16].shape, low=0.0, high=1.0)
    delta = np.abs(x_adv - t.X[:16])
    assert delta.max() <= 0.1 + 1e-6, f"the perturbation's max norm is {delta.max():.4f}, more than eps = 0.1"
    assert np.mean(delta > 1e-6) > 0.1, "fgsm changed almost no pixel: add eps * sign(gradient) to the images"
    small = t.check_array(got[1], "fgsm(score_model, X[:16], Y[:16], 0.01)", shape=t.X[:16].shape)
    assert np.abs(small - t.X[:16]).max() <= 0.01 + 1e-6, "the max norm must follow eps (eps = 0.01)"
    zero = t.check_array(got[2], "fgsm(score_model, X[:16], Y[:16], 0.0)", shape=t.X[:16].shape)
    assert np.abs(zero - t.X[:16]).max() <= 1e-6, "eps = 0 must not change the images"


def calls_ex2_sign(t):
    return [t.call("fgsm", t.name("score_model"), t.array("X16", t.X[:16]), t.array("Y16", t.Y[:16]), 0.05)]


def check_ex2_sign(t, got):
    eps = 0.05
    x_adv = t.check_array(got[0], "fgsm(score_model, X[:16], Y[:16], 0.05)", shape=t.X[:16].shape)
    step = x_adv - t.X[:16]
    inside = (x_adv > 1e-6) & (x_adv < 1 - 1e-6)
    off = inside & (np.abs(step) > 1e-6) & (np.abs(np.abs(step) - eps) > 1e-5)
    assert not off.any(), (
        f"{off.sum()} unclipped pixels moved by something other than +-eps (e.g. {step[off][:3]}). "
        "FGSM uses only the *sign* of the gradient: x + eps * sign(grad).")
    ref = t.reference_fgsm_sign()
    usable = inside & (ref != 0)
    agree = float(np.mean(np.sign(step)[usable] == ref[usable]))
    assert agree > 0.99, (
        f"the sign pattern matches the reference on only {agree:.1%} of the pixels"
        + (" - you step *against* the gradient: FGSM increases the loss" if agree < 0.05 else
           " - use the cross-entropy of the TRUE labels computed from the logits"))


EPSILONS = [0.01, 0.05, 0.1, 0.2]


def calls_ex2_success(t):
    sm, x, y = t.name("score_model"), t.array("X", t.X), t.array("Y", t.Y)
    return [t.call("attack_success_rate", sm, x, y, e) for e in EPSILONS]


def check_ex2_success(t, got):
    rates = []
    for i, e in enumerate(EPSILONS):
        rate = t.check_array(got[i], f"attack_success_rate(score_model, X, Y, {e})")
        assert rate.size == 1, f"attack_success_rate must return one number, got an array of shape {rate.shape}"
        rates.append(float(rate.reshape(-1)[0]))
    t.check_array(rates, "the success rates", shape=(4,), low=0.0, high=1.0)
    assert all(a <= b for a, b in zip(rates, rates[1:])), f"the success rate should not drop as eps grows: {rates}"
    assert rates[-1] >= rates[0] + 0.15, (
        f"success rates {rates}: a budget of 0.2 should fool the network clearly more often than 0.01. "
        "Count only images that were classified correctly before the attack.")
    for e, r in zip(EPSILONS, rates):
        ref = t.reference_success_rate(e)
        assert abs(r - ref) <= 1.5 / len(t.X), (
            f"eps = {e}: success rate {r:.3f}, but the reference attack fools {ref:.3f} of the images "
            "classified correctly before the attack. Count only those, and attack with the loss of the true labels.")


_LIN_W = np.array([[1., -2., 0.], [-3., 4., 0.5], [0., 0., -1.], [0.25, 1., 2.]], dtype=np.float32)


def calls_ex2_saliency(t):
    img = np.random.default_rng(0).random((2, 2, 2, 1)).astype(np.float32)
    sm, x8 = t.name("score_model"), t.array("X8", t.X[:8])
    linear = {"dense_model": t.array("lin_W", _LIN_W)["array"], "input_shape": [2, 2, 1]}
    return [t.call("saliency", linear, t.array("lin_img", img), class_index=1),
            t.call("saliency", sm, x8), t.call("saliency", sm, x8, class_index=3)]


def check_ex2_saliency(t, got):
    s = t.check_array(got[0], "saliency(linear model, class_index=1)", shape=(2, 2, 2))
    t.close(s, np.broadcast_to(np.abs(_LIN_W[:, 1]).reshape(2, 2), (2, 2, 2)), "saliency of a linear model",
            atol=1e-5, hint="The gradient of W.T x for class c is the column W[:, c]; take its absolute value.")
    t.close(got[1], t.reference("saliency_map", t.X[:8], normalize=False), "saliency(score_model, X[:8])",
            rtol=1e-3, atol=1e-5)
    t.close(got[2], t.reference("saliency_map", t.X[:8], class_index=3, normalize=False),
            "saliency(score_model, X[:8], class_index=3)", rtol=1e-3, atol=1e-5)


PLOT_EPS, PLOT_RATES = [0.01, 0.05, 0.1, 0.2], [0.0, 0.02, 0.1, 0.4]


def calls_ex2_plot(t):
    return [t.call("plot_success_vs_eps", PLOT_EPS, PLOT_RATES, kind="figure")]


def check_ex2_plot(t, got):
    fig = got.figure(0)
    assert fig.get("type") == "Figure", f"plot_success_vs_eps must return the Figure, got {fig.get('type')}"
    assert fig.get("axes"), "draw into an axes of the figure (fig, ax = plt.subplots())"
    assert fig.get("xlabel") and fig.get("ylabel"), "label both axes (eps, success rate)"
    assert fig.get("title") or fig.get("suptitle"), "give the figure a title"
    assert fig.get("lines"), "draw the rates as a line (ax.plot)"
    t.close(fig.get("xdata"), PLOT_EPS, "the line's x values (eps)")
    t.close(fig.get("ydata"), PLOT_RATES, "the line's y values (success rates)")
    shown, hidden = fig.get("with_line"), fig.get("without_line")
    changed = 0 if shown is None or hidden is None or shown.shape != hidden.shape else \
        int(np.any(shown != hidden, axis=-1).sum())
    assert changed >= 20, (
        f"the line of success rates cannot be seen in the figure (drawing it changes {changed} pixels): check that "
        "it is visible, not transparent, has a width or markers, and lies inside the axes limits.")


# --- exercise 3 ------------------------------------------------------------

def _head(t, layers, key):
    return [{"tuple": [t.array(f"{key}{i}W", W), t.array(f"{key}{i}b", b)]} for i, (W, b) in enumerate(layers)]


_TINY = [(np.array([[1., -1.], [1., 2.]]), np.zeros(2)), (np.array([[1.], [2.]]), np.zeros(1))]


def calls_ex3_conservation(t):
    a0, head, nob = t.array("A0", t.A0), _head(t, t.HEAD, "head"), _head(t, t.HEAD_NO_BIAS, "nobias")
    tiny, one = _head(t, _TINY, "tiny"), t.array("tiny_a", np.array([[1., 2.]]))
    return [t.call("lrp_epsilon", a0, nob, eps=1e-9), t.call("lrp_epsilon", a0, head, eps=0.01),
            t.call("lrp_epsilon", one, tiny, eps=0.0), t.call("lrp_epsilon", one, tiny, eps=1.0),
            t.call("lrp_epsilon", a0, head, class_index=3, eps=0.25)]


def _head_scores(a0, layers):
    a = a0
    for i, (W, b) in enumerate(layers):
        a = a @ W + b
        a = np.maximum(a, 0) if i < len(layers) - 1 else a
    return a.max(axis=1)


def ref_lrp(a0, layers, classes, eps):
    acts = [a0]
    for i, (W, b) in enumerate(layers):
        z = acts[-1] @ W + b
        acts.append(np.maximum(z, 0) if i < len(layers) - 1 else z)
    R = np.zeros_like(acts[-1])
    R[np.arange(len(a0)), classes] = acts[-1][np.arange(len(a0)), classes]
    for (W, b), a in zip(reversed(layers), reversed(acts[:-1])):
        z = a @ W + b
        R = a * ((R / (z + eps * np.where(z >= 0, 1, -1))) @ W.T)
    return R


def check_ex3_conservation(t, got):
    R = t.check_array(got[0], "lrp_epsilon(A0, HEAD_NO_BIAS, eps=1e-9)", shape=t.A0.shape)
    t.close(R.sum(axis=1), _head_scores(t.A0, t.HEAD_NO_BIAS), "sum of relevance (no biases, eps -> 0)", rtol=1e-5,
            hint="Without biases and epsilon, the relevance of the inputs must add up to the class score: "
                 "R_j = sum_k a_j w_jk / z_k * R_k, starting from R = score at the top.")
    R = t.check_array(got[1], "lrp_epsilon(A0, HEAD, eps=0.01)", shape=t.A0.shape)
    total, score = R.sum(axis=1), _head_scores(t.A0, t.HEAD)
    worst = np.max(np.abs(total - score) / np.abs(score))
    assert worst < 0.05, f"with biases and eps = 0.01, the relevance sum is off the score by up to {worst:.1%} (expected < 5 %)"
    t.close(got[2], [[-1.0, 10.0]], "LRP on a small network worked out by hand (eps = 0)")
    t.close(got[3], [[-0.675, 6.75]], "LRP-epsilon (eps = 1) on a small network worked out by hand")
    t.close(got[4], ref_lrp(t.A0, t.HEAD, np.full(16, 3), 0.25), "lrp_epsilon(A0, HEAD, class_index=3, eps=0.25)",
            rtol=1e-4, atol=1e-7)


def calls_ex3_gxi(t):
    a0, nob = t.array("A0", t.A0), _head(t, t.HEAD_NO_BIAS, "nobias")
    return [t.call("lrp_epsilon", a0, nob, eps=1e-9), t.call("lrp_epsilon", a0, nob, eps=10.0)]


def check_ex3_gxi(t, got):
    gxi = t.gradient_x_input()
    R = t.check_array(got[0], "lrp_epsilon(A0, HEAD_NO_BIAS, eps=1e-9)", shape=t.A0.shape)
    t.close(R, gxi, "LRP (no biases, eps -> 0) vs gradient x input", atol=1e-4 * np.abs(gxi).max(), rtol=0,
            hint="Multiply by the activations a_j of the layer's input and divide by z_k of that layer.")
    R_big = t.check_array(got[1], "lrp_epsilon(A0, HEAD_NO_BIAS, eps=10.0)", shape=t.A0.shape)
    assert np.abs(R_big - gxi).max() > 1e-2 * np.abs(gxi).max(), "eps must enter the denominator"
    assert np.all(np.abs(R_big.sum(axis=1)) < np.abs(R.sum(axis=1))), "a larger eps must absorb relevance"


def calls_ex3_heatmap(t):
    m = t.name("model")
    return [t.call("lrp_heatmap", m, t.array("X4", t.X[:4])),
            t.call("lrp_heatmap", m, t.array("X4_8", t.X[4:8]), class_index=2, eps=0.1)]


def _ref_heat(t, images, class_index, eps):
    feats = t.head_features(images)
    out = feats
    for i, (W, b) in enumerate(t.HEAD):
        out = out @ W + b
        out = np.maximum(out, 0) if i == 0 else out
    classes = out.argmax(1) if class_index is None else np.full(len(images), class_index)
    R = ref_lrp(feats, t.HEAD, classes, eps).reshape(-1, 3, 3, 64).sum(-1)
    R_y, R_x = t.cam_matrices("conv3")
    return np.einsum("Hh,nhw,Ww->nHW", R_y, R, R_x)


def check_ex3_heatmap(t, got):
    heat = t.check_array(got[0], "lrp_heatmap(model, X[:4])", shape=(4, 28, 28))
    assert np.abs(heat).max() > 0, "the heatmap is all zeros"
    t.close(heat, _ref_heat(t, t.X[:4], None, 0.01), "lrp_heatmap(model, X[:4])", rtol=1e-3, atol=1e-5)
    t.close(got[1], _ref_heat(t, t.X[4:8], 2, 0.1), "lrp_heatmap(model, X[4:8], class_index=2, eps=0.1)",
            rtol=1e-3, atol=1e-5)


# --- exercise 4 ------------------------------------------------------------

def calls_ex4_reference(t):
    m = t.name("model")
    return [t.call("METHOD", kind="name"), t.call("my_attribution", m, t.array("X6", t.X[:6])),
            t.call("my_attribution", m, t.array("X6_10", t.X[6:10]), class_index=4),
            t.call("my_attribution", m, t.array("X10_13", t.X[10:13]), class_index=t.array("cls3", np.array([1, 7, 9])))]


def _method(got):
    method = got.text(0)
    assert method in ("grad_cam", "integrated_gradients"), \
        f"METHOD must be 'grad_cam' or 'integrated_gradients', got {method!r}"
    return method


def compare_attribution(t, method, mine, images, class_index=None, label=""):
    if method == "grad_cam":
        ref = t.reference("grad_cam", images, class_index=class_index)
        t.check_array(mine, f"my_attribution (grad_cam){label}", shape=ref.shape, low=0.0, high=1.0)
        t.close(mine, ref, f"Grad-CAM maps (class_index={class_index})", atol=0.03, rtol=0,
                hint="Average the gradients over the 3x3 positions, ReLU the weighted sum, place the 3x3 map on the "
                     "input with cnn_utils.cam_upsampling_matrices, then scale each map to [0, 1].")
    else:
        ref = t.reference("integrated_gradients", images, class_index=class_index, steps=50)
        mine = t.check_array(mine, f"my_attribution (integrated_gradients){label}", shape=ref.shape)
        err = np.linalg.norm((mine - ref).reshape(len(ref), -1), axis=1) / np.linalg.norm(ref.reshape(len(ref), -1), axis=1)
        assert err.max() < 0.03, (
            f"Integrated Gradients differ from the reference by up to {err.max():.1%} (tolerance 3 %). "
            "Check the baseline (black), the factor (x - baseline), and that you average the gradients of the "
            "pre-softmax score of ONE class along the path.")


def check_ex4_reference(t, got):
    method = _method(got)
    compare_attribution(t, method, got[1], t.X[:6])
    compare_attribution(t, method, got[2], t.X[6:10], class_index=4)
    compare_attribution(t, method, got[3], t.X[10:13], class_index=np.array([1, 7, 9]))


def calls_ex4_own_work(t):
    m = t.name("model")
    return [t.call("METHOD", kind="name"), t.call("my_attribution", m, t.array("X4", t.X[:4])),
            t.call("my_attribution", m, t.array("X4", t.X[:4]), class_index=t.array("Y4_next", (t.Y[:4] + 1) % 10))]


def check_ex4_own_work(t, got):
    method = _method(got)
    if method == "integrated_gradients":
        attr = t.check_array(got[1], "my_attribution(model, X[:4])", shape=t.X[:4].shape)
        scores, base = t.scores(t.X[:4]), t.scores(np.zeros_like(t.X[:4]))
        c = scores.argmax(axis=1)
        gap = attr.reshape(4, -1).sum(axis=1) - (scores[np.arange(4), c] - base[np.arange(4), c])
        assert np.all(np.abs(gap) < 0.05 * np.abs(scores[np.arange(4), c])), \
            "Completeness: the attributions should add up to S_c(x) - S_c(baseline) (within 5 %)."
    else:
        maps = t.check_array(got[1], "my_attribution (grad_cam)", shape=(4, 28, 28), low=0.0, high=1.0)
        top = maps.max(axis=(1, 2))
        assert np.all(np.isclose(top, 1.0) | (top == 0)), f"scale each Grad-CAM map to [0, 1] (maxima: {top})"
        other = t.check_array(got[2], "my_attribution(model, X[:4], class_index=...)", shape=(4, 28, 28))
        assert np.abs(other - maps).max() > 0.05, "class_index must change the explained class"


FORBIDDEN = ("grad_cam", "grad_cam_plus_plus", "integrated_gradients", "saliency_map", "smoothgrad", "score_cam")


def own_work_calls_ex4_own_work(t):
    return [t.call("METHOD", kind="name"), t.call("my_attribution", t.name("model"), t.array("X20_23", t.X[20:23]))]


def own_work_check_ex4_own_work(t, got):
    try:
        method, mine = _method(got), got[1]
    except AssertionError as err:
        raise AssertionError(
            f"my_attribution does not run where the course's attribution functions ({', '.join(FORBIDDEN)}) "
            f"do not exist ({err}): write the method yourself, with TensorFlow and NumPy.") from None
    ref = (t.reference("grad_cam", t.X[20:23]) if method == "grad_cam"
           else t.reference("integrated_gradients", t.X[20:23], steps=50))
    mine = t.check_array(mine, "my_attribution(model, X[20:23]) on its own", shape=ref.shape)
    assert np.linalg.norm(mine - ref) <= 0.05 * np.linalg.norm(ref), \
        "without the course's attribution functions your method does not match the reference: write it yourself"


#: Test cell (grade id) -> the suffix of its calls_* and check_* functions above.
TESTS = {gid: gid[:-len("_test")] for gid in (
    "ex1_tv_test", "ex1_score_test", "ex1_regularization_test", "ex2_norm_test", "ex2_sign_test",
    "ex2_success_test", "ex2_saliency_test", "ex2_plot_test", "ex3_conservation_test", "ex3_gxi_test",
    "ex3_heatmap_test", "ex4_reference_test", "ex4_own_work_test")}
CALLS = {gid: globals()[f"calls_{name}"] for gid, name in TESTS.items()}
CHECKS = {gid: globals()[f"check_{name}"] for gid, name in TESTS.items()}
OWN_WORK = {"ex4_own_work_test": (own_work_calls_ex4_own_work, own_work_check_ex4_own_work)}
