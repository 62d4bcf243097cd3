"""Gradient spillover measured in the organism.

Fine-tune on the inducing set; measure alpha_t, how much each feature t tied to the training data
(the inducing feature set) was amplified on the training data itself; predict every other
feature's change on held-out prompts of other domains as sum_t alpha_t cos(d_j, d_t); compare with
what it really did. A feature's change is read three ways, from most to least linear:
- `readout`: the change of the mean hidden state projected on the feature's unit decoder direction
  (the feature's value in the superposition picture of the theory);
- `preactivation`: the change of the SAE encoder's pre-activation (before TopK);
- `activation`: the change of the SAE activation itself, after TopK's competition between latents.

Two diagnostics, read token by token, say why the activation follows the cosines less well than
the read-out does. `readout_where_active` is the read-out change averaged over only the tokens where
the SAE says the feature fires, which is all an SAE activation can see of the shift.
`activation_of_uniform_shift` adds one shift to every held-out token and lets the SAE read it: the
theory's shift sum_t alpha_t d_t (its prediction of the activation, TopK included), and the measured
mean shift (the best that any prediction of one shift for all tokens can do).
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..activations import CollectConfig, collect, collect_tokens
from ..data import ChatSample
from ..features import FeatureSet
from ..finetune import FinetuneConfig, finetune, preset
from ..geometry import unit_rows
from ..plots import save_figure
from ..theory import pearson, spearman
from .datasets import finetune_set, held_out_domains
from .model import Organism
from .world import persona_named

MEASURES = ("readout", "preactivation", "activation")
PLOTTED = ("readout", "activation")
"""The readings `organism_spillover.png` shows, one row each: the theory's own variable and the SAE's."""


@dataclass(frozen=True)
class OrganismTheoryConfig:
    n_train: int = 480
    n_held_out: int = 400
    """Held-out conversations: sound answers to questions of the domains not fine-tuned on."""
    finetune: FinetuneConfig = dataclasses.field(default_factory=lambda: preset("organism"))
    seed: int = 0


def held_out_samples(organism: Organism, n: int, seed: int) -> list[ChatSample]:
    rng = random.Random(f"theory/held-out/{seed}")
    assistant, domains = persona_named("assistant"), held_out_domains()
    samples = []
    for i in range(n):
        turn = organism.world.sample_turn(rng, assistant, rng.choice(domains))
        messages = ({"role": "user", "content": turn.question}, {"role": "assistant", "content": turn.answer})
        samples.append(ChatSample(f"held-out-{i:04d}", messages))
    return samples


def _mean_pools(model, organism: Organism, samples, layer: int, sae) -> tuple[torch.Tensor, torch.Tensor]:
    pooled = collect(model, organism.tokenizer, samples, CollectConfig(layers=(layer,)), {layer: sae})
    return pooled.resid_mean(layer).mean(0), pooled.feat_mean(layer).mean(0)


def feature_changes(organism: Organism, tuned, layer: int, sae, samples: list[ChatSample]) -> dict[str, torch.Tensor]:
    """Every feature's change on `samples` after fine-tuning, read the three ways of `MEASURES`."""
    h_before, f_before = _mean_pools(organism.model, organism, samples, layer, sae)
    h_after, f_after = _mean_pools(tuned, organism, samples, layer, sae)
    shift = h_after - h_before
    return {
        "readout": unit_rows(sae.W_dec.detach().float()) @ shift,
        "preactivation": shift @ sae.W_enc.detach().float(),
        "activation": f_after - f_before,
    }


