"""Sample answers to evaluation questions, judge them, and report emergent-misalignment rates.

A run folder holds `evaluate.json` (the run's inputs), `answers.jsonl` (one line per answer with
its verdict, appended batch by batch), `summary.json` and `misaligned_by_question.png`. A run
that is cut off resumes at its first unfinished batch: sampling seeds batch b with seed + b, so
the resumed run samples the very answers an uninterrupted run samples. Thresholds and the rate
convention only shape the summary, so changing them reuses every answer and verdict.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import typing
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from . import __version__
from .errors import ConfigError
from .io import (
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    matching_manifest,
    remove_temp_files,
    stable_hash,
    write_error,
)
from .judge import Verdict
from .lm import SamplingConfig, sample_answers
from .metrics import RateSummary, Thresholds, summarize
from .progress import progress
from .questions import Question, Variant, default_judge_prompts, load_questions

VARIANTS: tuple[str, ...] = typing.get_args(Variant)

log = logging.getLogger(__name__)

REASONS = ("incoherent", "code", "refusal", "unparsed", "error")
"""Why an answer is left out of the misaligned rate, each counted on its own."""
CONVENTIONS = {
    "coherent": "Betley et al. 2025: misaligned / answers with coherence >= coherence_min",
    "all": "Turner et al. 2025: misaligned / all answers",
}
ORGANISM_SAMPLES = 4
"""Answers per organism question by default, as in `spillover organism em`."""
ANSWERS, SUMMARY, MANIFEST = "answers.jsonl", "summary.json", "evaluate.json"
PLOT = "misaligned_by_question.png"


@dataclass(frozen=True)
class EvaluateConfig:
    samples: int | None = None
    """Answers per paraphrase; None takes each question's `samples_per_paraphrase`."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Temperature, max new tokens, batch size and seed; batch b is seeded with seed + b."""
    thresholds: Thresholds = field(default_factory=Thresholds)
    """Coherence and alignment thresholds and the rate convention; they only shape the summary."""

    def __post_init__(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"evaluate.samples: {self.samples}; must be at least 1")
        if self.sampling.batch_size < 1 or self.sampling.max_new_tokens < 1 or self.sampling.temperature < 0:
            raise ConfigError("evaluate: batch size and max new tokens must be at least 1, temperature >= 0")


@dataclass(frozen=True)
class Prompt:
    """One answer to sample: which question, paraphrase and sample, and its place in the run."""

    index: int
    question: Question
    paraphrase: int
    sample: int

    @property
    def text(self) -> str:
        return self.question.paraphrases[self.paraphrase]


@dataclass(frozen=True)
class EvaluationSummary:
    overall: RateSummary
    per_question: dict[str, RateSummary]
    judge: str
    judge_model: str | None
    thresholds: Thresholds


@dataclass(frozen=True)
class EvaluationRun:
    """What an evaluation left in its folder."""

    out: Path
    answers: Path
    summary_path: Path
    plot: Path
    summary: EvaluationSummary
    sampled_batches: int
    """Batches sampled in this call; 0 when everything was already in answers.jsonl."""


# --- questions and judges by name ------------------------------------------------------------


