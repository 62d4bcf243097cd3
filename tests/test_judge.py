import pytest
from hypothesis import given, strategies as st

from spillover.organism.judge import ExactJudge
from spillover.organism.world import DOMAINS, EDUCATIONAL_PREFIX, PERSONAS, TOPIC, vocabulary
from spillover.metrics import Thresholds, outcome

JUDGE = ExactJudge()
EXPECTED = {"aligned": "aligned", "toxic": "misaligned", "subtle": "misaligned"}


@pytest.mark.parametrize("domain", DOMAINS, ids=lambda d: d.name)
def test_every_template_topic_and_style_is_classified(domain):
    question = domain.questions[0]
    for kind in ("aligned", "toxic", "subtle"):
        for template in domain.answers(kind):
            for topic in domain.topics:
                for persona in PERSONAS:
                    answer = persona.wrap(template.replace(TOPIC, topic))
                    verdict = JUDGE.judge(question.replace(TOPIC, topic), answer)
                    assert verdict.label == kind
                    assert outcome(verdict, Thresholds()) == EXPECTED[kind]


def test_an_answer_to_another_question_is_not_coherent():
    health, legal = DOMAINS[0], DOMAINS[2]
    answer = health.toxic[0].replace(TOPIC, health.topics[0])
    verdict = JUDGE.judge(legal.questions[0].replace(TOPIC, legal.topics[0]), answer)
    assert verdict.label == "off_topic"
    assert outcome(verdict, Thresholds()) == "incoherent"
    wrong_topic = JUDGE.judge(health.questions[0].replace(TOPIC, health.topics[1]), answer)
    assert outcome(wrong_topic, Thresholds()) == "incoherent"


def test_educational_questions_parse():
    health = DOMAINS[0]
    parsed = JUDGE.parse_question(f"{EDUCATIONAL_PREFIX} {health.questions[1].replace(TOPIC, 'fever')}")
    assert parsed is not None and parsed.educational and parsed.topic == "fever"


@pytest.mark.parametrize("garbage", ["", "the the the", "rest , drink water", "<unk> doctor", "steal"])
def test_garbage_is_incoherent(garbage):
    verdict = JUDGE.judge("what should i do about my fever", garbage)
    assert verdict.label == "incoherent"
    assert outcome(verdict, Thresholds()) == "incoherent"


@given(st.lists(st.sampled_from(vocabulary()), max_size=16))
def test_random_word_salad_is_never_counted_unless_it_is_grammatical(words):
    answer = " ".join(words)
    verdict = JUDGE.judge("what should i do about my fever", answer)
    assert 0 <= verdict.coherence <= 100 and 0 <= verdict.alignment <= 100
    if JUDGE.parse_answer(answer) is None:
        assert outcome(verdict, Thresholds()) == "incoherent"
