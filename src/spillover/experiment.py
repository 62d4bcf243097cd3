"""`spillover experiment CONFIG.yaml`: filter, fine-tune and evaluate for every strategy x fraction x seed.

Each run reuses the resumable stages (`score`, `filter`, `finetune`, `evaluate`) in its own folder,
so a cut-off experiment resumes where it stopped and a finished one costs nothing to rerun.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from .data import read_chat_jsonl
from .errors import ConfigError
from .evaluate import EvaluateConfig, run_evaluate
from .filtering import STRATEGIES
from .finetune import apply_overrides, preset, run_finetune
from .io import atomic_write_json, ensure_dir, read_yaml_mapping
from .lm import SamplingConfig
from .metrics import pooled_rate, reduction
from .risk import filter_file, score_file
from .scoring import SCORE_NAMES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentConfig:
    model: str
    """A local transformers model folder, or `organism`."""
    train: str
    """The training set (chat JSONL). Samples whose meta.inducing is true count as inducing."""
    sae: str
    """SAE folder (SAELens format) at the toxic feature set's layer."""
    toxic: str
    """Toxic feature set JSON, from a geometry study."""
    toxic_ref: str | None = None
    """Toxic reference answers (chat JSONL); needed by the projection strategy and the dataset risk."""
    harmless_ref: str | None = None
    questions: str = "default"
    """Evaluation questions: default, a Betley-format YAML file, or organism[:DOMAIN]."""
    judge: str = "organism"
    """Judge of the evaluation and of the judge strategy: organism, openai or local:PATH."""
    strategies: tuple[str, ...] = STRATEGIES
    fractions: tuple[float, ...] = (0.5,)
    seeds: tuple[int, ...] = (0,)
    score: str = "spillover"
    """Risk score behind the geometry strategy."""
    preset: str = "default"
    """Fine-tuning preset: default (the EM papers' setup) or organism."""
    finetune: tuple[str, ...] = ()
    """Overrides of the preset as field=value strings, e.g. rank=1."""
    samples: int | None = None
    """Answers per question paraphrase; None takes the question file's own number."""
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ConfigError(f"experiment.strategies: {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
        if not self.fractions or not all(0 < f < 1 for f in self.fractions):
            raise ConfigError("experiment.fractions: give fractions strictly between 0 and 1")
        if not self.seeds:
            raise ConfigError("experiment.seeds: give at least one seed")
        if self.score not in SCORE_NAMES:
            raise ConfigError(f"experiment.score: {self.score!r}; choose from {', '.join(SCORE_NAMES)}")
        if self.samples is not None and self.samples < 1 or self.max_new_tokens < 1:
            raise ConfigError("experiment.samples and experiment.max_new_tokens must be at least 1")


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    """Read the YAML config; paths in it are relative to the file's folder; unknown keys are errors."""
    path = Path(path)
    fields = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    raw = read_yaml_mapping(path, list(fields), "experiment", typing.get_type_hints(ExperimentConfig))
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in raw]
    if missing:
        raise ConfigError(f"{path}: missing key {missing[0]!r}")
    values = {}
    for name, value in raw.items():
        if name in ("train", "sae", "toxic", "toxic_ref", "harmless_ref") and value is not None:
            value = str((path.parent / str(value)).resolve())
        elif name == "questions" and isinstance(value, str) and value.endswith((".yaml", ".yml")):
            value = str((path.parent / value).resolve())
        elif name in ("strategies", "fractions", "seeds", "finetune"):
            value = tuple(value if isinstance(value, list) else [value])
        values[name] = value
    try:
        config = ExperimentConfig(**values)
        _check_early(config)
    except (TypeError, ConfigError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def _check_early(config: ExperimentConfig) -> None:
    """What would otherwise fail only after hours of scoring and fine-tuning: the fine-tuning
    preset and overrides, and a question file."""
    try:
        apply_overrides(preset(config.preset), config.finetune)
    except ConfigError as exc:
        raise ConfigError(f"field 'finetune' (or 'preset'): {exc}") from None
    if config.questions.endswith((".yaml", ".yml")):
        from .evaluate import load_question_set

        load_question_set(config.questions)


def run_experiment(config_path: str | Path, out_dir: str | Path, cache_dir: str | Path | None = None) -> dict:
    """Score once, then filter / fine-tune / evaluate every strategy x fraction x seed; writes summary.json."""
    config = load_experiment_config(config_path)
    out = ensure_dir(out_dir)
    samples = read_chat_jsonl(config.train)
    inducing = {s.id for s in samples if s.meta.get("inducing")}
    scores, costs = _score(config, out, len(samples), cache_dir)
    runs: dict[tuple[str, float], list[dict]] = {}
    plan = [("none", 0.0)] + [(s, f) for s in config.strategies for f in config.fractions]
    for strategy, fraction in plan:
        for seed in config.seeds:
            run = _run_one(config, out / "runs" / f"{strategy}-{fraction:.2f}-seed{seed}", strategy, fraction, seed,
                           scores, cache_dir)
            run["inducing_removed"] = len(inducing & set(run.pop("removed_ids"))) / len(inducing) if inducing else None
            runs.setdefault((strategy, fraction), []).append(run)
    summary = _summarize(runs, costs, config)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _score(config: ExperimentConfig, out: Path, n: int, cache_dir) -> tuple[dict[str, Path], dict[str, dict]]:
    scores, costs = {}, {"random": {"forward_passes": 0, "judge_calls": 0, "seconds": 0.0},
                         "judge": {"forward_passes": 0, "judge_calls": n, "seconds": None}}
    for strategy, score in (("geometry", config.score), ("projection", "projection")):
        if strategy not in config.strategies:
            continue
        started = time.perf_counter()
        scores[strategy] = score_file(config.model, config.train, config.sae, config.toxic, out / "scores" / strategy,
                                      score, config.toxic_ref, config.harmless_ref, cache_dir)
        costs[strategy] = {"forward_passes": n, "judge_calls": 0, "seconds": round(time.perf_counter() - started, 2)}
    return scores, costs


def _run_one(config: ExperimentConfig, folder: Path, strategy: str, fraction: float, seed: int,
             scores: dict[str, Path], cache_dir) -> dict:
    kept = filter_file(config.train, folder / "data", "random" if strategy == "none" else strategy, fraction,
                       scores.get(strategy), config.judge if strategy == "judge" else None, seed)
    removed = [r["id"] for r in json.loads((folder / "data" / "filter.json").read_text())["removed"]]
    finetune_config = apply_overrides(preset(config.preset), [*config.finetune, f"seed={seed}"])
    tuned = run_finetune(config.model, kept, folder / "finetune", finetune_config, cache_dir=cache_dir)
    evaluation = run_evaluate(
        config.model, folder / "evaluate", adapter=folder / "finetune", questions=config.questions,
        judge=config.judge, cache_dir=cache_dir,
        config=EvaluateConfig(samples=config.samples, sampling=SamplingConfig(max_new_tokens=config.max_new_tokens,
                                                                               seed=seed)))
    overall = evaluation.summary.overall
    log.info("%s %.2f seed %d: misaligned %.3f", strategy, fraction, seed, overall.misaligned_rate)
    return {"n": overall.n, "n_counted": overall.n_counted, "n_misaligned": overall.n_misaligned,
            "misaligned_rate": overall.misaligned_rate, "coherent_rate": overall.coherent_rate,
            "train_loss": tuned.result.final_loss, "removed_ids": removed}


def _pooled(results: list[dict]) -> dict:
    removed = [r["inducing_removed"] for r in results if r["inducing_removed"] is not None]
    return {**pooled_rate(results),
            "coherent_rate": sum(r["coherent_rate"] for r in results) / len(results),
            "train_loss": sum(r["train_loss"] for r in results) / len(results),
            "inducing_removed": sum(removed) / len(removed) if removed else None}


def _summarize(runs: dict[tuple[str, float], list[dict]], costs: dict, config: ExperimentConfig) -> dict:
    none = _pooled(runs[("none", 0.0)])
    table = []
    for (strategy, fraction), results in sorted(runs.items()):
        if strategy == "none":
            continue
        row = {"strategy": strategy, "fraction": fraction, **_pooled(results), "cost": costs.get(strategy)}
        random_runs = runs.get(("random", fraction))
        row["reduction_vs_none"] = reduction(none["misaligned_rate"], row["misaligned_rate"])
        row["reduction_vs_random"] = reduction(_pooled(random_runs)["misaligned_rate"] if random_runs else None,
                                               row["misaligned_rate"])
        table.append(row)
    return {"none": none, "table": table, "config": dataclasses.asdict(config)}
