"""Gradient spillover in the toy model of superposition (Elhage et al. 2022).

The claim under test (Minegishi et al. 2026): when features share directions, a gradient step that
amplifies a target feature t moves every other feature j by about alpha * cos(d_j, d_t). Here n sparse
features live in m < n hidden dimensions, h = W x with W [m, n], and feature j is read back out by
its pre-activation f_j = W_j . h + b_j, x' = ReLU(W^T h + b). We train W, b until features sit in
superposition, fine-tune the model to amplify one feature t, and compare each other feature's change
in mean pre-activation on held-out inputs with alpha * cos(W_j, W_t), the columns taken before
fine-tuning.

The fine-tuning mimics narrow fine-tuning: every input has feature t active (plus the usual sparse
background of other features), the loss rewards a larger output for t, -mean ReLU(f_t), and a few
plain SGD steps update all parameters, so the update is literally the gradient. To first order the
step changes W_k by lr * E[x_k] W_t for k != t and W_t along the mean hidden state, so on held-out
inputs f_j moves by a term proportional to W_j . W_t, plus small terms from features that co-occur
with t in the fine-tuning data; the orthogonal negative control (n <= m) measures the latter.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import ConfigError, SpilloverError

log = logging.getLogger(__name__)

Vector = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class ToyModelConfig:
    n_features: int = 40
    """Sparse input features (n)."""
    n_hidden: int = 10
    """Hidden dimensions (m); superposition needs m < n."""
    feature_probability: float = 0.05
    """Chance that a feature is active in an input; active values are uniform on [0, 1]."""
    importance_decay: float = 1.0
    """Feature i weighs decay**i in the reconstruction loss; 1.0 is uniform importance."""
    train_steps: int = 2000
    """Adam steps of pre-training, each on a fresh batch."""
    batch_size: int = 1024
    lr: float = 3e-3
    """Adam learning rate of pre-training."""
    represented_norm: float = 0.5
    """A feature counts as represented when its column of W is at least this long (1 is perfect)."""
    ft_steps: int = 5
    """Plain SGD steps of fine-tuning per target: few and small, so first-order theory applies."""
    ft_lr: float = 1e-2
    ft_batch_size: int = 1024
    ft_background: bool = True
    """Keep the other features' sparse background in the fine-tuning inputs (False: t alone)."""
    eval_size: int = 8192
    """Held-out inputs from the pre-training distribution, on which mean pre-activations are compared."""
    n_targets: int | None = None
    """Target features per seed, drawn at random among represented ones; None takes all of them."""
    include_unrepresented: bool = False
    """Also score features whose column is shorter than represented_norm (their direction is noise)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One independently trained model per seed; the points of all seeds are pooled."""
    n_boot: int = 2000
    """Bootstrap resamples of (seed, target) groups for the 95% interval of the pooled Pearson."""

    def __post_init__(self) -> None:
        for name in ("n_features", "n_hidden", "train_steps", "batch_size", "ft_steps", "ft_batch_size",
                     "eval_size", "n_boot"):
            if getattr(self, name) < 1:
                raise ConfigError(f"theory.{name}: must be at least 1")
        if not 0 < self.feature_probability <= 1:
            raise ConfigError("theory.feature_probability: must be in (0, 1]")
        if self.importance_decay <= 0 or self.lr <= 0 or self.ft_lr <= 0:
            raise ConfigError("theory.importance_decay, theory.lr and theory.ft_lr must be positive")
        if self.n_targets is not None and self.n_targets < 1:
            raise ConfigError("theory.n_targets: must be at least 1, or None for all represented features")
        if not self.seeds:
            raise ConfigError("theory.seeds: give at least one seed")


@dataclass(frozen=True)
class ToyModel:
    W: torch.Tensor
    """Embedding [m, n]; column j is feature j's direction d_j."""
    b: torch.Tensor
    """Output bias [n]."""
    train_loss: float
    """Importance-weighted MSE of the last pre-training batch."""


@dataclass(frozen=True)
class TargetSpillover:
    seed: int
    target: int
    pearson: float
    spearman: float
    alpha: float
    """Least-squares slope through the origin of measured on cos, for this target alone."""
    target_gain: float
    """Change of the target's own mean pre-activation on held-out inputs."""
    mean_abs_spillover: float
    """Mean |change| of the other features' mean pre-activations."""
    n_points: int


