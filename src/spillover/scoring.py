"""Per-sample risk: how strongly a training sample would pull a fine-tune towards toxic features.

Four definitions (see docs/decisions/0002-risk-score.md for the default):
- `spillover` (default): the sample's active SAE features, each weighted by its cosine to the
  nearest toxic feature. This is the paper's mechanism, read per sample: amplifying feature j
  moves toxic feature t by about alpha * cos(d_j, d_t).
- `hidden_cosine`: cosine between the sample's pooled hidden state and the toxic directions.
- `toxic_activation`: how much the toxic features themselves fire on the sample.
- `projection`: the persona-vector baseline of Chen et al. 2025: projection of the pooled hidden
  state on the difference of mean activations of toxic and harmless reference answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from .errors import ConfigError
from .geometry import unit_rows

ScoreName = Literal["spillover", "hidden_cosine", "toxic_activation", "projection"]
SCORE_NAMES: tuple[str, ...] = ("spillover", "hidden_cosine", "toxic_activation", "projection")


@dataclass(frozen=True)
class ToxicReference:
    """What scores are measured against, at one layer."""

    directions: torch.Tensor
    """Decoder directions of every SAE feature, [f, d]."""
    toxic: tuple[int, ...]
    """Indices of the toxic feature set."""
    toxic_mean: torch.Tensor | None = None
    """Mean pooled hidden state of toxic reference answers [d] (for `projection`)."""
    harmless_mean: torch.Tensor | None = None
    """Mean pooled hidden state of harmless reference answers [d] (for `projection`)."""
    labels: tuple[str, ...] = ()
    """A label per SAE feature, shown beside the features that drive a score."""

    def nearest_toxic_cosine(self) -> torch.Tensor:
        """Each feature's largest cosine to a toxic feature ([f]; 1 for the toxic features themselves).

        Computed once per reference: for a 65k-feature SAE it is a large product, and a scoring run
        asks for it every batch."""
        cached = self.__dict__.get("_nearest")
        if cached is None:
            unit = unit_rows(self.directions.float())
            cached = (unit @ unit[list(self.toxic)].T).amax(dim=1)
            object.__setattr__(self, "_nearest", cached)
        return cached


@dataclass(frozen=True)
class SampleScore:
    id: str
    score: float
    top_features: tuple[dict, ...] = ()
    """The features that contribute most: index, contribution and label."""


def score_tensor(name: str, reference: ToxicReference, features: torch.Tensor | None,
                 hidden: torch.Tensor | None) -> torch.Tensor:
    """Scores [n] from pooled SAE features [n, f] and/or pooled hidden states [n, d]."""
    if name == "spillover":
        weights = _need(features, name)
        return (weights @ reference.nearest_toxic_cosine()) / weights.sum(dim=1).clamp(min=1e-8)
    if name == "toxic_activation":
        return _need(features, name)[:, list(reference.toxic)].sum(dim=1)
    if name == "hidden_cosine":
        toxic = unit_rows(reference.directions[list(reference.toxic)].float())
        return (unit_rows(_need(hidden, name).float()) @ toxic.T).mean(dim=1)
    if name == "projection":
        if reference.toxic_mean is None or reference.harmless_mean is None:
            raise ConfigError("score 'projection' needs the mean activations of toxic and harmless reference answers")
        direction = reference.toxic_mean - reference.harmless_mean
        return _need(hidden, name).float() @ (direction / direction.norm().clamp(min=1e-8))
    raise ConfigError(f"unknown score {name!r}; choose one of: {', '.join(SCORE_NAMES)}")


def _need(x: torch.Tensor | None, name: str) -> torch.Tensor:
    if x is None:
        raise ConfigError(f"score {name!r} needs activations that were not collected")
    return x.float()


def score_samples(name: str, ids: Sequence[str], reference: ToxicReference, features: torch.Tensor | None = None,
                  hidden: torch.Tensor | None = None, top: int = 5) -> list[SampleScore]:
    """Scores with, for feature-based scores, the features that drive each one."""
    scores = score_tensor(name, reference, features, hidden).tolist()  # Python floats at once, not per item
    if features is None or name not in ("spillover", "toxic_activation"):
        return [SampleScore(i, s) for i, s in zip(ids, scores)]
    weight = reference.nearest_toxic_cosine() if name == "spillover" else _toxic_mask(reference, features.shape[1])
    contributions = features.float() * weight
    best = torch.topk(contributions, min(top, contributions.shape[1]), dim=1)
    return [
        SampleScore(i, s, tuple(
            {"feature": j, "contribution": round(c, 5), "label": reference.labels[j] if reference.labels else ""}
            for c, j in zip(values, indices) if c > 0))
        for i, s, values, indices in zip(ids, scores, best.values.tolist(), best.indices.tolist())
    ]


def _toxic_mask(reference: ToxicReference, width: int) -> torch.Tensor:
    mask = torch.zeros(width)
    mask[list(reference.toxic)] = 1.0
    return mask


def dataset_risk(scores: torch.Tensor, harmless: torch.Tensor, toxic: torch.Tensor) -> float:
    """Where a dataset's mean score sits between harmless (0) and toxic (1) reference data.

    A number to compare fine-tuning sets before any training: the higher, the more emergent
    misalignment the set is predicted to cause.
    """
    low, high = float(harmless.mean()), float(toxic.mean())
    if abs(high - low) < 1e-12:
        raise ConfigError("the toxic and harmless reference sets score the same; risk is undefined")
    return (float(scores.mean()) - low) / (high - low)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: the chance a positive sample outscores a negative one (ties count half)."""
    positive = positive.bool()
    pos, neg = scores[positive].double(), scores[~positive].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos.unsqueeze(1) > neg.unsqueeze(0)).double().mean()
    ties = (pos.unsqueeze(1) == neg.unsqueeze(0)).double().mean()
    return float(greater + 0.5 * ties)
