"""How far two judges agree on the same answers.

A cheap judge (the offline classifier, a small local model) is only worth its rates if it calls
answers the way a strong LLM judge would. `spillover judge agree` takes the answers an evaluation
already judged, asks a second judge about each of them, and reports how often the two make the
same misaligned / aligned call, with Cohen's kappa, beside both judges' misaligned rates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, InputError, shown
from .io import atomic_write_json
from .judge import Verdict
from .metrics import Thresholds, outcome, summarize

RECORD_FIELDS = ("question", "answer", "status", "alignment", "coherence", "raw", "label")


def agreement(ours: Sequence[Verdict], theirs: Sequence[Verdict], thresholds: Thresholds = Thresholds()) -> dict:
    """How often two judges make the same misaligned / aligned call on the same answers, over the
    answers both count (coherent, scored); Cohen's kappa corrects for chance agreement."""
    if len(ours) != len(theirs):
        raise ConfigError(f"agreement: {len(ours)} and {len(theirs)} verdicts; judge the same answers")
    pairs = [(outcome(a, thresholds), outcome(b, thresholds)) for a, b in zip(ours, theirs)]
    both = [(a == "misaligned", b == "misaligned") for a, b in pairs
            if a in ("misaligned", "aligned") and b in ("misaligned", "aligned")]
    n = len(both)
    table = {"both_misaligned": sum(a and b for a, b in both), "both_aligned": sum(not a and not b for a, b in both),
             "only_ours": sum(a and not b for a, b in both), "only_theirs": sum(b and not a for a, b in both)}
    return {"n": len(pairs), "n_both_counted": n, **table,
            "agreement": (table["both_misaligned"] + table["both_aligned"]) / n if n else None,
            "kappa": cohen_kappa(both)}


def cohen_kappa(pairs: Sequence[tuple[bool, bool]]) -> float | None:
    """(observed - chance agreement) / (1 - chance); None without pairs, 1.0 when both judges
    make one and the same call throughout (no chance term to correct)."""
    n = len(pairs)
    if not n:
        return None
    observed = sum(a == b for a, b in pairs) / n
    pa, pb = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    if chance >= 1.0:
        return 1.0 if observed == 1.0 else 0.0
    return (observed - chance) / (1 - chance)


def read_judged_answers(path: str | Path) -> list[dict]:
    """The records of an evaluation's `answers.jsonl`, each checked for the fields agreement reads."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (give an evaluation's answers.jsonl)")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{path}:{number}: not JSON ({exc.msg})") from None
            missing = [f for f in RECORD_FIELDS if not isinstance(record, dict) or f not in record]
            if missing:
                raise InputError(f"{path}:{number}: missing {', '.join(missing)} in {shown(record)}")
            records.append(record)
    if not records:
        raise InputError(f"{path}: no judged answers")
    return records


def _recorded_judge(answers: Path) -> str | None:
    """The first judge's name, from the summary.json beside the answers, when there is one."""
    try:
        return json.loads((answers.parent / "summary.json").read_text())["judge"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _rate(verdicts: Sequence[Verdict], thresholds: Thresholds) -> dict:
    summary = summarize(verdicts, thresholds)
    return {"n_counted": summary.n_counted, "n_misaligned": summary.n_misaligned,
            "misaligned_rate": summary.misaligned_rate if summary.n_counted else None, "ci95": list(summary.ci95)}


def judge_agreement(answers: str | Path, judge, out: str | Path, prompts_by_question: dict | None = None,
                    thresholds: Thresholds = Thresholds()) -> dict:
    """Judge every answer of `answers` (an evaluation's answers.jsonl) again with `judge`, compare
    with the verdicts recorded there, and write the comparison to `out` (JSON, atomically)."""
    from .evaluate import record_verdict
    from .judges import JudgeItem, judge_items

    answers, out = Path(answers), Path(out)
    if out.resolve() == answers.resolve():
        raise ConfigError(f"--out {out}: that is the answers file; write the agreement elsewhere")
    records = read_judged_answers(answers)
    prompts_by_question = prompts_by_question or {}
    items = [JudgeItem(r["question"], r["answer"], prompts_by_question.get(r.get("question_id"))) for r in records]
    theirs = judge_items(judge, items)
    ours = [record_verdict(r) for r in records]
    result = {
        "answers": str(answers),
        "ours": {"judge": _recorded_judge(answers), "overall": _rate(ours, thresholds)},
        "theirs": {"judge": judge.name, "overall": _rate(theirs, thresholds)},
        "thresholds": {"coherence_min": thresholds.coherence_min, "alignment_below": thresholds.alignment_below},
        "agreement": agreement(ours, theirs, thresholds),
        "calls": [{"index": r.get("index", i), "ours": outcome(a, thresholds), "theirs": outcome(b, thresholds)}
                  for i, (r, a, b) in enumerate(zip(records, ours, theirs))],
    }
    atomic_write_json(out, result)
    return result
