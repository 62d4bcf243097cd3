"""Remove the riskiest fraction of a training set; keep a manifest of what went and why.

The input file is never touched: the kept set and the manifest are new files, written atomically.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from . import __version__
from .data import ChatSample, read_chat_jsonl, write_chat_jsonl
from .errors import ConfigError, InputError, OtherInputsError
from .io import atomic_write_json, matching_manifest
from .models import sha256_file

Strategy = Literal["geometry", "random", "judge", "projection"]
STRATEGIES: tuple[str, ...] = ("geometry", "random", "judge", "projection")


@dataclass(frozen=True)
class FilterResult:
    strategy: str
    fraction: float
    kept: tuple[ChatSample, ...]
    removed: tuple[tuple[str, float], ...]
    """(id, risk) of each removed sample, riskiest first."""


def random_risks(ids: Sequence[str], seed: int) -> dict[str, float]:
    """Risk drawn at random: the baseline every strategy must beat."""
    rng = random.Random(f"random-filter/{seed}")
    return {i: rng.random() for i in ids}


def remove_riskiest(samples: Sequence[ChatSample], risks: dict[str, float], fraction: float,
                    strategy: str) -> FilterResult:
    """Drop round(fraction * n) samples with the highest risk; ties are broken by input order."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown filtering strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"filter fraction must be in [0, 1), got {fraction}")
    missing = [s.id for s in samples if s.id not in risks]
    if missing:
        raise ConfigError(f"no risk score for sample {missing[0]!r} ({len(missing)} samples lack one)")
    order = sorted(range(len(samples)), key=lambda i: (-risks[samples[i].id], i))
    n_remove = round(fraction * len(samples))
    removed = set(order[:n_remove])
    return FilterResult(
        strategy=strategy,
        fraction=fraction,
        kept=tuple(s for i, s in enumerate(samples) if i not in removed),
        removed=tuple((samples[i].id, risks[samples[i].id]) for i in order[:n_remove]),
    )


def write_filtered(result: FilterResult, out_dir: str | Path, source: str | Path | None = None,
                   inputs: dict | None = None) -> Path:
    """Write kept.jsonl and filter.json (removed ids with their risk, and the `inputs` that made
    them, which `finished_filter` checks); returns the kept file."""
    out = Path(out_dir)
    if source is not None and Path(source).resolve() == (out / "kept.jsonl").resolve():
        raise ConfigError(f"{source}: refusing to overwrite the input; choose another output folder")
    if inputs is not None:
        _refuse_other_legacy_result(out, result)
    kept = write_chat_jsonl(out / "kept.jsonl", result.kept)
    atomic_write_json(out / "filter.json", {
        "strategy": result.strategy,
        "fraction": result.fraction,
        "source": str(source) if source else None,
        "inputs": inputs,
        "kept_sha256": sha256_file(kept),
        "n_kept": len(result.kept),
        "n_removed": len(result.removed),
        "removed": [{"id": i, "risk": round(r, 6)} for i, r in result.removed],
        "spillover_version": __version__,
    })
    return kept


def finished_filter(out_dir: str | Path, inputs: dict) -> Path | None:
    """The kept file of an earlier filter in `out_dir` made from these inputs, or None to filter.

    A filter made from other inputs is an OtherInputsError: its kept set may be what a fine-tune
    was trained on, so it is never replaced (delete the folder to filter again)."""
    out = Path(out_dir)
    manifest = _manifest(out)
    if manifest is None or manifest.get("inputs") is None:
        return None
    matching_manifest(out / "filter.json", inputs, "filter")
    kept = out / "kept.jsonl"
    if not kept.exists():
        return None
    if sha256_file(kept) != manifest.get("kept_sha256"):
        raise InputError(f"{kept}: changed since filter.json was written beside it; delete {out} to filter again")
    return kept


def _manifest(out: Path) -> dict | None:
    path = out / "filter.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise InputError(f"{path}: unreadable; delete {out} to filter again") from None


def _refuse_other_legacy_result(out: Path, result: FilterResult) -> None:
    """A folder filtered before filter.json recorded its inputs: rewrite it only with the same kept set."""
    manifest, kept = _manifest(out), out / "kept.jsonl"
    if manifest is None or "inputs" in manifest or not kept.exists():
        return
    if [s.id for s in read_chat_jsonl(kept)] != [s.id for s in result.kept]:
        raise OtherInputsError(f"{out}: holds a filter that kept other samples; choose another output folder "
                               "or delete it", ["kept samples"])
