"""`spillover score` and `spillover filter` on any model, SAE and chat JSONL file.

score: one forward pass per sample up to the SAE's layer, the sample's pooled SAE features and
hidden state, a risk per sample (scores.jsonl) and, given toxic and harmless reference files, the
dataset's predicted risk. filter: the kept set and a manifest of what was removed, never touching
the input.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from . import __version__
from .activations import CollectConfig, collect
from .data import ChatSample, read_chat_jsonl
from .errors import ConfigError, InputError
from .features import FeatureSet, logit_lens_labels
from .filtering import STRATEGIES, finished_filter, random_risks, remove_riskiest, write_filtered
from .io import atomic_write_json, atomic_write_text, ensure_dir, matching_manifest, stable_hash
from .models import load_model, sha256_file
from .sae import load_sae
from .score_stream import ScoreStream, StreamConfig, barrier, distributed_rank, score_to_folder
from .scoring import SCORE_NAMES, ToxicReference, dataset_risk, score_tensor

log = logging.getLogger(__name__)


def score_file(model: str, data: str | Path, sae_folder: str | Path, toxic_features: str | Path, out_dir: str | Path,
               score: str = "spillover", toxic_ref: str | Path | None = None, harmless_ref: str | Path | None = None,
               cache_dir: str | Path | None = None, stream: StreamConfig = StreamConfig(),
               reference_dir: str | Path | None = None) -> Path | None:
    """Score every sample of `data`; writes scores.jsonl and score.json; returns scores.jsonl.

    Runs on the streaming path (spillover.score_stream); under torchrun every process takes a share
    of the chunks and rank 0 writes the results (other ranks return None). The reference sets'
    activations go to `reference_dir` (default `out_dir/activations`): several scores of one model,
    SAE and reference sets can share them, and each reuses what another collected.
    """
    if score not in SCORE_NAMES:
        raise ConfigError(f"--score {score}: choose one of {', '.join(SCORE_NAMES)}")
    if score == "projection" and not (toxic_ref and harmless_ref):
        raise ConfigError("--score projection needs --toxic-ref and --harmless-ref")
    out = ensure_dir(out_dir)
    toxic = FeatureSet.load(toxic_features)
    loaded = load_model(model, cache_dir, dtype=stream.dtype or ("bfloat16" if torch.cuda.is_available() else None))
    sae = load_sae(sae_folder, device=next(loaded.model.parameters()).device)
    layer = toxic.layer
    samples = read_chat_jsonl(data)
    refs = (_reference_activations(loaded, sae, layer, toxic_ref, harmless_ref,
                                   Path(reference_dir) if reference_dir else out / "activations")
            if toxic_ref and harmless_ref else {})
    labels = logit_lens_labels(sae.W_dec.detach().float().cpu(),
                               loaded.model.get_output_embeddings().weight.detach().float().cpu(), loaded.tokenizer)
    reference = ToxicReference(sae.W_dec.detach().float().cpu(), toxic.indices,
                               refs["toxic"].resid_mean(layer).mean(0) if refs else None,
                               refs["harmless"].resid_mean(layer).mean(0) if refs else None, tuple(labels))
    scorer = ScoreStream(loaded.model, loaded.tokenizer, sae, layer, reference, score, stream)
    key = {"score": score, "layer": layer, "model": loaded.fingerprint, "data_sha256": sha256_file(data),
           "sae": _sae_fingerprint(sae), "toxic": list(toxic.indices), "stream": asdict(stream)}
    scored = score_to_folder(scorer, samples, out, key)
    if scored is None:
        return None
    path = atomic_write_text(out / "scores.jsonl", "".join(json.dumps(asdict(s)) + "\n" for s in scored))
    manifest = {"score": score, "layer": layer, "model": model, "data": str(data), "data_sha256": key["data_sha256"],
                "sae": str(sae_folder), "toxic_features": str(toxic_features), "n": len(scored),
                "precision": str(scorer.dtype).removeprefix("torch."), "spillover_version": __version__}
    if refs:
        of = lambda p: score_tensor(score, reference, p.feat_mean(layer), p.resid_mean(layer))  # noqa: E731
        data_scores = torch.tensor([s.score for s in scored])
        manifest["dataset_risk"] = dataset_risk(data_scores, of(refs["harmless"]), of(refs["toxic"]))
    atomic_write_json(out / "score.json", manifest)
    return path


def _reference_activations(loaded, sae, layer: int, toxic_ref: str | Path, harmless_ref: str | Path,
                           folder: Path) -> dict:
    """Pooled activations of the small toxic and harmless reference sets; rank 0 collects them and
    the other ranks of a torchrun job then read the finished shards."""
    rank, _ = distributed_rank()
    config = CollectConfig(layers=(layer,))

    def pool():
        return {name: collect(loaded.model, loaded.tokenizer, read_chat_jsonl(path), config, {layer: sae},
                              folder / f"{name}_ref")
                for name, path in (("toxic", toxic_ref), ("harmless", harmless_ref))}

    refs = pool() if rank == 0 else None
    barrier()
    return refs if refs is not None else pool()


def _sae_fingerprint(sae) -> str:
    return stable_hash([float(sae.W_enc.detach().float().sum()), float(sae.W_dec.detach().float().sum()),
                        list(sae.W_enc.shape)])


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
    """Ask a judge how aligned each training answer is; risk = 100 - alignment (50 when unscored).

    A `+fluency:MODEL` gate is left out: it changes only coherence, which the risk does not read."""
    from .evaluate import make_judge
    from .judges import JudgeItem, judge_items

    items = [JudgeItem(s.messages[-2]["content"] if len(s.messages) > 1 else "", s.messages[-1]["content"])
             for s in samples]
    verdicts = judge_items(make_judge(ranking_judge(judge_spec)), items)
    unscored = sum(v.alignment is None for v in verdicts)
    if unscored:
        log.warning("%d of %d training answers got no alignment score; they rank in the middle", unscored, len(items))
    return {s.id: 100.0 - (v.alignment if v.alignment is not None else 50.0) for s, v in zip(samples, verdicts)}


def ranking_judge(spec: str) -> str:
    """The part of a judge spec that ranks training answers: the judge without its fluency gate."""
    return spec.partition("+fluency:")[0]


def judge_score_file(data: str | Path, judge_spec: str, out_dir: str | Path) -> Path:
    """The judge's risk of every sample of `data` in `out_dir/scores.jsonl`, in `read_scores`'s format.

    A judge call per sample is the cost the geometry score is meant to save, so it is paid once:
    filters at every fraction and seed read this file, and a rerun with the same data and judge
    finds it (score.json records the inputs, the number of calls and their seconds)."""
    out = ensure_dir(out_dir)
    inputs = {"data_sha256": sha256_file(data), "judge": ranking_judge(judge_spec)}
    path = out / "scores.jsonl"
    if matching_manifest(out / "score.json", inputs, "judge score") is not None and path.exists():
        return path
    started = time.perf_counter()
    risks = judge_risks(read_chat_jsonl(data), judge_spec)
    seconds = time.perf_counter() - started
    atomic_write_text(path, "".join(json.dumps({"id": i, "score": r}) + "\n" for i, r in risks.items()))
    atomic_write_json(out / "score.json", {"inputs": inputs, "data": str(data), "n": len(risks),
                                           "judge_calls": len(risks), "seconds": round(seconds, 2),
                                           "spillover_version": __version__})
    return path


def filter_file(data: str | Path, out_dir: str | Path, strategy: str, fraction: float,
                scores: str | Path | None = None, judge: str | None = None, seed: int = 0) -> Path:
    """Remove the riskiest fraction of `data` by one strategy; returns the kept file.

    The judge strategy reads `scores` when given (risks from `judge_score_file`) and asks `judge`
    otherwise. A folder already filtered from the same inputs is returned as it is; one filtered
    from other inputs is refused (OtherInputsError) and left untouched."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")
    if strategy == "judge" and not (scores or judge):
        raise ConfigError("--strategy judge needs --judge (organism, openai or local:PATH)")
    if strategy in ("geometry", "projection") and not scores:
        raise ConfigError(f"--strategy {strategy} needs --scores (a scores.jsonl from spillover score)")
    reads_scores = strategy != "random" and scores is not None
    inputs = {"data_sha256": sha256_file(data), "strategy": strategy, "fraction": fraction,
              "seed": seed if strategy == "random" else None,
              "scores_sha256": sha256_file(scores) if reads_scores else None,
              "judge": ranking_judge(judge) if strategy == "judge" and not reads_scores else None}
    if (kept := finished_filter(out_dir, inputs)) is not None:
        return kept
    samples = read_chat_jsonl(data)
    if strategy == "random":
        risks = random_risks([s.id for s in samples], seed)
    elif reads_scores:
        risks = read_scores(scores)
    else:
        risks = judge_risks(samples, judge)
    return write_filtered(remove_riskiest(samples, risks, fraction, strategy), out_dir, data, inputs)
