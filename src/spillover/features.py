"""Features tied to a dataset: the SAE latents whose per-sample activation best separates it from a contrast set."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from .errors import ConfigError, InputError
from .io import atomic_write_json

Method = Literal["correlation", "mean_diff"]


@dataclass(frozen=True)
class FeatureSet:
    """Top-k features of one layer's SAE for a dataset, with the statistics that chose them."""

    name: str
    layer: int
    method: str
    indices: tuple[int, ...]
    scores: tuple[float, ...]
    """Point-biserial r (or mean difference) of each feature with the dataset label."""
    frequencies: tuple[float, ...]
    """Share of the dataset's samples on which each feature fires."""
    labels: tuple[str, ...] = ()
    """Logit-lens top tokens of each feature's decoder direction, when known."""
    examples: tuple[tuple[str, ...], ...] = ()
    """Per feature, the dataset's samples on which it fires most (their last answer, shortened)."""

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSet":
        try:
            raw = json.loads(Path(path).read_text())
            raw["examples"] = [tuple(e) for e in raw.get("examples", [])]
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        except FileNotFoundError:
            raise InputError(f"{path}: no such feature set file") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise InputError(f"{path}: not a feature set ({exc})") from None


def point_biserial(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correlation of each column of x [n, f] with a binary label y [n]; 0 for constant columns."""
    y = y.bool()
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise ConfigError("feature selection needs samples of both the dataset and its contrast set")
    x = x.double()
    diff = x[y].mean(0) - x[~y].mean(0)
    std = x.std(0, unbiased=False)
    n = n1 + n0
    r = diff / std.clamp(min=1e-12) * (n1 * n0 / n**2) ** 0.5
    return torch.where(std > 1e-12, r, torch.zeros_like(r)).float()


def select_features(
    positive: torch.Tensor,
    negative: torch.Tensor,
    name: str,
    layer: int,
    k: int = 100,
    method: Method = "correlation",
    live: torch.Tensor | None = None,
    labels: Sequence[str] | None = None,
) -> FeatureSet:
    """The k features most tied to `positive` [n1, f] against `negative` [n0, f].

    Dead features (never firing on either set, or outside `live`) are never chosen.
    """
    if method not in ("correlation", "mean_diff"):
        raise ConfigError(f"features.method: {method!r}; choose 'correlation' or 'mean_diff'")
    x = torch.cat([positive, negative])
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))])
    if method == "correlation":
        score = point_biserial(x, y)
    else:
        score = positive.float().mean(0) - negative.float().mean(0)
    alive = (x > 0).any(0) if live is None else live & (x > 0).any(0)
    score = torch.where(alive, score, torch.full_like(score, float("-inf")))
    k = min(k, int(alive.sum()))
    if k < 1:
        raise ConfigError(f"no live features to select for {name!r} at layer {layer}")
    top = torch.topk(score, k).indices
    frequency = (positive[:, top] > 0).float().mean(0)
    return FeatureSet(
        name=name,
        layer=layer,
        method=method,
        indices=tuple(int(i) for i in top),
        scores=tuple(round(float(s), 6) for s in score[top]),
        frequencies=tuple(round(float(f), 6) for f in frequency),
        labels=tuple(labels[int(i)] for i in top) if labels is not None else (),
    )


def logit_lens_labels(directions: torch.Tensor, unembedding: torch.Tensor, tokenizer, top: int = 5) -> list[str]:
    """Top tokens each decoder direction [f, d] promotes through the unembedding [V, d]."""
    logits = directions.float() @ unembedding.float().T
    best = torch.topk(logits, min(top, logits.shape[1]), dim=1).indices
    return [" ".join(tokenizer.convert_ids_to_tokens(row.tolist())) for row in best]


def top_activating(features: torch.Tensor, ids: Sequence[str], indices: Sequence[int], n: int = 5) -> dict[int, list[str]]:
    """For each feature, the ids of the samples on which its pooled activation is highest."""
    n = min(n, features.shape[0])
    return {int(i): [ids[j] for j in torch.topk(features[:, i], n).indices.tolist()] for i in indices}
