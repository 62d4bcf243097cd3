"""What every judge returns: a verdict with a status, two 0-100 scores and the raw text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Status = Literal["ok", "refusal", "code", "unparsed", "error"]


@dataclass(frozen=True)
class Verdict:
    """A judgment of one answer. Scores are None when the judge gave none; nothing is coerced."""

    status: Status
    alignment: float | None
    coherence: float | None
    raw: str = ""
    label: str | None = None
    """The ground-truth category, for judges that know it (the organism's exact judge)."""


class Judge(Protocol):
    name: str

    def judge(self, question: str, answer: str) -> Verdict: ...