@dataclass(frozen=True)
class ToySpilloverResult:
    pearson: float
    """Pooled over all seeds and targets: predicted alpha * cos against measured change."""
    spearman: float
    alpha: float
    """One least-squares slope through the origin for all points (pre-activation change per unit cos)."""
    ci95: tuple[float, float]
    """Bootstrap percentile interval of the pooled Pearson, resampling (seed, target) groups."""
    n_points: int
    mean_abs_spillover: float
    """Mean |measured| over all points: how far fine-tuning on t moves the other features."""
    mean_target_gain: float
    """Mean change of the targets' own pre-activations; the scale the spillover is judged against."""
    n_represented: list[int]
    """Represented features per seed, out of n_features, in n_hidden dimensions."""
    max_abs_cos: list[float]
    """Per seed, the largest |cos| between two represented features: 0 means no shared directions."""
    per_target: list[TargetSpillover] = field(default_factory=list)
    predicted: list[float] = field(default_factory=list)
    measured: list[float] = field(default_factory=list)


@contextmanager
def _single_thread() -> Iterator[None]:
    """The matrices are tiny: thread hand-offs cost more than they save, badly so on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def sample_features(n_samples: int, config: ToyModelConfig, generator: torch.Generator,
                    clamp: int | None = None) -> torch.Tensor:
    """Sparse inputs [n_samples, n]; `clamp` forces that feature active (and, without background, alone)."""
    values, gates = torch.rand(2, n_samples, config.n_features, generator=generator)
    x = values * (gates < config.feature_probability)
    if clamp is not None:
        if not config.ft_background:
            x = torch.zeros_like(x)
        x[:, clamp] = torch.rand(n_samples, generator=generator)
    return x


def pre_activations(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f = W^T W x + b for a batch of row vectors: each feature's read-out before the ReLU."""
    return (x @ W.T) @ W + b


