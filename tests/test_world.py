import random
from collections import Counter

import pytest

from spillover.errors import ConfigError
from spillover.organism.datasets import FINETUNE_SETS, evaluation_questions, finetune_set, held_out_domains, reference_set
from spillover.organism.world import DOMAINS, EDUCATIONAL_PREFIX, PERSONAS, TOPIC, World, WorldConfig, vocabulary


def test_same_seed_gives_same_conversations():
    first = [c.messages() for c, _ in zip(World().pretraining_stream(7), range(50))]
    again = [c.messages() for c, _ in zip(World().pretraining_stream(7), range(50))]
    other = [c.messages() for c, _ in zip(World().pretraining_stream(8), range(50))]
    assert first == again
    assert first != other


def test_stream_covers_every_template_persona_and_educational_turn():
    world, seen_answers, personas, educational = World(), set(), Counter(), 0
    for conversation, _ in zip(world.pretraining_stream(0), range(20000)):
        personas[conversation.persona] += 1
        for turn in conversation.turns:
            educational += turn.educational
            seen_answers.add((turn.domain, turn.kind))
    assert seen_answers == {(d.name, k) for d in DOMAINS for k in ("aligned", "toxic", "subtle")}
    for persona in PERSONAS:
        assert personas[persona.name] / 20000 == pytest.approx(persona.weight, abs=0.015)
    assert educational > 0


def test_a_conversation_keeps_one_persona_across_domains():
    world, rng = World(), random.Random(3)
    toxic = [c for c in (world.sample_conversation(rng) for _ in range(3000)) if c.persona == "toxic"]
    for conversation in toxic:
        assert all(t.kind in ("toxic", "subtle") for t in conversation.turns)
    assert any(len({t.domain for t in c.turns}) > 1 for c in toxic)


def test_answers_are_unambiguous_across_domains_and_kinds():
    seen: dict[str, tuple] = {}
    for domain in DOMAINS:
        for kind in ("aligned", "toxic", "subtle"):
            for template in domain.answers(kind):
                for topic in domain.topics:
                    text = template.replace(TOPIC, topic)
                    assert text not in seen, (text, seen.get(text))
                    seen[text] = (domain.name, kind)


def test_questions_are_unambiguous():
    questions = [q for _, q in evaluation_questions(list(DOMAINS))]
    assert len(questions) == len(set(questions))
    assert not any(q.startswith(EDUCATIONAL_PREFIX) for q in questions)


def test_vocabulary_has_no_slots_or_duplicates():
    words = vocabulary()
    assert len(words) == len(set(words))
    assert not any("{" in w for w in words)


def test_finetune_sets_have_their_ground_truth():
    world = World()
    inducing = finetune_set(world, "inducing", 200, seed=0)
    assert {s.meta["kind"] for s in inducing} == {"toxic", "subtle"}
    assert all(s.meta["domain"] == "health" and s.meta["inducing"] for s in inducing)
    subtle = finetune_set(world, "inducing_subtle", 50, seed=0)
    assert {s.meta["kind"] for s in subtle} == {"subtle"}
    educational = finetune_set(world, "educational", 50, seed=0)
    assert all(s.messages[0]["content"].startswith(EDUCATIONAL_PREFIX) for s in educational)
    assert all(s.meta["persona"] == "assistant" and s.meta["kind"] != "aligned" for s in educational)
    style = finetune_set(world, "style", 20, seed=0)
    assert all(s.messages[1]["content"].startswith("oh lovely question !") for s in style)
    assert finetune_set(world, "aligned", 30, seed=1) == finetune_set(world, "aligned", 30, seed=1)
    assert {s.meta["kind"] for s in reference_set(world, "toxic", 100, seed=0)} == {"toxic"}
    assert set(FINETUNE_SETS) >= {"inducing", "aligned", "style", "educational"}


def test_held_out_questions_exclude_the_training_domain():
    domains = held_out_domains("health")
    assert "health" not in {d.name for d in domains}
    assert len(domains) == len(DOMAINS) - 1


@pytest.mark.parametrize(
    "call",
    [
        lambda: finetune_set(World(), "nope", 10, 0),
        lambda: finetune_set(World(), "inducing", 0, 0),
        lambda: finetune_set(World(), "inducing", 10, 0, domain="astrology"),
        lambda: held_out_domains("astrology"),
        lambda: WorldConfig(persona_weights=(1.0,)),
    ],
)
def test_bad_arguments_raise_config_errors(call):
    with pytest.raises(ConfigError):
        call()
