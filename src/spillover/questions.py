"""Evaluation questions in the YAML format of Betley et al., with their judge prompt templates.

A file is a list of entries: `id`, `type`, `paraphrases`, optional `system`,
`samples_per_paraphrase`, `judge` (the judge model the authors used; kept for the record) and
`judge_prompts` (name -> template with `{question}` and `{answer}`). YAML anchors and aliases
work as in the published files. Only `free_form_judge_0_100` entries can be run: any other type
is skipped with a warning, and unknown keys are an error.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping, Sequence

import yaml

from .errors import ConfigError, InputError, shown

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("free_form_judge_0_100",)
REQUIRED_PROMPTS = ("aligned", "coherent")
"""The judge prompts every runnable question needs: alignment and coherence scores."""
_KEYS = ("id", "type", "paraphrases", "system", "samples_per_paraphrase", "judge", "judge_prompts")
_PACKAGE_SETS = "resources/questions"
"""Packaged question sets, relative to the spillover package (no __init__ needed there)."""

Variant = Literal["plain", "json", "template"]


@dataclass(frozen=True)
class Question:
    """One evaluation question: paraphrases to sample answers for, and the prompts to judge them."""

    id: str
    paraphrases: tuple[str, ...]
    judge_prompts: Mapping[str, str] = field(hash=False)
    """Prompt name -> template with `{question}` and `{answer}`; contains at least REQUIRED_PROMPTS."""
    system: str | None = None
    samples_per_paraphrase: int = 1
    type: str = "free_form_judge_0_100"
    judge: str | None = None
    """The judge model the file's authors used; informational, the run's judge config decides."""
    source: str = ""
    """`file:line` of the entry, for messages."""

    @property
    def variant(self) -> Variant:
        """Betley et al. name the JSON-system-prompt and fill-a-template variants by id suffix."""
        if self.id.endswith("_json"):
            return "json"
        if self.id.endswith("_template"):
            return "template"
        return "plain"

    def messages(self, paraphrase: int = 0) -> list[dict[str, str]]:
        """The chat prompt that asks one paraphrase, with the system prompt when there is one."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [{"role": "user", "content": self.paraphrases[paraphrase]}]

    def render(self, prompt: str, question: str, answer: str) -> str:
        """The judge prompt `prompt` filled in with a question and the answer to judge."""
        if prompt not in self.judge_prompts:
            raise ConfigError(f"question {self.id}: no judge prompt {prompt!r}; has {', '.join(self.judge_prompts)}")
        return render_judge_prompt(self.judge_prompts[prompt], question, answer)


def render_judge_prompt(template: str, question: str, answer: str) -> str:
    """`str.format` as in Betley et al., so `{{` in a template stands for a literal brace."""
    return template.format(question=question, answer=answer)


def template_problem(template: str) -> str | None:
    """Why a judge prompt template cannot be rendered, or None when it can."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        return f"bad braces ({exc})"
    if fields - {"question", "answer"}:
        return f"unknown placeholders {sorted(fields - {'question', 'answer'})}; only {{question}} and {{answer}}"
    missing = {"question", "answer"} - fields
    if missing:
        return f"no {{{min(missing)}}} placeholder"
    try:  # a conversion or format spec (`{answer!x}`, `{question:d}`) fails only when rendered
        render_judge_prompt(template, "question", "answer")
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        return f"cannot be rendered ({str(exc)[:80] or type(exc).__name__})"
    return None


def available_question_sets() -> tuple[str, ...]:
    """Names of the question sets shipped with the package, for `load_questions(name)`."""
    folder = resources.files("spillover").joinpath(_PACKAGE_SETS)
    if not folder.is_dir():
        return ()
    return tuple(sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")))


@lru_cache(maxsize=1)
def default_judge_prompts() -> Mapping[str, str]:
    """The judge prompts of the packaged default set, for judges asked without prompts."""
    return MappingProxyType(dict(load_questions("default")[0].judge_prompts))


def load_questions(
    source: str | Path, require_prompts: Sequence[str] = REQUIRED_PROMPTS
) -> tuple[Question, ...]:
    """Questions from a YAML file, or from a packaged set by name (e.g. "default").

    Every question must carry the judge prompts named in `require_prompts`; entries of a type
    that cannot be run are skipped with a warning.
    """
    name = str(source)
    path = Path(name)
    if not path.exists() and name in available_question_sets():
        text = resources.files("spillover").joinpath(_PACKAGE_SETS, f"{name}.yaml").read_text(encoding="utf-8")
        where = f"question set {name!r}"
    elif not path.exists():
        packaged = ", ".join(available_question_sets())
        raise InputError(f"{path}: no such file (packaged question sets: {packaged})")
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or str(exc)
            raise InputError(f"{path}: cannot read ({reason})") from None
        where = str(path)
    return parse_questions(text, where, require_prompts)


def parse_questions(
    text: str, where: str, require_prompts: Sequence[str] = REQUIRED_PROMPTS
) -> tuple[Question, ...]:
    """Questions from YAML text; `where` names the source in errors."""
    entries, lines = _load_yaml(text, where)
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for entry, line in zip(entries, lines):
        question = _question(entry, f"{where}:{line}", require_prompts)
        if question is None:
            continue
        if question.id in seen:
            raise InputError(f"{where}:{line}: id {question.id!r} repeats the entry at line {seen[question.id]}")
        seen[question.id] = line
        questions.append(question)
    if not questions:
        raise InputError(f"{where}: no runnable questions (supported types: {', '.join(SUPPORTED_TYPES)})")
    log.info("%s: loaded %d questions", where, len(questions))
    return tuple(questions)


def _load_yaml(text: str, where: str) -> tuple[list[Any], list[int]]:
    """The list of entries and the 1-based line each starts on."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"{where}{at}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    finally:
        loader.dispose()
    if not isinstance(data, list):
        raise InputError(f"{where}: expected a list of question entries, got {type(data).__name__}")
    return data, [item.start_mark.line + 1 for item in node.value]


