import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from spillover.errors import ConfigError
from spillover.theory import (ToyModelConfig, average_ranks, direction_cosines, pearson, plot_spillover,
                              represented_features, run_toy_spillover, spearman, train_toy_model)

SUPERPOSED = ToyModelConfig()  # 40 features in 10 dimensions, p = 0.05, 3 seeds
ORTHOGONAL = ToyModelConfig(n_features=8, seeds=(0,))  # room for every feature: no shared directions


@pytest.fixture(scope="module")
def superposed():
    return run_toy_spillover(SUPERPOSED)


@pytest.fixture(scope="module")
def orthogonal():
    return run_toy_spillover(ORTHOGONAL)


def test_toy_model_reaches_superposition():
    model = train_toy_model(SUPERPOSED, seed=0)
    represented = represented_features(model.W, SUPERPOSED.represented_norm)
    assert len(represented) > 2 * SUPERPOSED.n_hidden
    cos = direction_cosines(model.W)[represented][:, represented]
    off_diagonal = cos[~torch.eye(len(represented), dtype=torch.bool)].abs()
    assert off_diagonal.max() > 0.3 and off_diagonal.mean() > 0.1  # directions are shared, not orthogonal


def test_every_seed_is_superposed(superposed):
    assert all(n > 2 * SUPERPOSED.n_hidden for n in superposed.n_represented)
    assert all(c > 0.3 for c in superposed.max_abs_cos)


def test_spillover_follows_cosine(superposed):
    assert superposed.pearson >= 0.9
    assert superposed.ci95[0] >= 0.9 and superposed.ci95[0] <= superposed.pearson <= superposed.ci95[1]
    assert superposed.spearman >= 0.9 and superposed.alpha > 0
    assert superposed.n_points == len(superposed.predicted) == len(superposed.measured)
    assert len({(r.seed, r.target) for r in superposed.per_target}) == len(superposed.per_target) >= 30
    assert superposed.mean_target_gain > 0


def test_orthogonal_features_do_not_spill_over(superposed, orthogonal):
    assert orthogonal.n_represented == [ORTHOGONAL.n_features] and orthogonal.max_abs_cos[0] < 0.05
    ratio = orthogonal.mean_abs_spillover / orthogonal.mean_target_gain
    assert ratio < 0.15 * superposed.mean_abs_spillover / superposed.mean_target_gain


def test_without_co_occurring_features_orthogonal_spillover_vanishes():
    result = run_toy_spillover(ToyModelConfig(n_features=8, seeds=(0,), ft_background=False))
    assert result.mean_abs_spillover < 1e-4 * result.mean_target_gain


def test_same_seed_same_result():
    config = ToyModelConfig(train_steps=150, seeds=(3,), n_targets=4, n_boot=50)
    first, second = run_toy_spillover(config), run_toy_spillover(config)
    assert first == second


def test_spearman_known_answers():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 100, 10_000]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6*4 / (5*24)
    # ties take the mean rank: x -> [1, 2.5, 2.5, 4]; Pearson of ranks gives 0.9486833
    np.testing.assert_allclose(average_ranks([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    assert spearman([10, 20, 20, 30], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    np.testing.assert_allclose(average_ranks([3, 1, 3, 3, 2]), [4, 1, 4, 4, 2])
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ConfigError):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ConfigError):
        pearson([1.0, float("nan")], [1.0, 2.0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=3, max_size=30))
def test_average_ranks_sum_and_monotone(values):
    ranks = average_ranks(values)
    assert ranks.sum() == pytest.approx(len(values) * (len(values) + 1) / 2)
    order = np.argsort(values, kind="mergesort")
    assert np.all(np.diff(ranks[order]) >= 0)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError):
        ToyModelConfig(feature_probability=0)
    with pytest.raises(ConfigError):
        ToyModelConfig(seeds=())


def test_plot_writes_png(tmp_path, superposed):
    path = plot_spillover(superposed.predicted, superposed.measured, tmp_path / "fig" / "spill.png", "toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_token_readings_read_a_known_shift(organism):
    """Shift layer 1's residual by a fixed vector v: every feature that fires reads d_j . v where it
    fires, a feature that never fires reads NaN (not a zero that would rank), and adding v, which is
    also the mean shift, to every token reproduces the measured activation change."""
    import copy

    from spillover.lm import decoder_blocks
    from spillover.organism.datasets import finetune_set
    from spillover.organism.theory import token_readings
    from spillover.sae import SaeConfig, SparseAutoencoder

    torch.manual_seed(0)
    d = organism.model.config.hidden_size
    sae = SparseAutoencoder(SaeConfig(d_in=d, d_sae=32, architecture="topk", k=2))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
        sae.b_enc[0] = -1e6  # feature 0 can never fire
    shift = torch.randn(d)
    shifted = copy.deepcopy(organism.model)
    decoder_blocks(shifted)[1].register_forward_hook(
        lambda _m, _i, out: (out[0] + shift, *out[1:]) if isinstance(out, tuple) else out + shift)
    samples = finetune_set(organism.world, "inducing", 8, seed=0)
    readings = token_readings(organism, shifted, 1, sae, samples, predicted_shift=shift)
    read = readings["readout_where_active"]
    expected = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1) @ shift
    assert math.isnan(read[0])
    fired = read.isfinite()
    assert fired.sum() > 10
    assert torch.allclose(read[fired], expected[fired], atol=1e-4)
    assert readings["activation"].abs().sum() > 0.1
    for pushed in ("activation_of_predicted_shift", "activation_of_mean_shift"):
        assert torch.allclose(readings[pushed], readings["activation"], atol=1e-4)


def test_the_theory_summary_line_shows_the_activation_readings_beside_the_read_out():
    from spillover.organism.theory import summary_line

    layers = [{"layer": layer, "readout": {"mean_target_gain": gain}, "activation": {"spearman": 0.1 * layer},
               "activation_of_uniform_shift": {"theory_spearman": 0.2 * layer,
                                               "mean_shift_spearman": 0.3 * layer}}
              for layer, gain in ((0, 0.01), (1, 0.07), (2, 0.04))]
    report = {"toy": {"pearson": 0.99931}, "organism": layers,
              "organism_headline": {"layer": 1, "rule": "largest gain", "spearman": 0.7194}}
    assert summary_line(report) == (
        "toy model Pearson 0.9993; organism at layer 1 (largest gain): read-out Spearman 0.719, "
        "SAE activation 0.100 (the theory's shift read by the SAE 0.200, the measured mean shift 0.300)")