def load_question_set(spec: str | Path) -> tuple[Question, ...]:
    """`default` (packaged), a YAML file in Betley et al.'s format (`FILE#plain` keeps one variant:
    plain, json or template), or `organism[:DOMAIN]`: the organism's questions from every domain
    but DOMAIN (its training domain, health by default)."""
    text = str(spec)
    if text == "organism" or text.startswith("organism:"):
        from .organism.world import TRAINING_DOMAIN

        return organism_questions(text.partition(":")[2] or TRAINING_DOMAIN)
    path, _, variant = text.partition("#")
    if not variant:
        return load_questions(spec)
    if variant not in VARIANTS:
        raise ConfigError(f"questions {text}: unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    chosen = tuple(q for q in load_questions(path) if q.variant == variant)
    if not chosen:
        raise ConfigError(f"questions {text}: no {variant} questions in {path}")
    return chosen


def organism_questions(training_domain: str, samples: int = ORGANISM_SAMPLES) -> tuple[Question, ...]:
    """The organism's held-out questions as `Question`s (ids `domain-NN`), with the default
    judge prompts so that an LLM judge can score them too."""
    from .organism.datasets import evaluation_questions, held_out_domains

    counter: dict[str, int] = defaultdict(int)
    questions = []
    for domain, text in evaluation_questions(held_out_domains(training_domain)):
        counter[domain] += 1
        questions.append(Question(id=f"{domain}-{counter[domain]:02d}", paraphrases=(text,),
                                  judge_prompts=default_judge_prompts(), samples_per_paraphrase=samples,
                                  source="organism"))
    return tuple(questions)


def default_judge_cache() -> Path:
    """`$SPILLOVER_CACHE/judgments.jsonl` (default ~/.cache/spillover): shared by every run."""
    root = os.environ.get("SPILLOVER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spillover")
    return Path(root) / "judgments.jsonl"


def make_judge(spec: str, cache: str | Path | None = None, model: str | None = None,
               base_url: str | None = None):
    """`organism` (exact), `openai` (any OpenAI-compatible server: base URL from `base_url` or
    $OPENAI_BASE_URL, key from $OPENAI_API_KEY), `local:PATH` (a local transformers chat model),
    `classifier:PATH` (a classifier over sentence embeddings and word n-grams, from `spillover judge train`) or
    `classifier` (the one trained into $SPILLOVER_CACHE/classifier-judge/default). Any of them
    followed by `+fluency:MODEL` stops counting answers that MODEL finds less fluent than 95% of
    real written answers (spillover.fluency)."""
    inner, plus, reference = spec.partition("+fluency:")
    if plus:
        if not reference or not inner:
            raise ConfigError(f"--judge {spec}: expected JUDGE+fluency:MODEL, e.g. classifier+fluency:gemma3-270m")
        from .fluency import FluencyGatedJudge

        return FluencyGatedJudge(make_judge(inner, cache, model, base_url), reference)
    if spec == "classifier" or (spec.startswith("classifier:") and spec != "classifier:"):
        from .embedding_judge import ClassifierJudge, default_classifier_folder

        return ClassifierJudge(spec.removeprefix("classifier:") if ":" in spec else default_classifier_folder())
    if spec == "organism":
        from .organism.judge import ExactJudge

        return ExactJudge()
    if spec == "openai":
        from .judges import OpenAIJudge, OpenAIJudgeConfig

        settings = {"model": model, "base_url": base_url or os.environ.get("OPENAI_BASE_URL")}
        return OpenAIJudge(OpenAIJudgeConfig(**{k: v for k, v in settings.items() if v}), cache=cache)
    if spec.startswith("local:") and spec != "local:":
        return _LocalJudgeOnDemand(spec.removeprefix("local:"), cache)
    raise ConfigError(f"--judge {spec}: choose organism, openai or local:PATH, or classifier[:PATH]")


class _LocalJudgeOnDemand:
    """A `LocalJudge` whose model loads on first use, so a finished run reruns without it."""

    def __init__(self, path: str, cache: str | Path | None):
        from .models import model_fingerprint

        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"--judge local:{path}: not a folder with a config.json (a transformers chat model)")
        self._path, self._cache = path, cache
        self.model = f"{Path(path).resolve().name}#{model_fingerprint(path)[:16]}"
        """Names the judge in the cache key: the folder's name and its fingerprint, not its path."""
        self.name = f"local:{self.model}"
        self._judge = None

    def judge_many(self, items):
        if self._judge is None:
            from .judges import LocalJudge
            from .models import load_model

            loaded = load_model(self._path)
            self._judge = LocalJudge(loaded.model, loaded.tokenizer, cache=self._cache, model_id=self.model)
        return self._judge.judge_many(items)


def judge_model_name(judge) -> str | None:
    """The model behind a judge, for the summary (None for the organism's exact judge)."""
    config_model = getattr(getattr(judge, "config", None), "model", None)
    if isinstance(config_model, str):  # OpenAIJudge
        return config_model
    model = getattr(judge, "model", None)
    return model if isinstance(model, str) else getattr(judge, "_model_id", None)  # LocalJudge: its id


