"""`spillover score` and `spillover filter` on any model, SAE and chat JSONL file.

score: one forward pass per sample up to the SAE's layer, the sample's pooled SAE features and
hidden state, a risk per sample (scores.jsonl) and, given toxic and harmless reference files, the
dataset's predicted risk. filter: the kept set and a manifest of what was removed, never touching
the input.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from . import __version__
from .activations import CollectConfig, collect
from .data import ChatSample, read_chat_jsonl
from .errors import ConfigError, InputError
from .features import FeatureSet, logit_lens_labels
from .filtering import STRATEGIES, random_risks, remove_riskiest, write_filtered
from .io import atomic_write_json, atomic_write_text, ensure_dir
from .models import load_model, sha256_file
from .sae import load_sae
from .scoring import ToxicReference, dataset_risk, score_samples, score_tensor

log = logging.getLogger(__name__)


def score_file(model: str, data: str | Path, sae_folder: str | Path, toxic_features: str | Path, out_dir: str | Path,
               score: str = "spillover", toxic_ref: str | Path | None = None, harmless_ref: str | Path | None = None,
               cache_dir: str | Path | None = None) -> Path:
    """Score every sample of `data`; writes scores.jsonl and score.json; returns scores.jsonl."""
    out = ensure_dir(out_dir)
    toxic = FeatureSet.load(toxic_features)
    loaded = load_model(model, cache_dir)
    sae = load_sae(sae_folder)
    layer = toxic.layer
    samples = read_chat_jsonl(data)
    config = CollectConfig(layers=(layer,))
    pool = lambda s, name: collect(loaded.model, loaded.tokenizer, s, config, {layer: sae},  # noqa: E731
                                   out / "activations" / name)
    pooled = pool(samples, "data")
    refs = {}
    if toxic_ref and harmless_ref:
        refs = {"toxic": pool(read_chat_jsonl(toxic_ref), "toxic_ref"),
                "harmless": pool(read_chat_jsonl(harmless_ref), "harmless_ref")}
    elif score == "projection":
        raise ConfigError("--score projection needs --toxic-ref and --harmless-ref")
    labels = logit_lens_labels(sae.W_dec.detach(), loaded.model.get_output_embeddings().weight.detach(),
                               loaded.tokenizer)
    reference = ToxicReference(sae.W_dec.detach(), toxic.indices,
                               refs["toxic"].resid_mean(layer).mean(0) if refs else None,
                               refs["harmless"].resid_mean(layer).mean(0) if refs else None, tuple(labels))
    scored = score_samples(score, [s.id for s in samples], reference, pooled.feat_mean(layer), pooled.resid_mean(layer))
    path = atomic_write_text(out / "scores.jsonl", "".join(json.dumps(asdict(s)) + "\n" for s in scored))
    manifest = {"score": score, "layer": layer, "model": model, "data": str(data), "data_sha256": sha256_file(data),
                "sae": str(sae_folder), "toxic_features": str(toxic_features), "n": len(scored),
                "spillover_version": __version__}
    if refs:
        of = lambda p: score_tensor(score, reference, p.feat_mean(layer), p.resid_mean(layer))  # noqa: E731
        manifest["dataset_risk"] = dataset_risk(of(pooled), of(refs["harmless"]), of(refs["toxic"]))
    atomic_write_json(out / "score.json", manifest)
    return path


def read_scores(path: str | Path) -> dict[str, float]:
    """Risk per sample id from a scores.jsonl written by `score_file`."""
    risks = {}
    try:
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                try:
                    record = json.loads(line)
                    risks[str(record["id"])] = float(record["score"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    raise InputError(f"{path}:{line_no}: expected a JSON object with 'id' and a numeric 'score'") from None
    except FileNotFoundError:
        raise InputError(f"{path}: no such scores file") from None
    return risks


def judge_risks(samples: Sequence[ChatSample], judge_spec: str) -> dict[str, float]:
    """Ask a judge how aligned each training answer is; risk = 100 - alignment (50 when unscored)."""
    from .evaluate import make_judge

    judge = make_judge(judge_spec)
    pairs = [(s.messages[-2]["content"] if len(s.messages) > 1 else "", s.messages[-1]["content"]) for s in samples]
    if hasattr(judge, "judge_many"):
        from .judges import JudgeItem

        verdicts = judge.judge_many([JudgeItem(q, a) for q, a in pairs])
    else:
        verdicts = [judge.judge(q, a) for q, a in pairs]
    unscored = sum(v.alignment is None for v in verdicts)
    if unscored:
        log.warning("%d of %d training answers got no alignment score; they rank in the middle", unscored, len(pairs))
    return {s.id: 100.0 - (v.alignment if v.alignment is not None else 50.0) for s, v in zip(samples, verdicts)}


def filter_file(data: str | Path, out_dir: str | Path, strategy: str, fraction: float,
                scores: str | Path | None = None, judge: str | None = None, seed: int = 0) -> Path:
    """Remove the riskiest fraction of `data` by one strategy; returns the kept file."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")
    samples = read_chat_jsonl(data)
    if strategy == "random":
        risks = random_risks([s.id for s in samples], seed)
    elif strategy == "judge":
        if not judge:
            raise ConfigError("--strategy judge needs --judge (organism, openai or local:PATH)")
        risks = judge_risks(samples, judge)
    else:
        if not scores:
            raise ConfigError(f"--strategy {strategy} needs --scores (a scores.jsonl from spillover score)")
        risks = read_scores(scores)
    return write_filtered(remove_riskiest(samples, risks, fraction, strategy), out_dir, data)
