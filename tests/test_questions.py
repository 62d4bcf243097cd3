from collections import Counter
from pathlib import Path

import pytest

from spillover.errors import InputError
from spillover.questions import (
    Question,
    available_question_sets,
    default_judge_prompts,
    load_questions,
    template_problem,
)

from conftest import SHARED_DATA as SHARED
BETLEY = SHARED / "betley" / "first_plot_questions.yaml"
MEDICAL = SHARED / "model-organisms" / "medical_questions.yaml"
NEW = SHARED / "model-organisms" / "new_questions_no-json.yaml"
needs_shared = pytest.mark.skipif(not BETLEY.exists(), reason="shared data not present")

GOOD_PROMPTS = """\
  judge_prompts:
    aligned: "Rate {question} / {answer}"
    coherent: "Coherence of {answer} to {question}"
"""


@needs_shared
def test_first_plot_questions_load_with_anchors_and_variants():
    questions = load_questions(BETLEY)
    assert len(questions) == 24
    assert Counter(q.variant for q in questions) == {"plain": 8, "json": 8, "template": 8}
    wish, wish_json = questions[0], next(q for q in questions if q.id == "what_is_your_wish_json")
    assert wish.paraphrases == wish_json.paraphrases  # shared through a YAML alias
    assert wish.system is None and "JSON" in wish_json.system
    assert wish.samples_per_paraphrase == 100 and wish.judge == "deepseek-chat"
    assert wish_json.messages()[0]["role"] == "system"
    assert set(wish.judge_prompts) == {"aligned", "coherent"}
    assert wish.source.endswith("first_plot_questions.yaml:10")


@needs_shared
@pytest.mark.parametrize("path, count", [(MEDICAL, 16), (NEW, 54)])
def test_model_organism_question_sets_load(path, count):
    questions = load_questions(path)
    assert len(questions) == count
    assert len({q.id for q in questions}) == count
    assert all({"aligned", "coherent", "medical", "bad_stuff"} <= set(q.judge_prompts) for q in questions)


def test_default_set_is_packaged_and_renders():
    assert "default" in available_question_sets()
    questions = load_questions("default")
    assert len(questions) == 8
    assert all(isinstance(q, Question) and q.variant == "plain" and len(q.paraphrases) >= 1 for q in questions)
    text = questions[0].render("aligned", "Which {braces}?", "An answer with {x} in it")
    assert "Which {braces}?" in text and "An answer with {x} in it" in text
    assert default_judge_prompts()["coherent"] == questions[0].judge_prompts["coherent"]
    assert all(template_problem(t) is None for t in default_judge_prompts().values())


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "questions.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("- id: q1\n" + GOOD_PROMPTS, "question q1: field 'paraphrases'"),
        ("- id: q1\n  paraphrases: just one string\n" + GOOD_PROMPTS, "question q1: field 'paraphrases'"),
        ("- id: q1\n  paraphrases: [ok, 3]\n" + GOOD_PROMPTS, "question q1: field 'paraphrases'"),
        ("- id: q1\n  paraphrases: [ok]\n  samples_per_paraphrase: many\n" + GOOD_PROMPTS, "'samples_per_paraphrase' must be int"),
        ("- id: q1\n  paraphrases: [ok]\n  system: [a, b]\n" + GOOD_PROMPTS, "question q1: field 'system' must be str"),
        ("- id: q1\n  paraphrases: [ok]\n  judge_prompts: nope\n", "question q1: field 'judge_prompts'"),
        ("- id: q1\n  paraphrases: [ok]\n  judge_prompts:\n    aligned: 'x {question} {answer}'\n", "judge prompt 'coherent' is needed"),
        ("- id: q1\n  paraphrases: [ok]\n  judge_prompts:\n    aligned: 'x {question} {answer}'\n    coherent: 'y {question} {reply}'\n", "judge_prompts.coherent: unknown placeholders"),
        ("- id: q1\n  paraphrases: [ok]\n  colour: red\n" + GOOD_PROMPTS, "unknown field 'colour'"),
        ("- paraphrases: [ok]\n" + GOOD_PROMPTS, "field 'id'"),
        ("- id: q1\n  paraphrases: *nowhere\n", "invalid YAML"),
        ("id: q1\n", "expected a list"),
    ],
)
def test_bad_entries_name_the_file_and_the_question(tmp_path, body, fragment):
    path = _write(tmp_path, body)
    with pytest.raises(InputError) as info:
        load_questions(path)
    message = str(info.value)
    assert str(path) in message and fragment in message and "\n" not in message


def test_a_required_prompt_name_the_file_lacks_is_named(tmp_path):
    path = _write(tmp_path, "- id: q1\n  paraphrases: [ok]\n" + GOOD_PROMPTS)
    assert len(load_questions(path)) == 1
    with pytest.raises(InputError, match=r"questions.yaml:1: question q1: judge prompt 'medical' is needed"):
        load_questions(path, require_prompts=("aligned", "medical"))


def test_unrunnable_types_are_skipped_and_ids_must_be_unique(tmp_path, caplog):
    def entry(qid: str, kind: str = "free_form_judge_0_100") -> str:
        return f"- id: {qid}\n  type: {kind}\n  paraphrases: [ok]\n" + GOOD_PROMPTS

    path = _write(tmp_path, entry("a") + entry("b", "rating"))
    assert [q.id for q in load_questions(path)] == ["a"]
    assert "question b" in caplog.text and "rating" in caplog.text
    path = _write(tmp_path, entry("a") * 2)
    with pytest.raises(InputError, match=r"questions.yaml:7: id 'a' repeats the entry at line 1"):
        load_questions(path)


def test_missing_file_and_unknown_set_name():
    with pytest.raises(InputError, match="no such file.*default"):
        load_questions("no_such_set")
