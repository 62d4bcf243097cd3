import pytest
import torch
from hypothesis import given, settings, strategies as st

from spillover.errors import ConfigError
from spillover.features import FeatureSet, point_biserial, select_features
from spillover.geometry import (bootstrap_ci, compare_layer, cosine_to_set, frequency_matched,
                                permutation_p_value, unit_rows)


def test_point_biserial_equals_pearson_with_the_label():
    torch.manual_seed(0)
    x, y = torch.randn(200, 3), (torch.rand(200) > 0.3).float()
    x[:, 1] += 2 * y
    expected = [torch.corrcoef(torch.stack([x[:, j], y]))[0, 1] for j in range(3)]
    assert torch.allclose(point_biserial(x, y), torch.stack(expected), atol=1e-5)


def test_selection_finds_planted_features_and_skips_dead_ones():
    torch.manual_seed(0)
    pos, neg = torch.rand(100, 50), torch.rand(100, 50)
    pos[:, [3, 17, 41]] += 1.0
    pos[:, 9], neg[:, 9] = 0, 0
    chosen = select_features(pos, neg, "inducing", layer=0, k=3)
    assert set(chosen.indices) == {3, 17, 41}
    assert 9 not in select_features(pos, neg, "x", 0, k=50, method="mean_diff").indices


def test_feature_set_round_trips(tmp_path):
    fs = FeatureSet("toxic", 2, "correlation", (1, 2), (0.5, 0.4), (0.9, 0.8), ("a b", "c d"))
    assert FeatureSet.load(fs.save(tmp_path / "fs.json")) == fs


def test_nearest_cosine_ignores_self_matches():
    d = torch.eye(4)
    d[1] = torch.tensor([1.0, 1.0, 0, 0])
    near = cosine_to_set(d, [0, 2], [0, 1], "nearest")
    assert near[0] == pytest.approx(2**-0.5) and near[1] == pytest.approx(0.0)
    with pytest.raises(ConfigError):
        cosine_to_set(d, [0], [1], "median")


@pytest.mark.parametrize("statistic, margin", [("nearest", 0.2), ("pairwise", 0.03)])
def test_planted_geometry_is_detected(statistic, margin):
    """Each inducing feature leans towards one of 20 toxic features: its nearest cosine rises a lot,
    its mean cosine to all 20 by about a twentieth of that."""
    torch.manual_seed(1)
    d, f = 32, 400
    directions = unit_rows(torch.randn(f, d))
    toxic, inducing, control = list(range(0, 20)), list(range(20, 60)), list(range(60, 100))
    for i in inducing:  # inducing features lean towards a toxic one
        directions[i] = unit_rows(directions[i] + 1.5 * directions[toxic[i % 20]])
    frequency = torch.rand(f)
    geometry = compare_layer(directions, frequency, 0, inducing, control, toxic, n_perm=2000, statistic=statistic)
    assert geometry.cos_inducing_toxic > geometry.cos_control_toxic + margin
    assert geometry.p_value < 0.01
    assert geometry.p_control_vs_random > 0.01
    lo, hi = geometry.ci95["inducing"]
    assert lo <= geometry.cos_inducing_toxic <= hi


def test_permutation_p_is_uniformish_under_the_null():
    torch.manual_seed(2)
    ps = [permutation_p_value(torch.randn(30), torch.randn(30), n_perm=300, seed=s) for s in range(40)]
    assert 0.25 < sum(ps) / len(ps) < 0.75


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=2, max_size=50))
def test_bootstrap_interval_brackets_the_mean(values):
    v = torch.tensor(values)
    lo, hi = bootstrap_ci(v, n_boot=200)
    assert lo - 1e-6 <= float(v.mean()) <= hi + 1e-6


def test_frequency_matched_draws_similar_frequencies():
    frequency = torch.linspace(0.0, 1.0, 1000)
    like = [100, 500, 900]
    drawn = frequency_matched(frequency, like, exclude=set(like), seed=0)
    assert all(abs(frequency[a] - frequency[b]) < 0.02 for a, b in zip(like, drawn))
    assert not set(drawn) & set(like)
