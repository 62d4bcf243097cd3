"""How close two feature sets lie: cosines of SAE directions, a frequency-matched random baseline,
bootstrap intervals and a permutation test.

Under superposition a gradient step along a target feature t moves every feature j by about
alpha * cos(d_j, d_t); so the closer a dataset's features lie to toxic ones, the more fine-tuning
on it spills over onto toxic behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from .errors import ConfigError

Statistic = Literal["nearest", "pairwise"]


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def cosine_to_set(directions: torch.Tensor, members: Sequence[int], targets: Sequence[int],
                  statistic: Statistic = "pairwise") -> torch.Tensor:
    """Per member: its largest cosine to a target (`nearest`) or its mean cosine (`pairwise`).

    A feature is never compared with itself: one shared by both sets would otherwise count as 1.
    """
    if statistic not in ("nearest", "pairwise"):
        raise ConfigError(f"geometry.statistic: {statistic!r}; choose 'nearest' or 'pairwise'")
    unit = unit_rows(directions.float())
    m, t = torch.as_tensor(list(members)), torch.as_tensor(list(targets))
    cos = unit[m] @ unit[t].T
    same = m.unsqueeze(1) == t.unsqueeze(0)
    if statistic == "nearest":
        return cos.masked_fill(same, float("-inf")).amax(dim=1)
    keep = (~same).float()
    return (cos * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)


def bootstrap_ci(values: torch.Tensor, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean, resampling the features."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(values), (n_boot, len(values)), generator=generator)
    means = values[draws].mean(dim=1)
    return (float(torch.quantile(means, 0.025)), float(torch.quantile(means, 0.975)))


def permutation_p_value(a: torch.Tensor, b: torch.Tensor, n_perm: int = 5000, seed: int = 0) -> float:
    """One-sided p that mean(a) exceeds mean(b) by chance, by shuffling the set labels."""
    observed = a.mean() - b.mean()
    pooled = torch.cat([a, b])
    generator = torch.Generator().manual_seed(seed)
    orders = torch.argsort(torch.rand(n_perm, len(pooled), generator=generator), dim=1)
    shuffled = pooled[orders]
    diffs = shuffled[:, : len(a)].mean(1) - shuffled[:, len(a) :].mean(1)
    return float(((diffs >= observed).sum() + 1) / (n_perm + 1))


def frequency_matched(frequency: torch.Tensor, like: Sequence[int], exclude: set[int], seed: int) -> list[int]:
    """For each feature in `like`, a random other live feature of nearly the same firing frequency."""
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.tensor([i for i in range(len(frequency)) if i not in exclude and frequency[i] > 0])
    if len(candidates) == 0:
        raise ConfigError("no live features left to draw a random baseline from")
    by_frequency = candidates[torch.argsort(frequency[candidates])]
    sorted_freq = frequency[by_frequency]
    window = max(5, len(candidates) // 50)
    chosen = []
    for i in like:
        centre = int(torch.searchsorted(sorted_freq, frequency[i]))
        lo = max(0, min(centre - window // 2, len(by_frequency) - window))
        pool = by_frequency[lo : lo + window]
        chosen.append(int(pool[torch.randint(len(pool), (1,), generator=generator)]))
    return chosen


@dataclass(frozen=True)
class LayerGeometry:
    layer: int
    statistic: str
    cos_inducing_toxic: float
    cos_control_toxic: float
    cos_random_toxic: float
    ci95: dict[str, tuple[float, float]]
    p_value: float
    """One-sided permutation p that inducing features lie closer to toxic ones than control features."""
    p_inducing_vs_random: float
    p_control_vs_random: float
    overlap: dict[str, int]
    """Features shared with the toxic set (they are not compared with themselves)."""
    cosines: dict[str, list[float]]
    """Each feature's own cosine, per set: the distributions behind the means."""


def compare_layer(directions: torch.Tensor, frequency: torch.Tensor, layer: int, inducing: Sequence[int],
                  control: Sequence[int], toxic: Sequence[int], statistic: Statistic = "pairwise",
                  n_random: int = 5, n_boot: int = 2000, n_perm: int = 5000, seed: int = 0) -> LayerGeometry:
    """Cosines of inducing, control and frequency-matched random features to the toxic set."""
    cos_i = cosine_to_set(directions, inducing, toxic, statistic)
    cos_c = cosine_to_set(directions, control, toxic, statistic)
    exclude = set(inducing) | set(control) | set(toxic)
    random_sets = [frequency_matched(frequency, inducing, exclude, seed + r) for r in range(n_random)]
    cos_r = torch.cat([cosine_to_set(directions, s, toxic, statistic) for s in random_sets])
    return LayerGeometry(
        layer=layer,
        statistic=statistic,
        cos_inducing_toxic=float(cos_i.mean()),
        cos_control_toxic=float(cos_c.mean()),
        cos_random_toxic=float(cos_r.mean()),
        ci95={
            "inducing": bootstrap_ci(cos_i, n_boot, seed),
            "control": bootstrap_ci(cos_c, n_boot, seed + 1),
            "random": bootstrap_ci(cos_r, n_boot, seed + 2),
        },
        p_value=permutation_p_value(cos_i, cos_c, n_perm, seed),
        p_inducing_vs_random=permutation_p_value(cos_i, cos_r, n_perm, seed + 1),
        p_control_vs_random=permutation_p_value(cos_c, cos_r, n_perm, seed + 2),
        overlap={"inducing": len(set(inducing) & set(toxic)), "control": len(set(control) & set(toxic))},
        cosines={name: [round(float(c), 5) for c in values]
                 for name, values in (("inducing", cos_i), ("control", cos_c), ("random", cos_r))},
    )
