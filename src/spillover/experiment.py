"""`spillover experiment CONFIG.yaml`: filter, fine-tune and evaluate for every strategy x fraction x seed.

Each run reuses the resumable stages (`score`, `filter`, `finetune`, `evaluate`) in its own folder,
so a cut-off experiment resumes where it stopped and a finished one costs nothing to rerun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .activations import shard_seconds
from .data import read_chat_jsonl, write_chat_jsonl
from .dedup import first_user_prompt
from .errors import ConfigError, OtherInputsError
from .evaluate import EvaluateConfig, run_evaluate
from .filtering import STRATEGIES
from .finetune import apply_overrides, preset, run_finetune
from .io import atomic_write_json, ensure_dir, read_yaml_mapping
from .lm import SamplingConfig
from .metrics import pooled_rate, reduction
from .risk import filter_file, judge_score_file, read_scores, score_file
from .score_stream import chunk_seconds
from .scoring import SCORE_NAMES, auroc
from .study_sets import SetSpec, load_set, parse_set

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentConfig:
    model: str
    """A local transformers model folder, or `organism`."""
    sae: str
    """SAE folder (SAELens format) at the toxic feature set's layer."""
    toxic: str
    """Toxic feature set JSON, from a geometry study."""
    train: str | None = None
    """The training set (chat JSONL). Samples whose meta.inducing is true count as inducing."""
    mix: dict | None = None
    """Instead of `train`: {inducing: SET, control: SET, seed: N}, each SET as in a geometry study
    file (a path, or a mapping with path, limit, seed, exclude_near); mixed into run/train.jsonl."""
    toxic_ref: str | None = None
    """Toxic reference answers (chat JSONL); needed by the projection strategy and the dataset risk."""
    harmless_ref: str | None = None
    questions: str = "default"
    """Evaluation questions: default, a Betley-format YAML file, or organism[:DOMAIN]."""
    judge: str = "organism"
    """Judge of the evaluation and of the judge strategy: organism, openai, local:PATH or classifier[:PATH]."""
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
        if (self.train is None) == (self.mix is None):
            raise ConfigError("experiment: give either 'train' (a chat JSONL file) or 'mix', not both or neither")
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
        elif name == "questions" and isinstance(value, str) and _question_file(value):
            value = str((path.parent / value).resolve())
        elif name == "mix" and value is not None:
            value = _resolve_mix(value, path)
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
    if _question_file(config.questions):
        from .evaluate import load_question_set

        load_question_set(config.questions)


def run_experiment(config_path: str | Path, out_dir: str | Path, cache_dir: str | Path | None = None) -> dict:
    """Score once, then filter / fine-tune / evaluate every strategy x fraction x seed; writes summary.json."""
    config = load_experiment_config(config_path)
    out = ensure_dir(out_dir)
    if config.mix is not None:
        config = dataclasses.replace(config, train=str(write_mix(config.mix, out / "train.jsonl")), mix=None)
    samples = read_chat_jsonl(config.train)
    inducing = {s.id for s in samples if s.meta.get("inducing")}
    scores, costs = _score(config, out, len(samples), cache_dir)
    runs: dict[tuple[str, float], list[dict]] = {}
    plan = [("none", 0.0)] + [(s, f) for s in config.strategies for f in config.fractions]
    for strategy, fraction in plan:
        for seed in config.seeds:
            folder = out / "runs" / f"{strategy}-{fraction:.2f}-seed{seed}"
            with _from_these_inputs(folder):
                run = _run_one(config, folder, strategy, fraction, seed, scores, cache_dir)
            run["inducing_removed"] = len(inducing & set(run.pop("removed_ids"))) / len(inducing) if inducing else None
            runs.setdefault((strategy, fraction), []).append(run)
    with _from_these_inputs(out / "base"):
        base = _evaluate_base(config, out / "base", cache_dir)
    summary = {"base": base, **_summarize(runs, costs, config),
               "score_auroc": _score_auroc(scores, samples, inducing)}
    atomic_write_json(out / "summary.json", summary)
    return summary


def _score_auroc(scores: dict[str, Path], samples: list, inducing: set[str]) -> dict[str, float] | None:
    """How well each score ranks the inducing rows above the others (None without both kinds)."""
    if not inducing or len(inducing) == len(samples):
        return None
    flags = torch.tensor([s.id in inducing for s in samples])
    aurocs = {}
    for strategy, path in scores.items():
        risks = read_scores(path)
        aurocs[strategy] = auroc(torch.tensor([risks[s.id] for s in samples]), flags)
    return aurocs


def _score(config: ExperimentConfig, out: Path, n: int, cache_dir) -> tuple[dict[str, Path], dict[str, dict]]:
    scores, costs = {}, {"random": {"forward_passes": 0, "judge_calls": 0, "seconds": 0.0}}
    if "judge" in config.strategies:
        scores["judge"] = judge_score_file(config.train, config.judge, out / "scores" / "judge")
        asked = json.loads((out / "scores" / "judge" / "score.json").read_text())
        costs["judge"] = {"forward_passes": 0, **{k: asked[k] for k in ("judge_calls", "seconds")}}
    for strategy, score in (("geometry", config.score), ("projection", "projection")):
        if strategy not in config.strategies:
            continue
        folder, references = out / "scores" / strategy, out / "scores" / "references"
        before, started = _timings(folder, references), time.perf_counter()
        scores[strategy] = score_file(config.model, config.train, config.sae, config.toxic, folder,
                                      score, config.toxic_ref, config.harmless_ref, cache_dir,
                                      reference_dir=references)
        seconds = time.perf_counter() - started + _reused_seconds(before, _timings(folder, references))
        costs[strategy] = _scoring_cost(folder, n, seconds)
    return scores, costs