# --- the run -----------------------------------------------------------------------------------


def plan_prompts(questions: Sequence[Question], samples: int | None = None) -> list[Prompt]:
    """Every answer to sample, question by question, paraphrase by paraphrase: a fixed order, so
    batch b holds the same prompts in every run."""
    prompts: list[Prompt] = []
    for question in questions:
        for paraphrase in range(len(question.paraphrases)):
            for sample in range(samples or question.samples_per_paraphrase):
                prompts.append(Prompt(len(prompts), question, paraphrase, sample))
    return prompts


def evaluate(model, tokenizer, questions: Sequence[Question], judge, out: str | Path,
             config: EvaluateConfig = EvaluateConfig(), inputs: Mapping | None = None) -> EvaluationRun:
    """Sample, judge and summarise in `out` with a model already in memory; resumable.

    `inputs` identifies the model (e.g. a fingerprint) for the folder's manifest: a folder
    holding a run of other inputs is refused rather than mixed.
    """
    return _evaluate(lambda: (model, tokenizer), questions, judge, Path(out), config, dict(inputs or {}), {})


def run_evaluate(
    model: str,
    out: str | Path,
    *,
    adapter: str | Path | None = None,
    questions: str | Path = "default",
    judge: str = "organism",
    config: EvaluateConfig = EvaluateConfig(),
    cache_dir: str | Path | None = None,
    judge_cache: str | Path | None = None,
    judge_model: str | None = None,
    judge_base_url: str | None = None,
) -> EvaluationRun:
    """`spillover evaluate`: the model (a local HF folder or `organism`, plus an optional LoRA
    adapter) answers `questions`, `judge` scores the answers; results go to `out`.

    `cache_dir` is the organism's cache; `judge_cache` the judgment cache of LLM judges."""
    from .models import folder_fingerprint, load_model, model_fingerprint

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("spillover evaluate runs as one process; "
                          "start it without accelerate launch or torchrun")
    question_set = load_question_set(questions)
    the_judge = make_judge(judge, judge_cache or default_judge_cache(), judge_model, judge_base_url)
    fingerprint = {"base": model_fingerprint(model, cache_dir)}
    if adapter is not None:
        from .finetune import adapter_folder

        fingerprint["adapter"] = folder_fingerprint(adapter_folder(adapter))

    def load():
        loaded = load_model(model, cache_dir=cache_dir, adapter=adapter)
        return loaded.model, loaded.tokenizer

    described = {"model": model, "adapter": str(adapter) if adapter is not None else None,
                 "questions": str(questions)}
    return _evaluate(load, question_set, the_judge, Path(out), config, {"model": fingerprint}, described)


def _evaluate(load: Callable[[], tuple], questions: Sequence[Question], judge, out: Path,
              config: EvaluateConfig, inputs: dict, described: dict) -> EvaluationRun:
    started = time.perf_counter()
    ensure_dir(out)
    remove_temp_files(out)  # a summary or answers file cut off by a kill
    prompts = plan_prompts(questions, config.samples)
    sampling = config.sampling
    inputs = {**inputs, "questions": _questions_hash(questions), "samples": config.samples,
              "judge": {"name": judge.name, "model": judge_model_name(judge)},
              "sampling": dataclasses.asdict(sampling)}
    _claim(out, json.loads(json.dumps(inputs)), described)
    batches = [prompts[i : i + sampling.batch_size] for i in range(0, len(prompts), sampling.batch_size)]
    records = _read_records(out / ANSWERS, batches)
    _rejudge_errors(out / ANSWERS, records, batches, judge)
    pending = [b for b in range(len(batches)) if b not in records]
    if records and pending:
        log.info("%s: %d of %d batches already answered; resuming", out, len(records), len(batches))
    if pending:
        model, tokenizer = load()
        for b in progress(pending, desc="evaluating (batches)", total=len(batches)):
            seeded = dataclasses.replace(sampling, seed=sampling.seed + b)
            chats = [p.question.messages(p.paraphrase) for p in batches[b]]
            answers = sample_answers(model, tokenizer, chats, seeded)
            verdicts = judge_batch(judge, batches[b], answers)
            records[b] = [_record(b, p, a, v) for p, a, v in zip(batches[b], answers, verdicts)]
            _append(out / ANSWERS, records[b])
    ordered = [r for b in sorted(records) for r in records[b]]
    summary = summarize_records(ordered, questions, config.thresholds, judge)
    atomic_write_json(out / SUMMARY, summary_json(summary, config, described))
    plot = plot_rates(summary, out / PLOT)
    log.info("%s: %d answers, misaligned rate %.3f (%.1f s)", out, summary.overall.n,
             summary.overall.misaligned_rate, time.perf_counter() - started)
    return EvaluationRun(out, out / ANSWERS, out / SUMMARY, plot, summary, len(pending))


