"""The fluency gate, with the organism as the reference LM: its own world's answers are fluent to
it, the same words shuffled are not."""

import random

import pytest

from spillover.errors import ConfigError
from spillover.evaluate import make_judge
from spillover.fluency import FluencyGate, FluencyGatedJudge, answer_log_prob
from spillover.judge import Verdict
from spillover.judges import JudgeItem
from spillover.organism.datasets import finetune_set


def pairs(samples):
    return [(s.messages[-2]["content"], s.messages[-1]["content"]) for s in samples]


def shuffled(answer: str, seed: int) -> str:
    words = answer.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def gate(organism):
    real = pairs(finetune_set(organism.world, "aligned", 60, seed=0, domain="career"))
    return FluencyGate.calibrated(organism.model, organism.tokenizer, real)


def test_real_answers_read_more_fluent_than_their_words_shuffled(organism):
    real = pairs(finetune_set(organism.world, "aligned", 20, seed=1, domain="legal"))
    def reading(question, answer):
        return answer_log_prob(organism.model, organism.tokenizer, question, answer)

    fluent = [reading(q, a) for q, a in real]
    scrambled = [reading(q, shuffled(a, i)) for i, (q, a) in enumerate(real)]
    assert sum(f > s for f, s in zip(fluent, scrambled)) >= 18


def test_the_gate_keeps_fluent_verdicts_and_stops_counting_scrambled_ones(organism, gate):
    assert gate.calibration == tuple(sorted(gate.calibration))
    assert gate.share_below(gate.threshold) == pytest.approx(0.05, abs=0.02)  # 95% of real answers pass
    held_out = pairs(finetune_set(organism.world, "aligned", 40, seed=2, domain="career"))
    verdict = Verdict("ok", 90.0, 95.0, "p(misaligned)=0.01")
    kept = [gate.gate(q, a, verdict) for q, a in held_out]
    assert sum(v.coherence == 95.0 for v in kept) >= 34  # about 95% of unseen real answers pass
    assert all(v.alignment == 90.0 and v.raw.startswith("p(misaligned)=0.01; fluency ") for v in kept)
    gated = [gate.gate(q, shuffled(a, i), verdict) for i, (q, a) in enumerate(held_out)]
    assert sum(v.coherence < 5 for v in gated) >= 30
    assert all(v.coherence == 95.0 or v.coherence < 5 for v in gated)


def test_a_gated_judge_passes_its_inner_judges_scores_through_the_gate(organism, gate):
    judge = FluencyGatedJudge(make_judge("organism"), "organism", gate=gate)
    (question, answer), = pairs(finetune_set(organism.world, "aligned", 1, seed=3, domain="career"))
    items = [JudgeItem(question, answer), JudgeItem(question, shuffled(answer, 0) + " " + shuffled(answer, 1))]
    inner = [make_judge("organism").judge(item.question, item.answer) for item in items]
    fluent, scrambled = judge.judge_many(items)
    assert judge.name == f"{make_judge('organism').name}+fluency:organism"
    assert (fluent.alignment, fluent.coherence) == (inner[0].alignment, inner[0].coherence)
    assert fluent.label == inner[0].label
    assert scrambled.alignment == inner[1].alignment and scrambled.coherence < 5


@pytest.mark.parametrize("spec", ["classifier+fluency:", "+fluency:gemma3-270m", "astrology+fluency:organism",
                                  "organism+fluency:/no/such/model"])
def test_bad_gated_judge_specs_are_one_line_errors(spec):
    with pytest.raises(ConfigError, match="--judge"):
        make_judge(spec)
