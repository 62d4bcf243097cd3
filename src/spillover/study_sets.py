"""What a geometry study file may say about its data and its SAEs, beyond plain file names.

A set can be a file name, or a mapping that limits it to a seeded sample, drops prompts that
nearly match evaluation questions, or replaces the file's answers with the studied model's own
(so a harmless reference can share the toxic set's prompts). The `train_saes` block trains one
TopK SAE per layer on the residual stream of the study's own samples, saved in SAELens format in
the run folder and reused by a rerun.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .data import ChatSample, read_chat_jsonl, read_samples, write_chat_jsonl
from .errors import ConfigError
from .io import atomic_write_json, stable_hash

log = logging.getLogger(__name__)

SET_KEYS = ("path", "limit", "seed", "exclude_near", "threshold", "answers", "max_new_tokens")
SAE_KEYS = ("layers", "d_sae", "k", "steps", "batch_size", "lr", "max_tokens", "seed")


@dataclass(frozen=True)
class SetSpec:
    path: Path
    limit: int | None = None
    """Keep a seeded sample of this many rows; files of equal length get the same rows, so paired
    sets (bad and good advice to the same prompts) stay paired."""
    seed: int = 0
    exclude_near: tuple[Path, ...] = ()
    """Question YAML files whose prompts (and near duplicates) are removed first."""
    threshold: float = 0.7
    answers: str = "file"
    """`file`, or `model`: answer each prompt with the studied model (greedy), cached in the run."""
    max_new_tokens: int = 96


def parse_set(raw: Any, here: Path, where: str) -> SetSpec:
    """A set entry: a path relative to the study file, or a mapping of SET_KEYS."""
    if isinstance(raw, str):
        return SetSpec(here / raw)
    if not isinstance(raw, dict) or "path" not in raw:
        raise ConfigError(f"{where}: expected a file name or a mapping with 'path'")
    unknown = sorted(set(raw) - set(SET_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; valid keys: {', '.join(SET_KEYS)}")
    if raw.get("answers", "file") not in ("file", "model"):
        raise ConfigError(f"{where}.answers: {raw['answers']!r}; choose 'file' or 'model'")
    exclude = raw.get("exclude_near", [])
    exclude = [exclude] if isinstance(exclude, str) else exclude
    fields = {k: v for k, v in raw.items() if k not in ("path", "exclude_near")}
    _check_types(fields, where)
    return SetSpec(here / raw["path"], exclude_near=tuple(here / e for e in exclude), **fields)


def _check_types(fields: Mapping[str, Any], where: str) -> None:
    for key in ("limit", "seed", "max_new_tokens"):
        if key in fields and (not isinstance(fields[key], int) or isinstance(fields[key], bool) or fields[key] < 0):
            raise ConfigError(f"{where}.{key}: {fields[key]!r}; expected a non-negative integer")
    if "threshold" in fields and not (isinstance(fields["threshold"], (int, float)) and 0 < fields["threshold"] <= 1):
        raise ConfigError(f"{where}.threshold: {fields['threshold']!r}; expected a number in (0, 1]")


def load_set(spec: SetSpec, exclude: Callable[[ChatSample], bool] | None = None
             ) -> tuple[list[ChatSample], dict[str, Any]]:
    """The samples a spec selects (less those `exclude` names), and a record of what was read,
    dropped and kept."""
    from .dedup import drop_near_questions, question_prompts

    samples = read_samples(spec.path)
    info: dict[str, Any] = {"path": str(spec.path), "rows": len(samples)}
    if exclude is not None:
        samples = [s for s in samples if not exclude(s)]
        info["excluded"] = info["rows"] - len(samples)
    if spec.exclude_near:
        samples, dropped = drop_near_questions(samples, question_prompts(map(str, spec.exclude_near)),
                                               spec.threshold)
        info["dropped_near_questions"] = len(dropped)
        info["dropped_prompts"] = sorted({d.prompt for d in dropped})
    if spec.limit is not None and spec.limit < len(samples):
        keep = sorted(random.Random(spec.seed).sample(range(len(samples)), spec.limit))
        samples = [samples[i] for i in keep]
    info["kept"] = len(samples)
    return samples, info


def with_model_answers(model, tokenizer, samples: Sequence[ChatSample], spec: SetSpec,
                       folder: Path) -> list[ChatSample]:
    """The samples with their last answer replaced by the model's greedy answer; cached by content."""
    from .lm import SamplingConfig, sample_answers

    key = stable_hash({"prompts": [s.messages[:-1] for s in samples], "max_new_tokens": spec.max_new_tokens,
                       "model": getattr(model.config, "_name_or_path", ""), "vocab": len(tokenizer)})
    path = folder / f"model_answers_{key[:16]}.jsonl"
    if path.exists():
        return read_chat_jsonl(path)
    prompts = [list(s.messages[:-1]) for s in samples]
    answers = sample_answers(model, tokenizer, prompts, SamplingConfig(temperature=0, batch_size=32,
                                                                       max_new_tokens=spec.max_new_tokens))
    rewritten = [dataclasses.replace(s, id=f"{s.id}/model", messages=(*s.messages[:-1], {
        "role": "assistant", "content": a})) for s, a in zip(samples, answers)]
    write_chat_jsonl(path, rewritten)
    return rewritten


def train_study_saes(model, tokenizer, samples: Sequence[ChatSample], raw: Any, out: Path,
                     where: str) -> dict[int, object]:
    """One TopK SAE per configured layer on the residuals of all tokens of `samples`; reused when saved."""
    from .activations import collect_token_layers
    from .sae import TopKTrainingConfig, load_sae, save_sae, train_topk_sae

    if not isinstance(raw, dict) or not isinstance(raw.get("layers"), list) or not raw["layers"]:
        raise ConfigError(f"{where}: expected a mapping with a non-empty 'layers' list")
    unknown = sorted(set(raw) - set(SAE_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; valid keys: {', '.join(SAE_KEYS)}")
    settings = {k: v for k, v in raw.items() if k not in ("layers", "max_tokens")}
    try:
        config = TopKTrainingConfig(**settings)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    layers = [int(layer) for layer in raw["layers"]]
    folders = {layer: out / "sae" / f"layer_{layer}" for layer in layers}
    todo = [layer for layer in layers if not (folders[layer] / "cfg.json").exists()]
    if todo:
        tokens = collect_token_layers(model, tokenizer, samples, todo, max_tokens=raw.get("max_tokens", 200_000),
                                      skip_first=True)
        for layer in todo:
            metadata = {"model_name": getattr(model.config, "_name_or_path", ""), "hook_layer": layer}
            sae, report = train_topk_sae(tokens.pop(layer), config, metadata)
            save_sae(sae, folders[layer])
            atomic_write_json(folders[layer] / "training.json",
                              {**dataclasses.asdict(report), "config": dataclasses.asdict(config)})
            log.info("layer %d SAE: FVU %.3f, L0 %.1f, dead %.3f", layer, report.fvu, report.l0,
                     report.dead_fraction)
    return {layer: load_sae(folders[layer]) for layer in layers}