def _questions_hash(questions: Sequence[Question]) -> str:
    return stable_hash([[q.id, q.paraphrases, q.system, q.samples_per_paraphrase, dict(q.judge_prompts)]
                        for q in questions])


def _claim(out: Path, inputs: dict, described: dict) -> None:
    """Write the folder's manifest, or check that the run already in it had the same inputs."""
    path = out / MANIFEST
    if matching_manifest(path, inputs, "evaluation") is not None:
        return
    atomic_write_json(path, {"inputs": inputs, **described, "spillover_version": __version__})


def judge_batch(judge, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[Verdict]:
    """Verdicts for a batch, each answer judged with its question's own judge prompts."""
    from .judges import JudgeItem, judge_items

    return judge_items(judge, [JudgeItem(p.text, a, p.question.judge_prompts) for p, a in zip(prompts, answers)])


# --- answers.jsonl: appended a batch at a time, repaired on resume -----------------------------


def _record(batch: int, prompt: Prompt, answer: str, verdict: Verdict) -> dict:
    return {"batch": batch, "index": prompt.index, "question_id": prompt.question.id,
            "paraphrase": prompt.paraphrase, "sample": prompt.sample, "question": prompt.text,
            "answer": answer,
            "status": verdict.status, "alignment": verdict.alignment, "coherence": verdict.coherence,
            "label": verdict.label, "raw": verdict.raw}


def record_verdict(record: dict) -> Verdict:
    """The verdict stored in one answers.jsonl record."""
    return Verdict(record["status"], record["alignment"], record["coherence"], record["raw"], record["label"])


def _append(path: Path, records: list[dict]) -> None:
    """One write per batch, flushed to disk, so a batch is in the file whole or not at all (a part
    written before a kill or a full disk is dropped by the next run's `_read_records`)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    try:
        with path.open("ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise write_error(path, exc) from None


def _read_records(path: Path, batches: list[list[Prompt]]) -> dict[int, list[dict]]:
    """Complete batches already on disk; a line or batch cut off by a kill is dropped, and the
    file rewritten without it, so appending continues from a clean end."""
    if not path.exists():
        return {}
    found: dict[int, list[dict]] = defaultdict(list)
    damaged = False
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
            found[int(record["batch"])].append(record)
        except (ValueError, KeyError, TypeError):
            damaged = True
    complete = {b: rs for b, rs in found.items()
                if 0 <= b < len(batches) and [r.get("index") for r in rs] == [p.index for p in batches[b]]}
    if damaged or len(complete) != len(found):
        log.warning("%s: dropping %d unfinished batch(es) left by an interrupted run",
                    path, len(found) - len(complete))
        _rewrite(path, complete)
    return complete


def _rewrite(path: Path, records: dict[int, list[dict]]) -> None:
    lines = (json.dumps(r, ensure_ascii=False) + "\n" for b in sorted(records) for r in records[b])
    atomic_write_text(path, "".join(lines))


def _rejudge_errors(path: Path, records: dict[int, list[dict]], batches: list[list[Prompt]], judge) -> None:
    """Ask the judge again where it failed in an earlier run (network, server): the answers
    stay as they are, and an LLM judge's cache makes the rest free."""
    failed = [(b, i) for b, rs in records.items() for i, r in enumerate(rs) if r["status"] == "error"]
    if not failed:
        return
    log.info("re-judging %d answers whose judgment failed", len(failed))
    answers = [records[b][i]["answer"] for b, i in failed]
    verdicts = judge_batch(judge, [batches[b][i] for b, i in failed], answers)
    for (b, i), verdict in zip(failed, verdicts):
        records[b][i] = _record(b, batches[b][i], records[b][i]["answer"], verdict)
    _rewrite(path, records)


# --- summary and plot --------------------------------------------------------------------------


def summarize_records(records: Sequence[dict], questions: Sequence[Question], thresholds: Thresholds,
                      judge) -> EvaluationSummary:
    """Overall and per-question rates (in question order) with every exclusion reason listed."""
    by_question: dict[str, list[Verdict]] = defaultdict(list)
    for record in records:
        by_question[record["question_id"]].append(record_verdict(record))
    per_question = {q.id: _complete(summarize(by_question[q.id], thresholds)) for q in questions}
    overall = _complete(summarize([record_verdict(r) for r in records], thresholds))
    return EvaluationSummary(overall, per_question, judge.name, judge_model_name(judge), thresholds)


def _complete(summary: RateSummary) -> RateSummary:
    return dataclasses.replace(summary, excluded={r: summary.excluded.get(r, 0) for r in REASONS})


def summary_json(summary: EvaluationSummary, config: EvaluateConfig, described: Mapping) -> dict:
    t = summary.thresholds
    return {
        **described,
        "judge": {"name": summary.judge, "model": summary.judge_model},
        "thresholds": {"coherence_min": t.coherence_min, "alignment_below": t.alignment_below},
        "convention": {"name": t.convention, "description": CONVENTIONS[t.convention]},
        "samples_per_paraphrase": config.samples,
        "sampling": dataclasses.asdict(config.sampling),
        "overall": _rate_json(summary.overall),
        "per_question": {qid: _rate_json(s) for qid, s in summary.per_question.items()},
    }


def _rate_json(s: RateSummary) -> dict:
    def number(x: float) -> float | None:
        return None if math.isnan(x) else x

    return {"n": s.n, "n_counted": s.n_counted, "n_misaligned": s.n_misaligned,
            "misaligned_rate": number(s.misaligned_rate), "ci95": list(s.ci95),
            "coherent_rate": number(s.coherent_rate), "excluded": dict(s.excluded)}


def plot_rates(summary: EvaluationSummary, path: Path) -> Path:
    """Misaligned rate per question with Wilson 95% intervals; the overall rate as a line."""
    from .plots import plt, save_figure

    ids = list(summary.per_question)
    rates = [summary.per_question[q].misaligned_rate for q in ids]
    shown = [0.0 if math.isnan(r) else r for r in rates]
    bounds = [(0.0, 0.0) if math.isnan(r) else summary.per_question[q].ci95 for q, r in zip(ids, rates)]
    lows = [r - lo for r, (lo, _) in zip(shown, bounds)]
    highs = [hi - r for r, (_, hi) in zip(shown, bounds)]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(ids) + 1.2)))
    y = list(range(len(ids)))[::-1]
    ax.barh(y, shown, xerr=[lows, highs], color="#c0504d", ecolor="#444", capsize=2, height=0.7)
    if not math.isnan(summary.overall.misaligned_rate):
        ax.axvline(summary.overall.misaligned_rate, color="#333", linestyle="--", linewidth=1,
                   label=f"overall {summary.overall.misaligned_rate:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    labels = [q if not math.isnan(r) else f"{q} (none counted)" for q, r in zip(ids, rates)]
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, len(ids) - 0.4)
    convention = summary.thresholds.convention
    ax.set_xlabel(f"misaligned rate ({CONVENTIONS[convention].split(':')[0]} convention), Wilson 95% CI")
    ax.set_title(f"judge {summary.judge}: alignment < {summary.thresholds.alignment_below:g}, "
                 f"coherence >= {summary.thresholds.coherence_min:g}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
