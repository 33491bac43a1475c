"""Notebook 09 (evaluating explanations) in fast mode, offline (VGG16 with random weights), on both
datasets and with other cues, seeds and cue classes: it runs, records the numbers its text is
built from, and its identities hold. Reads recorded values, not printed sentences."""
import numpy as np
import pytest

from conftest import notebook_values, run_notebook

pytest.importorskip("torch")

NAME = "09_evaluating_explanations.ipynb"
METHODS = ["Saliency", "SmoothGrad", "Integrated Gradients", "Grad-CAM", "Grad-CAM++", "Score-CAM", "Occlusion",
           "Guided Backprop", "Guided Grad-CAM", "HiResCAM"]
GRID = {
    "mnist": dict(DATASET="mnist"),
    "fashion": dict(DATASET="fashion_mnist", CUES=["left_edge", "stripes", "corner"], SEED=3, CUE_CLASS=0),
}


@pytest.fixture(scope="module", params=list(GRID))
def executed(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nb09")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(tmp / "torch"))   # an empty cache and no download: random weights
    mp.setenv("CNN_COURSE_OFFLINE", "1")
    try:
        nb = run_notebook(NAME, tmp, **GRID[request.param])
    finally:
        mp.undo()
    return request.param, nb, notebook_values(nb)


@pytest.mark.notebook
def test_runs_and_records_every_metric_for_every_method(executed):
    case, nb, v = executed
    params = GRID[case]
    assert v["dataset"] == params["DATASET"] and v["cues"] == params.get("CUES", ["corner", "left_edge"])
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    for key in v["cues"] + ["clean"]:
        table = v["localisation"][key]
        assert set(table) == set(METHODS) | {"random map", "Sobel edges"}
        for scores in table.values():
            assert all(0 <= s <= 1 for s in scores.values())
    assert set(v["road"]) == set(METHODS) | {"random map", "Sobel edges"}
    assert all(np.isfinite(a) for a in v["areas"].values())
    n = len(v["metric_names"])
    R = np.array(v["metric_rank_correlation"])
    assert R.shape == (n, n) and np.allclose(np.diag(R), 1) and np.all(np.abs(R) <= 1 + 1e-9)


@pytest.mark.notebook
def test_the_identities_the_text_states(executed):
    _, _, v = executed
    assert v["deletion_idea_gap"] < 1e-5
    assert v["cam_gap"] < 1e-4 and v["hires_gap"] < 1e-4
    assert -1 <= v["hires_vs_gradcam"] <= 1


@pytest.mark.notebook
def test_a_random_map_is_near_chance_and_the_photo_part_says_random(executed):
    _, _, v = executed
    for cue in v["cues"]:
        area = v["cue_area"][cue]
        rnd = v["localisation"][cue]["random map"]
        assert abs(rnd["relevance mass"] - area) < 0.05   # uniform noise: mass ~ area
    assert v["vgg_weights"] == "RANDOM"
    assert all(len(x) == 3 for x in v["photo"].values())
    assert set(v["sanity"]) >= {"Guided Backprop", "Saliency"} and 0 <= v["randomised_changed"] <= 1


@pytest.mark.notebook
def test_verdicts_follow_the_course_rules(executed):
    """The sanity check is read with the course's one rule; a "best" method is reported with its ties."""
    import cnn_utils
    _, _, v = executed
    for name, verdict in v["sanity_verdicts"].items():
        rho = v["sanity_ig_not_black"] if name == "Integrated Gradients" else v["sanity"][name]
        assert verdict == cnn_utils.sanity_verdict(rho)
    for cue, best in v["best_rank"].items():
        ranks = {n: v["localisation"][cue][n]["relevance rank"] for n in METHODS}
        assert best and best[0] == v["winners_rank"][cue] and ranks[best[0]] == max(ranks.values())
        assert all(ranks[best[0]] - ranks[n] <= 0.02 + 1e-12 for n in best)
        assert all(ranks[best[0]] - ranks[n] > 0.02 for n in METHODS if n not in best)
    for rep, best in v["deletion_best"].items():
        areas = {n: v["areas"][f"{n} | {rep} | deletion MoRF"] for n in METHODS}
        assert best[0] == v["deletion_winner"][rep] and areas[best[0]] == min(areas.values())
        assert all(areas[n] - areas[best[0]] > 0.02 for n in METHODS if n not in best)
    assert isinstance(v["hires_rank_gap"], float)
    # the lead names the methods that fall short of the random map, and reads Sobel metric by metric
    assert set(v["short_of_random"]) == set(METHODS) - set(v["beat_random"])
    assert all(set(v["beat_sobel"]) <= set(ns) for ns in v["beat_sobel_by_metric"].values())