def _timings(folder: Path, references: Path) -> dict[tuple[str, int], float]:
    """Seconds of every finished piece of a score: its chunks, and the shards of the reference
    activations it reads (collected by this score, an earlier cut-off run, or the other strategy)."""
    pieces = {("chunk", i): s for i, s in chunk_seconds(folder).items()}
    for name in ("toxic_ref", "harmless_ref"):
        pieces |= {(name, i): s for i, s in shard_seconds(references / name).items()}
    return pieces


def _reused_seconds(before: dict, after: dict) -> float:
    """Time of the pieces an earlier run finished and this one reused (a piece computed again,
    after a change of inputs, has a new timing and is not counted twice)."""
    return sum(seconds for piece, seconds in before.items() if after.get(piece) == seconds)


def _scoring_cost(folder: Path, n: int, seconds: float) -> dict:
    """The cost of the runs that wrote these scores, kept beside them (keyed by their hash): a
    rerun that finds them finished takes a second, and would otherwise report that as the cost."""
    from .models import sha256_file

    path = folder / "cost.json"
    scores = sha256_file(folder / "scores.jsonl")
    if path.exists():
        kept = json.loads(path.read_text())
        if kept.get("scores_sha256") == scores:
            return kept["cost"]
    cost = {"forward_passes": n, "judge_calls": 0, "seconds": round(seconds, 2)}
    atomic_write_json(path, {"scores_sha256": scores, "cost": cost})
    return cost


def _question_file(spec: str) -> bool:
    return spec.partition("#")[0].endswith((".yaml", ".yml"))


def _resolve_mix(raw: dict, path: Path) -> dict:
    """The mix with every set checked now and its paths made absolute."""
    unknown = sorted(set(raw) - {"inducing", "control", "seed"})
    if unknown or not {"inducing", "control"} <= set(raw):
        raise ConfigError(f"{path}: field 'mix': expected inducing, control and optionally seed")
    sets = {role: parse_set(raw[role], path.parent, f"{path}: field 'mix.{role}'") for role in ("inducing", "control")}
    if any(spec.answers != "file" for spec in sets.values()):
        raise ConfigError(f"{path}: field 'mix': training sets must use the file's answers")
    return {**{role: {**dataclasses.asdict(spec), "path": str(spec.path.resolve()),
                      "exclude_near": [str(p.resolve()) for p in spec.exclude_near]} for role, spec in sets.items()},
            "seed": raw.get("seed", 0)}


def write_mix(mix: dict, path: Path) -> Path:
    """Inducing and control samples, marked in meta.inducing, shuffled with the mix's seed.

    Control rows whose user prompt is also an inducing row's are left out, so that no prompt is
    taught both ways (bad and good medical advice share their prompts)."""
    inducing, _ = load_set(_set_spec(mix["inducing"]))
    taken = {first_user_prompt(s) for s in inducing}
    control, info = load_set(_set_spec(mix["control"]), exclude=lambda s: first_user_prompt(s) in taken)
    log.info("mix: %d inducing and %d control samples (%d control rows share an inducing prompt and are left out)",
             len(inducing), len(control), info["excluded"])
    if not control:
        raise ConfigError(f"field 'mix.control': no sample of {info['path']} is left ({info['excluded']} of "
                          f"{info['rows']} rows share a user prompt with an inducing row); take control data "
                          "with other prompts")
    rows = ([dataclasses.replace(s, id=f"inducing/{s.id}", meta={**s.meta, "inducing": True}) for s in inducing]
            + [dataclasses.replace(s, id=f"control/{s.id}", meta={**s.meta, "inducing": False}) for s in control])
    random.Random(mix["seed"]).shuffle(rows)
    return write_chat_jsonl(path, rows)


def _set_spec(resolved: dict) -> SetSpec:
    """A set of a resolved mix (plain JSON, as `_resolve_mix` stores it) as a SetSpec again."""
    return SetSpec(**{**resolved, "path": Path(resolved["path"]),
                      "exclude_near": tuple(map(Path, resolved["exclude_near"]))})


def _evaluate_base(config: ExperimentConfig, folder: Path, cache_dir) -> dict:
    """The model before any fine-tuning, asked the same questions with the first seed."""
    evaluation = run_evaluate(
        config.model, folder, questions=config.questions, judge=config.judge, cache_dir=cache_dir,
        config=EvaluateConfig(samples=config.samples, sampling=SamplingConfig(max_new_tokens=config.max_new_tokens,
                                                                               seed=config.seeds[0])))
    overall = evaluation.summary.overall
    log.info("base model: misaligned %.3f", overall.misaligned_rate)
    return {"n": overall.n, "n_counted": overall.n_counted, "n_misaligned": overall.n_misaligned,
            "misaligned_rate": overall.misaligned_rate, "ci95": list(overall.ci95),
            "coherent_rate": overall.coherent_rate}


@contextlib.contextmanager
def _from_these_inputs(folder: Path) -> Iterator[None]:
    """A stage of an experiment's run that finds its folder made from other inputs (the config
    changed since): name the run to delete, whose stages hang together, rather than the stage."""
    try:
        yield
    except OtherInputsError as exc:
        raise ConfigError(f"{folder}: made from other inputs than this config gives ({', '.join(exc.differ)} "
                          f"differ); delete {folder} to run it again, or choose another --out") from None


def _run_one(config: ExperimentConfig, folder: Path, strategy: str, fraction: float, seed: int,
             scores: dict[str, Path], cache_dir) -> dict:
    kept = filter_file(config.train, folder / "data", "random" if strategy == "none" else strategy, fraction,
                       scores.get(strategy), seed=seed)
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