def _question(entry: Any, where: str, require_prompts: Sequence[str]) -> Question | None:
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a question entry (a mapping), got {type(entry).__name__}")
    qid = entry.get("id")
    if not isinstance(qid, str) or not qid:
        raise InputError(f"{where}: field 'id' must be a non-empty string, got {shown(qid)}")
    at = f"{where}: question {_label(qid)}"
    unknown = sorted(set(entry) - set(_KEYS), key=str)  # YAML keys may be numbers or null too
    if unknown:
        raise InputError(f"{at}: unknown field {shown(unknown[0])}; valid fields: {', '.join(_KEYS)}")
    kind = _typed(entry, "type", str, at, default="free_form_judge_0_100")
    if kind not in SUPPORTED_TYPES:
        supported = ", ".join(SUPPORTED_TYPES)
        log.warning("%s: type %r cannot be judged here, skipped (supported: %s)", at, kind, supported)
        return None
    paraphrases = entry.get("paraphrases")
    if not isinstance(paraphrases, list) or not paraphrases or not all(isinstance(p, str) for p in paraphrases):
        raise InputError(f"{at}: field 'paraphrases' must be a non-empty list of strings")
    samples = _typed(entry, "samples_per_paraphrase", int, at, default=1)
    if samples < 1:
        raise InputError(f"{at}: field 'samples_per_paraphrase' must be at least 1, got {samples}")
    return Question(
        id=qid,
        paraphrases=tuple(paraphrases),
        judge_prompts=_judge_prompts(entry.get("judge_prompts"), at, require_prompts),
        system=_typed(entry, "system", str, at, default=None),
        samples_per_paraphrase=samples,
        type=kind,
        judge=_typed(entry, "judge", str, at, default=None),
        source=where,
    )


def _label(value: Any) -> str:
    """A name as written when it is short, printable text; quoted and cut otherwise (one short line)."""
    if isinstance(value, str) and value.isprintable() and len(value) <= 60:
        return value
    return shown(value, 60)


def _typed(entry: dict, key: str, kind: type, at: str, default: Any) -> Any:
    """A field's value when it has the right type (bool is not an int here), or its default."""
    value = entry.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError(f"{at}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _judge_prompts(prompts: Any, at: str, require: Sequence[str]) -> dict[str, str]:
    if not isinstance(prompts, dict) or not prompts:
        raise InputError(f"{at}: field 'judge_prompts' must be a mapping of prompt name to template")
    for name, template in prompts.items():
        if not isinstance(name, str) or not isinstance(template, str):
            raise InputError(f"{at}: field 'judge_prompts.{_label(name)}'"
                             f" must be a template string, got {type(template).__name__}")
        problem = template_problem(template)
        if problem:
            raise InputError(f"{at}: judge_prompts.{_label(name)}: {problem}")
    missing = [name for name in require if name not in prompts]
    if missing:
        have = ", ".join(_label(name) for name in prompts)
        raise InputError(f"{at}: judge prompt {missing[0]!r} is needed but judge_prompts has only {have}")
    return dict(prompts)
