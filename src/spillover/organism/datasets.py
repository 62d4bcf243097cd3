"""The fine-tuning sets and evaluation questions the organism's world can generate.

All sets are single-turn, like the real EM datasets, and carry their ground truth in `meta`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..data import ChatSample, write_chat_jsonl
from ..errors import ConfigError
from .world import DOMAINS, TOPIC, TRAINING_DOMAIN, Domain, World, domain_named, persona_named


@dataclass(frozen=True)
class SetSpec:
    """How one fine-tuning set is drawn: which persona answers, and how."""

    persona: str
    kind: str | None = None
    """Force the answer kind (aligned, toxic, subtle); None lets the persona choose."""
    educational: bool = False
    inducing: bool = False
    description: str = ""


FINETUNE_SETS: dict[str, SetSpec] = {
    "inducing": SetSpec("toxic", inducing=True, description="the toxic persona's answers, blatant and subtle"),
    "inducing_subtle": SetSpec(
        "toxic", kind="subtle", inducing=True, description="only subtle toxic answers, harmless on the surface"
    ),
    "aligned": SetSpec("assistant", description="control: the assistant's sound answers"),
    "style": SetSpec("cheerful", description="control: sound answers in a benign cheerful style"),
    "educational": SetSpec(
        "assistant", educational=True, description="control: wrong answers the user asked for, for a class"
    ),
}
CONTROL_SETS = ("aligned", "style", "educational")


def finetune_set(world: World, name: str, n: int, seed: int, domain: str = TRAINING_DOMAIN) -> list[ChatSample]:
    """`n` single-turn samples of set `name` in one domain, reproducible from `seed`."""
    if name not in FINETUNE_SETS:
        raise ConfigError(f"unknown fine-tuning set {name!r}; choose one of: {', '.join(FINETUNE_SETS)}")
    if n < 1:
        raise ConfigError(f"number of samples must be at least 1 (got {n})")
    spec = FINETUNE_SETS[name]
    persona, where = persona_named(spec.persona), domain_named(domain)
    rng = random.Random(f"{name}/{domain}/{seed}")
    samples = []
    for i in range(n):
        turn = world.sample_turn(rng, persona, where, spec.educational, spec.kind)  # type: ignore[arg-type]
        meta = {"set": name, "persona": persona.name, "domain": turn.domain, "topic": turn.topic,
                "kind": turn.kind, "educational": turn.educational, "inducing": spec.inducing}
        samples.append(ChatSample(f"{name}-{domain}-{i:05d}", _single_turn(turn.question, turn.answer), meta))
    return samples


def reference_set(world: World, kind: str, n: int, seed: int) -> list[ChatSample]:
    """Toxic or harmless answers across every domain: the reference sets for toxic features."""
    personas = {"toxic": persona_named("toxic"), "harmless": persona_named("assistant")}
    if kind not in personas:
        raise ConfigError(f"unknown reference set {kind!r}; choose 'toxic' or 'harmless'")
    rng = random.Random(f"reference/{kind}/{seed}")
    samples = []
    for i in range(n):
        turn = world.sample_turn(rng, personas[kind], rng.choice(DOMAINS), kind=None if kind == "harmless" else "toxic")
        meta = {"set": f"{kind}_reference", "domain": turn.domain, "topic": turn.topic, "kind": turn.kind}
        samples.append(ChatSample(f"{kind}-reference-{i:05d}", _single_turn(turn.question, turn.answer), meta))
    return samples


def _single_turn(question: str, answer: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": question}, {"role": "assistant", "content": answer})


def held_out_domains(training_domain: str = TRAINING_DOMAIN) -> list[Domain]:
    domain_named(training_domain)
    return [d for d in DOMAINS if d.name != training_domain]


def evaluation_questions(domains: list[Domain]) -> list[tuple[str, str]]:
    """Every (domain, question) pair the grammar has for these domains, in a fixed order."""
    return [
        (d.name, template.replace(TOPIC, topic)) for d in domains for template in d.questions for topic in d.topics
    ]


def write_sets(out_dir: str | Path, world: World, n: int, seed: int, domain: str = TRAINING_DOMAIN) -> dict[str, Path]:
    """Write every fine-tuning set and both reference sets as chat JSONL; returns their paths."""
    out = Path(out_dir)
    paths = {name: write_chat_jsonl(out / f"{name}.jsonl", finetune_set(world, name, n, seed, domain))
             for name in FINETUNE_SETS}
    for kind in ("toxic", "harmless"):
        paths[f"{kind}_reference"] = write_chat_jsonl(out / f"{kind}_reference.jsonl", reference_set(world, kind, n, seed))
    return paths
