"""A geometry study: do the features of misalignment-inducing data lie closer to toxic features
than the features of matched harmless data? Per layer, with intervals and a permutation test.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch

from . import __version__
from .activations import CollectConfig, PooledActivations, collect
from .data import ChatSample, write_chat_jsonl
from .errors import ConfigError, shown
from .features import FeatureSet, logit_lens_labels, select_features, top_activating
from .geometry import LayerGeometry, compare_layer
from .io import atomic_write_json, ensure_dir, read_yaml_mapping
from .lm import decoder_blocks
from .plots import save_figure
from .study_sets import load_set, parse_set, train_study_saes, with_model_answers

log = logging.getLogger(__name__)

ROLES = ("inducing", "control", "toxic", "harmless")
"""The four sets a study needs: inducing data, its matched control, and the toxic reference
set with its harmless counterpart (which defines the toxic features)."""


@dataclass(frozen=True)
class GeometryConfig:
    k: int = 100
    """Features per set, as in the paper."""
    method: Literal["correlation", "mean_diff"] = "correlation"
    statistic: Literal["nearest", "pairwise"] = "pairwise"
    """Per feature: mean cosine to all toxic features (the sum spillover is made of; decision 0004),
    or cosine to its nearest one."""
    direction: Literal["decoder", "encoder"] = "decoder"
    n_random: int = 5
    """Frequency-matched random sets drawn for the baseline."""
    n_boot: int = 2000
    n_perm: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        for name, choices in (("method", ("correlation", "mean_diff")), ("statistic", ("nearest", "pairwise")),
                              ("direction", ("decoder", "encoder"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"geometry.{name}: {getattr(self, name)!r}; choose {' or '.join(choices)}")
        for name in ("k", "n_random", "n_boot", "n_perm"):
            if getattr(self, name) < 1:
                raise ConfigError(f"geometry.{name}: {getattr(self, name)}; must be at least 1")


@dataclass(frozen=True)
class LayerStudy:
    geometry: LayerGeometry
    feature_sets: dict[str, FeatureSet]


def _directions(sae, direction: str) -> torch.Tensor:
    if direction == "decoder":
        return sae.W_dec.detach().float()
    if direction == "encoder":
        return sae.W_enc.detach().float().T
    raise ConfigError(f"geometry.direction: {direction!r}; choose 'decoder' or 'encoder'")


def _examples(features: torch.Tensor, ids: Sequence[str], indices: Sequence[int], texts: Mapping[str, str],
              n: int = 3) -> tuple[tuple[str, ...], ...]:
    top = top_activating(features, ids, indices, n)
    return tuple(tuple(texts[i][:120] for i in top[int(j)]) for j in indices)


def study_layer(layer: int, sae, pooled: Mapping[str, PooledActivations], config: GeometryConfig,
                labels: Sequence[str] | None = None, texts: Mapping[str, str] | None = None) -> LayerStudy:
    """Select the three feature sets at one layer and compare their directions."""
    feats = {role: pooled[role].feat_mean(layer) for role in ROLES}
    everything = torch.cat(list(feats.values()))
    frequency = (everything > 0).float().mean(0)
    live = frequency > 0
    pick = dict(k=config.k, method=config.method, live=live, labels=labels, layer=layer)
    sets = {
        "toxic": select_features(feats["toxic"], feats["harmless"], "toxic", **pick),
        "inducing": select_features(feats["inducing"], feats["control"], "inducing", **pick),
        "control": select_features(feats["control"], feats["inducing"], "control", **pick),
    }
    if texts:
        sets = {name: dataclasses.replace(fs, examples=_examples(feats[name], pooled[name].ids, fs.indices, texts))
                for name, fs in sets.items()}
    geometry = compare_layer(
        _directions(sae, config.direction), frequency, layer, sets["inducing"].indices, sets["control"].indices,
        sets["toxic"].indices, config.statistic, config.n_random, config.n_boot, config.n_perm, config.seed,
    )
    return LayerStudy(geometry, sets)


def run_geometry(model, tokenizer, sets: Mapping[str, Sequence[ChatSample]], saes: Mapping[int, object],
                 out_dir: str | Path, config: GeometryConfig = GeometryConfig(),
                 about: Mapping | None = None) -> dict:
    """Collect SAE features of every set, study every layer that has an SAE, write geometry.json
    (with `about`, what the caller knows of where the sets came from)."""
    missing = [role for role in ROLES if not sets.get(role)]
    if missing:
        raise ConfigError(f"geometry study: missing or empty sets: {', '.join(missing)}")
    out = ensure_dir(out_dir)
    started = time.perf_counter()
    layers = tuple(sorted(saes))
    collect_config = CollectConfig(layers=layers)
    pooled = {role: collect(model, tokenizer, sets[role], collect_config, dict(saes), out / "activations" / role)
              for role in ROLES}
    unembedding = model.get_output_embeddings().weight.detach()
    texts = {s.id: s.messages[-1]["content"] for role in ROLES for s in sets[role]}
    studies: dict[int, LayerStudy] = {}
    for layer in layers:
        labels = logit_lens_labels(_directions(saes[layer], "decoder"), unembedding, tokenizer)
        studies[layer] = study_layer(layer, saes[layer], pooled, config, labels, texts)
        for name, feature_set in studies[layer].feature_sets.items():
            feature_set.save(out / "features" / f"layer_{layer}" / f"{name}.json")
        g = studies[layer].geometry
        log.info("layer %d: inducing %.3f, control %.3f, random %.3f, p %.4f", layer, g.cos_inducing_toxic,
                 g.cos_control_toxic, g.cos_random_toxic, g.p_value)
    report = {
        "layers": {str(layer): dataclasses.asdict(s.geometry) for layer, s in studies.items()},
        "checks": _checks(studies),
        "config": dataclasses.asdict(config),
        "sets": {role: len(sets[role]) for role in ROLES},
        **({"about": dict(about)} if about else {}),
        "seconds": round(time.perf_counter() - started, 1),
        "spillover_version": __version__,
    }
    atomic_write_json(out / "geometry.json", report)
    plot_geometry(studies, out)
    return report


def _checks(studies: Mapping[int, LayerStudy]) -> dict[str, bool]:
    g = [s.geometry for s in studies.values()]
    return {
        "inducing_closer_than_control_every_layer_p<0.01": all(
            x.cos_inducing_toxic > x.cos_control_toxic and x.p_value < 0.01 for x in g),
        "inducing_above_random_every_layer": all(x.cos_inducing_toxic > x.cos_random_toxic for x in g),
    }


STATISTIC_LABELS = {"pairwise": "mean cosine to the toxic features", "nearest": "cosine to nearest toxic feature"}


def plot_geometry(studies: Mapping[int, LayerStudy], out: Path) -> None:
    """Per-layer curves with intervals, and the cosine distributions at each layer."""
    import matplotlib.pyplot as plt

    layers = sorted(studies)
    label = STATISTIC_LABELS[studies[layers[0]].geometry.statistic]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, name, colour in (("inducing", "inducing", "#c0392b"), ("control", "control", "#2980b9"),
                              ("random", "random", "#7f8c8d")):
        means = [getattr(studies[l].geometry, f"cos_{key}_toxic") for l in layers]
        lo = [studies[l].geometry.ci95[key][0] for l in layers]
        hi = [studies[l].geometry.ci95[key][1] for l in layers]
        ax.plot(layers, means, marker="o", label=name, color=colour)
        ax.fill_between(layers, lo, hi, alpha=0.2, color=colour)
    ax.set_xlabel("layer (output of block)")
    ax.set_ylabel(label)
    ax.set_xticks(layers)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "geometry_layers.png")

    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        cosines = studies[layer].geometry.cosines
        ax.hist([cosines["inducing"], cosines["control"], cosines["random"]], bins=20, density=True,
                histtype="step", label=["inducing", "control", "random"], color=["#c0392b", "#2980b9", "#7f8c8d"])
        ax.set_title(f"layer {layer}")
        ax.set_xlabel(label)
    axes[0][0].set_ylabel("density")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "geometry_distributions.png")


STUDY_KEYS = ("model", "sets", "saes", "train_saes", "k", "method", "statistic", "direction", "n_random", "n_boot", "n_perm", "seed")


def run_study_file(config_path: str | Path, out_dir: str | Path, cache_dir: str | Path | None = None) -> dict:
    """A geometry study of any model from a YAML file (paths relative to it):

    model: a local transformers folder, a GGUF file, organism, or a packaged model's short name
    sets: {inducing: SET, control: SET, toxic: SET, harmless: SET}   (a file, or a mapping: study_sets.SET_KEYS)
    saes: {LAYER: SAE_FOLDER, ...}                                  (SAELens format), and/or
    train_saes: {layers: [...], d_sae, k, steps, ...}               (TopK SAEs trained on the study's tokens)
    k, method, statistic, direction, n_random, n_boot, n_perm, seed: as GeometryConfig
    """
    from .models import load_model
    from .sae import load_sae

    path = Path(config_path)
    hints = typing.get_type_hints(GeometryConfig)
    raw = read_yaml_mapping(path, STUDY_KEYS, "study", {"model": str, "sets": dict, "saes": dict, "train_saes": dict, **hints})
    for key in ("model", "sets"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
    try:
        config = GeometryConfig(**{k: raw[k] for k in hints if k in raw})  # its fields, by name
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    layers = _study_layers(raw, path)  # every field checked before anything slow is loaded
    here = path.parent
    specs = {role: parse_set(entry, here, f"{path}: field 'sets.{role}'") for role, entry in raw["sets"].items()}
    loaded = load_model(_model_spec(raw["model"], here), cache_dir)
    n_blocks = len(decoder_blocks(loaded.model))
    wanted = [(f"saes.{layer}", layer) for layer in layers]
    wanted += [("train_saes.layers", layer) for layer in raw.get("train_saes", {}).get("layers", [])]
    for field, layer in wanted:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_blocks:
            raise ConfigError(f"{path}: field '{field}': layer {shown(layer)} is out of range "
                              f"(this model has blocks 0..{n_blocks - 1})")
    out = ensure_dir(out_dir)
    sets, set_info = {}, {}
    for role, spec in specs.items():
        sets[role], set_info[role] = load_set(spec)
        if spec.answers == "model":
            sets[role] = with_model_answers(loaded.model, loaded.tokenizer, sets[role], spec, out)
    for role, samples in sets.items():  # what was studied, e.g. as references for `spillover score`
        write_chat_jsonl(out / "sets" / f"{role}.jsonl", samples)
    atomic_write_json(out / "sets.json", set_info)
    saes = {layer: load_sae(here / folder) for layer, folder in layers.items()}
    if "train_saes" in raw:
        everything = [s for role in ROLES for s in sets.get(role, [])]
        saes.update(train_study_saes(loaded.model, loaded.tokenizer, everything, raw["train_saes"], out,
                                     f"{path}: field 'train_saes'"))
    return run_geometry(loaded.model, loaded.tokenizer, sets, saes, out, config)


def _model_spec(model: str, here: Path) -> str:
    """A path relative to the study file when one exists there; otherwise the spec as written."""
    relative = here / model
    return str(relative) if model != "organism" and relative.exists() else model


def _study_layers(raw: dict, path: Path) -> dict[int, str]:
    """`sets` maps roles to files and `saes` layers to folders; the layer of each SAE folder."""
    for role, file in raw["sets"].items():
        if role not in ROLES:
            raise ConfigError(f"{path}: field 'sets.{role}': not a role; roles: {', '.join(ROLES)}")
        if not isinstance(file, (str, dict)):
            raise ConfigError(f"{path}: field 'sets.{role}': expected a file path or a mapping, got {shown(file)}")
    layers: dict[int, str] = {}
    for layer, folder in raw.get("saes", {}).items():
        if isinstance(layer, bool) or not (isinstance(layer, int) or str(layer).strip().isdigit()):
            raise ConfigError(f"{path}: field 'saes': key {shown(layer)} is not a layer number")
        if not isinstance(folder, str):
            raise ConfigError(f"{path}: field 'saes.{layer}': expected an SAE folder path, got {shown(folder)}")
        layers[int(layer)] = folder
    if not layers and "train_saes" not in raw:
        raise ConfigError(f"{path}: field 'saes': give at least one LAYER: SAE_FOLDER, or train_saes")
    return layers