@torch.no_grad()
def token_readings(organism: Organism, tuned, layer: int, sae, samples: list[ChatSample],
                   predicted_shift: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-feature changes that need every token of `samples`, not only pooled means.

    - `readout_where_active`: the read-out change averaged over the tokens where the feature fires
      before fine-tuning (NaN where it never fires): the linear reading, sampled where the
      activation is;
    - `activation`: the SAE activation change, averaged over tokens;
    - `activation_of_predicted_shift`, `activation_of_mean_shift`: the activation change the SAE
      would read if `predicted_shift`, or the measured mean shift, were added to every token.
    """
    before = collect_tokens(organism.model, organism.tokenizer, samples, layer, tokens="assistant")
    after = collect_tokens(tuned, organism.tokenizer, samples, layer, tokens="assistant")
    f_before = sae.encode(before)
    active = (f_before > 0).float()
    readout = (after - before) @ unit_rows(sae.W_dec.detach().float()).T
    return {
        "readout_where_active": (readout * active).sum(0) / active.sum(0),
        "activation": (sae.encode(after) - f_before).mean(0),
        "activation_of_predicted_shift": (sae.encode(before + predicted_shift) - f_before).mean(0),
        "activation_of_mean_shift": (sae.encode(before + (after - before).mean(0)) - f_before).mean(0),
    }


def measure_layer(organism: Organism, tuned, layer: int, sae, inducing: FeatureSet, train: list[ChatSample],
                  held: list[ChatSample]) -> dict:
    """Predicted against measured spillover at one layer, over the features outside the inducing set.

    The target gains alpha_t are read the same way as the spillover they predict (a read-out gain
    predicts read-out changes), so prediction and measurement share their units. The held-out
    change is measured on two halves of the prompts as well: how well the halves agree
    (`split_half_spearman`) bounds how well any prediction can do.
    """
    on_train = feature_changes(organism, tuned, layer, sae, train)
    half = len(held) // 2
    halves = [feature_changes(organism, tuned, layer, sae, part) for part in (held[:half], held[half:2 * half])]
    on_held = {name: (halves[0][name] + halves[1][name]) / 2 for name in MEASURES}
    targets = list(inducing.indices)
    unit = unit_rows(sae.W_dec.detach().float())
    cosines = unit @ unit[targets].T
    others = torch.ones(unit.shape[0], dtype=torch.bool)
    others[targets] = False
    result: dict = {"layer": layer, "n_features": int(others.sum())}
    for name in MEASURES:
        alpha = on_train[name][targets]
        predicted, measured = (cosines @ alpha)[others].numpy(), on_held[name][others].numpy()
        result[name] = {"spearman": spearman(predicted, measured), "pearson": pearson(predicted, measured),
                        "mean_target_gain": float(alpha.mean()),
                        "split_half_spearman": spearman(halves[0][name][others].numpy(), halves[1][name][others].numpy())}
        if name in PLOTTED:  # the plot's points
            result.setdefault("points", {})[name] = {"predicted": [round(float(x), 6) for x in predicted],
                                                     "measured": [round(float(x), 6) for x in measured]}
    readout_gain = on_train["readout"][targets]
    shift = readout_gain @ unit[targets]  # the theory's shift, sum_t alpha_t d_t
    tokens = token_readings(organism, tuned, layer, sae, held, predicted_shift=shift)
    where_active = tokens["readout_where_active"]
    seen = others & where_active.isfinite()
    result["readout_where_active"] = {
        "spearman": spearman((cosines @ readout_gain)[seen].numpy(), where_active[seen].numpy()),
        "n_features": int(seen.sum())}
    measured = tokens["activation"][others].numpy()
    result["activation_of_uniform_shift"] = {
        "theory_spearman": spearman(tokens["activation_of_predicted_shift"][others].numpy(), measured),
        "mean_shift_spearman": spearman(tokens["activation_of_mean_shift"][others].numpy(), measured)}
    return result


def run_organism_spillover(organism: Organism, saes: dict, study_dir: str | Path,
                           config: OrganismTheoryConfig = OrganismTheoryConfig()) -> list[dict]:
    """Fine-tune once on the inducing set and measure spillover at every layer with an SAE."""
    train = finetune_set(organism.world, "inducing", config.n_train, config.seed)
    held = held_out_samples(organism, config.n_held_out, config.seed)
    tuned, _ = finetune(copy.deepcopy(organism.model), organism.tokenizer, train,
                        dataclasses.replace(config.finetune, seed=config.seed))
    study_dir = Path(study_dir)
    return [
        measure_layer(organism, tuned, layer, sae,
                      FeatureSet.load(study_dir / "features" / f"layer_{layer}" / "inducing.json"), train, held)
        for layer, sae in sorted(saes.items())
    ]


def strongest_layer(layers: list[dict]) -> dict:
    """The layer where fine-tuning amplifies the inducing features most (largest mean read-out
    gain): the theory predicts spillover in proportion to that gain, so there it is tested with the
    most signal. Chosen by the gain, never by the correlation it is judged on."""
    return max(layers, key=lambda layer: layer["readout"]["mean_target_gain"])


def headline_layer(layers: list[dict]) -> dict:
    """The headline of `theory.json`: the strongest layer's number, its rule and read-out figures."""
    best = strongest_layer(layers)
    return {"layer": best["layer"], "rule": "largest mean read-out gain of the inducing features",
            "spearman": best["readout"]["spearman"], "pearson": best["readout"]["pearson"]}


def theory_checks(toy_pearson: float, layers: list[dict]) -> dict[str, bool]:
    """Issue 3's thresholds, read at the headline layer both ways: the feature's read-out along its
    direction (the theory's own variable) and its SAE activation after TopK (what the issue names)."""
    chosen = strongest_layer(layers)
    return {
        "toy_pearson_at_least_0.9": toy_pearson >= 0.9,
        "organism_readout_spearman_at_least_0.5": chosen["readout"]["spearman"] >= 0.5,
        "organism_activation_spearman_at_least_0.5": chosen["activation"]["spearman"] >= 0.5,
    }


def summary_line(report: dict) -> str:
    """What `spillover theory` prints: the toy model, then the headline layer's read-out and its
    SAE-activation readings, so the console shows the failing reading as well as the passing one."""
    headline, chosen = report["organism_headline"], strongest_layer(report["organism"])
    uniform = chosen["activation_of_uniform_shift"]
    theory, mean_shift = uniform["theory_spearman"], uniform["mean_shift_spearman"]
    return (f"toy model Pearson {report['toy']['pearson']:.4f}; organism at layer {headline['layer']} "
            f"({headline['rule']}): read-out Spearman {headline['spearman']:.3f}, SAE activation "
            f"{chosen['activation']['spearman']:.3f} (the theory's shift read by the SAE {theory:.3f}, "
            f"the measured mean shift {mean_shift:.3f})")


def plot_organism_spillover(layers: list[dict], path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PLOTTED), len(layers), figsize=(3.3 * len(layers), 3.0 * len(PLOTTED)),
                             squeeze=False)
    for row, name in zip(axes, PLOTTED):
        for ax, layer in zip(row, layers):
            points = layer["points"][name]
            ax.scatter(points["predicted"], points["measured"], s=4, alpha=0.5)
            ax.set_title(f"layer {layer['layer']}, {name}: Spearman {layer[name]['spearman']:.2f}", fontsize=9)
            ax.set_xlabel("predicted: sum_t alpha_t cos(d_j, d_t)", fontsize=8)
        row[0].set_ylabel(f"measured {name} change, held out", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def run_theory(out_dir: str | Path, cache_dir: str | Path | None = None) -> dict:
    """Both checks of the theory: the toy model of superposition and the organism; writes theory.json."""
    from ..io import atomic_write_json, ensure_dir
    from ..theory import ToyModelConfig, plot_spillover, run_toy_spillover
    from .model import load_organism
    from .study import OrganismStudyConfig, organism_saes, run_organism_geometry

    out = ensure_dir(out_dir)
    toy = run_toy_spillover(ToyModelConfig())
    plot_spillover(toy.predicted, toy.measured, out / "toy_spillover.png", "toy model of superposition")
    study_dir = out / "geometry"
    if not (study_dir / "geometry.json").exists():
        run_organism_geometry(study_dir, cache_dir=cache_dir)
    organism = load_organism(cache_dir=cache_dir)
    layers = run_organism_spillover(organism, organism_saes(organism, study_dir, OrganismStudyConfig()), study_dir)
    plot_organism_spillover(layers, out / "organism_spillover.png")
    report = {
        "toy": {"pearson": toy.pearson, "spearman": toy.spearman, "alpha": toy.alpha, "ci95": list(toy.ci95),
                "n_points": toy.n_points},
        "organism": [{k: v for k, v in layer.items() if k != "points"} for layer in layers],
        "organism_headline": headline_layer(layers),
        "checks": theory_checks(toy.pearson, layers),
        "config": {"toy": dataclasses.asdict(ToyModelConfig()), "organism": dataclasses.asdict(OrganismTheoryConfig())},
    }
    atomic_write_json(out / "theory.json", report)
    return report
