import pytest
import torch
from hypothesis import given, strategies as st

from spillover.errors import ConfigError
from spillover.scoring import SCORE_NAMES, ToxicReference, auroc, dataset_risk, score_samples, score_tensor


def reference():
    directions = torch.eye(4)
    directions[1] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # feature 1 leans on toxic feature 0
    return ToxicReference(directions, (0,), toxic_mean=torch.tensor([1.0, 0, 0, 0]),
                          harmless_mean=torch.tensor([0.0, 0, 0, 1]), labels=("tox", "near", "far", "other"))


def test_spillover_weights_active_features_by_their_nearest_toxic_cosine():
    features = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    scores = score_tensor("spillover", reference(), features, None)
    assert scores.tolist() == pytest.approx([2**-0.5, 0.0, 1.0])


def test_each_score_ranks_a_toxic_sample_above_a_harmless_one():
    features = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    hidden = torch.tensor([[1.0, 0.2, 0.0, 0.0], [0.0, 0.0, 0.3, 1.0]])
    for name in SCORE_NAMES:
        toxic, harmless = score_tensor(name, reference(), features, hidden).tolist()
        assert toxic > harmless, name


def test_top_features_carry_labels_and_contributions():
    (scored,) = score_samples("spillover", ["a"], reference(), torch.tensor([[0.0, 2.0, 1.0, 0.0]]))
    assert scored.top_features[0]["label"] == "near"
    assert scored.top_features[0]["contribution"] == pytest.approx(2 * 2**-0.5, abs=1e-4)


def test_missing_inputs_and_unknown_scores_are_refused():
    with pytest.raises(ConfigError, match="needs activations"):
        score_tensor("spillover", reference(), None, torch.zeros(1, 4))
    with pytest.raises(ConfigError, match="choose one of"):
        score_tensor("vibes", reference(), torch.zeros(1, 4), None)
    with pytest.raises(ConfigError, match="projection"):
        score_tensor("projection", ToxicReference(torch.eye(4), (0,)), None, torch.zeros(1, 4))


def test_dataset_risk_is_zero_for_harmless_and_one_for_toxic():
    harmless, toxic = torch.tensor([0.1, 0.3]), torch.tensor([0.9, 1.1])
    assert dataset_risk(harmless, harmless, toxic) == pytest.approx(0.0)
    assert dataset_risk(toxic, harmless, toxic) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        dataset_risk(toxic, toxic, toxic)


def test_auroc_known_values():
    labels = torch.tensor([1, 1, 0, 0])
    assert auroc(torch.tensor([4.0, 3, 2, 1]), labels) == 1.0
    assert auroc(torch.tensor([1.0, 2, 3, 4]), labels) == 0.0
    assert auroc(torch.tensor([1.0, 1, 1, 1]), labels) == 0.5


@given(st.lists(st.floats(-5, 5), min_size=4, max_size=30), st.data())
def test_auroc_flips_when_scores_are_negated(values, data):
    labels = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values))))
    scores = torch.tensor(values)
    a, b = auroc(scores, labels), auroc(-scores, labels)
    if labels.all() or not labels.any():
        return
    assert a + b == pytest.approx(1.0)