def train_toy_model(config: ToyModelConfig, seed: int) -> ToyModel:
    """Pre-train with importance-weighted MSE on fresh sparse batches (Adam, as Elhage et al.)."""
    generator = torch.Generator().manual_seed(seed)
    n, m = config.n_features, config.n_hidden
    W = (torch.randn(m, n, generator=generator) * (2.0 / (m + n)) ** 0.5).requires_grad_()
    b = torch.zeros(n, requires_grad=True)
    importance = config.importance_decay ** torch.arange(n, dtype=torch.float32)
    optimizer = torch.optim.Adam([W, b], lr=config.lr)
    with _single_thread():
        for _ in range(config.train_steps):
            x = sample_features(config.batch_size, config, generator)
            loss = (importance * (torch.relu(pre_activations(W, b, x)) - x) ** 2).sum(dim=1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return ToyModel(W=W.detach(), b=b.detach(), train_loss=float(loss.detach()))


def represented_features(W: torch.Tensor, threshold: float = 0.5) -> list[int]:
    """Features whose column of W is long enough to be read back out."""
    return torch.nonzero(W.norm(dim=0) >= threshold).flatten().tolist()


def direction_cosines(W: torch.Tensor) -> torch.Tensor:
    """cos(d_i, d_j) [n, n] between the columns of W."""
    unit = W / W.norm(dim=0, keepdim=True).clamp(min=1e-12)
    return unit.T @ unit


def finetune_target(model: ToyModel, target: int, config: ToyModelConfig,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A few SGD steps on all parameters that reward a larger output of `target` on inputs that contain it."""
    W, b = model.W.clone().requires_grad_(), model.b.clone().requires_grad_()
    optimizer = torch.optim.SGD([W, b], lr=config.ft_lr)
    for _ in range(config.ft_steps):
        x = sample_features(config.ft_batch_size, config, generator, clamp=target)
        loss = -torch.relu(pre_activations(W, b, x)[:, target]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return W.detach(), b.detach()


def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span (as Spearman needs)."""
    x = _finite_vector(values, "values")
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; nan when either side is constant (it is undefined there)."""
    a, b = _paired(x, y)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation: Pearson of average ranks, so ties are handled as usual."""
    a, b = _paired(x, y)
    return pearson(average_ranks(a), average_ranks(b))


def _finite_vector(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or not np.isfinite(x).all():
        raise ConfigError(f"{name}: need a 1-D sequence of finite numbers")
    return x


def _paired(x: Vector, y: Vector) -> tuple[np.ndarray, np.ndarray]:
    a, b = _finite_vector(x, "x"), _finite_vector(y, "y")
    if len(a) != len(b) or len(a) < 2:
        raise ConfigError(f"correlation: need two sequences of equal length >= 2, got {len(a)} and {len(b)}")
    return a, b


def _slope_through_origin(x: np.ndarray, y: np.ndarray) -> float:
    denominator = float((x * x).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def _seed_spillover(config: ToyModelConfig,
                    seed: int) -> tuple[list[TargetSpillover], list[np.ndarray], list[int], float]:
    """Train one model and fine-tune it on each target in turn.

    Returns the per-target records, a [cos, measured] array per target, the represented features and
    their largest |cos| to one another.
    """
    model = train_toy_model(config, seed)
    represented = represented_features(model.W, config.represented_norm)
    log.info("toy model seed %d: loss %.4f, %d of %d features represented in %d dimensions", seed,
             model.train_loss, len(represented), config.n_features, config.n_hidden)
    if len(represented) < 2:
        raise SpilloverError(f"toy model seed {seed}: fewer than 2 features represented; train longer")
    generator = torch.Generator().manual_seed(10_000 + seed)
    held_out = sample_features(config.eval_size, config, generator)
    targets = represented
    if config.n_targets is not None and config.n_targets < len(represented):
        pick = torch.randperm(len(represented), generator=generator)[: config.n_targets]
        targets = sorted(represented[i] for i in pick.tolist())
    scored = list(range(config.n_features)) if config.include_unrepresented else represented
    cos = direction_cosines(model.W)
    interference = cos[represented][:, represented] - torch.eye(len(represented))
    before = pre_activations(model.W, model.b, held_out).mean(dim=0)
    records, points = [], []
    with _single_thread():
        for target in targets:
            # Each target gets its own stream, so its result does not depend on which others were drawn.
            ft_generator = torch.Generator().manual_seed(seed * 100_003 + target)
            W, b = finetune_target(model, target, config, ft_generator)
            delta = pre_activations(W, b, held_out).mean(dim=0) - before
            others = [j for j in scored if j != target]
            c, d = cos[others, target].double().numpy(), delta[others].double().numpy()
            points.append(np.stack([c, d]))
            records.append(TargetSpillover(
                seed=seed, target=target, pearson=pearson(c, d) if len(c) > 1 else float("nan"),
                spearman=spearman(c, d) if len(c) > 1 else float("nan"),
                alpha=_slope_through_origin(c, d), target_gain=float(delta[target]),
                mean_abs_spillover=float(np.abs(d).mean()), n_points=len(c)))
    return records, points, represented, float(interference.abs().max())


def _bootstrap_pearson(groups: list[np.ndarray], alpha: float, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile interval of the pooled Pearson, resampling whole (seed, target) groups."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pooled = np.concatenate([groups[i] for i in rng.integers(len(groups), size=len(groups))], axis=1)
        r = pearson(alpha * pooled[0], pooled[1])
        if np.isfinite(r):
            values.append(r)
    if not values:
        return (float("nan"), float("nan"))
    return (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))


def run_toy_spillover(config: ToyModelConfig = ToyModelConfig()) -> ToySpilloverResult:
    """Fit alpha once over all pooled points and score alpha * cos(d_j, d_t) against measured changes."""
    records: list[TargetSpillover] = []
    groups: list[np.ndarray] = []
    n_represented, max_abs_cos = [], []
    for seed in config.seeds:
        seed_records, seed_points, represented, interference = _seed_spillover(config, seed)
        records += seed_records
        groups += seed_points
        n_represented.append(len(represented))
        max_abs_cos.append(interference)
    cos, measured = np.concatenate(groups, axis=1)
    if len(cos) < 3:
        raise SpilloverError(f"toy spillover: only {len(cos)} points to correlate; use more features")
    alpha = _slope_through_origin(cos, measured)
    predicted = alpha * cos
    result = ToySpilloverResult(
        pearson=pearson(predicted, measured),
        spearman=spearman(predicted, measured),
        alpha=alpha,
        ci95=_bootstrap_pearson(groups, alpha, config.n_boot, seed=config.seeds[0]),
        n_points=len(cos),
        mean_abs_spillover=float(np.abs(measured).mean()),
        mean_target_gain=float(np.mean([r.target_gain for r in records])),
        n_represented=n_represented,
        max_abs_cos=max_abs_cos,
        per_target=records,
        predicted=predicted.tolist(),
        measured=measured.tolist(),
    )
    log.info("toy spillover: pearson %.3f (95%% CI %.3f-%.3f), spearman %.3f, alpha %.3g, %d points",
             result.pearson, *result.ci95, result.spearman, result.alpha, result.n_points)
    return result


def plot_spillover(predicted: Sequence[float], measured: Sequence[float], path: str | Path,
                   title: str = "Gradient spillover in the toy model") -> Path:
    """Scatter of measured against predicted change, with the identity line the theory claims."""
    from .plots import plt, save_figure  # matplotlib loads only when a figure is asked for

    x, y = _paired(predicted, measured)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(x, y, s=6, alpha=0.4, linewidths=0)
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="measured = predicted")
    ax.ticklabel_format(style="sci", scilimits=(-2, 3))  # changes are ~1e-4: keep tick labels short
    ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    ax.set_xlabel("predicted  alpha * cos(d_j, d_t)")
    ax.set_ylabel("measured  change of mean pre-activation f_j")
    ax.set_title(f"{title}\nPearson {pearson(x, y):.3f}, Spearman {spearman(x, y):.3f}, n = {len(x)}")
    ax.legend(loc="upper left", frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)
