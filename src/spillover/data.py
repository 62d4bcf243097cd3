"""Chat samples: reading and writing JSONL, and turning conversations into tokens with an assistant mask."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .errors import InputError
from .io import atomic_write_text

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
"""Label value that `transformers` losses skip."""


@dataclass(frozen=True)
class ChatSample:
    """One conversation in the `{"messages": [...]}` format of the EM datasets."""

    id: str
    messages: tuple[dict[str, str], ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"id": self.id, "messages": list(self.messages)}
        if self.meta:
            record["meta"] = self.meta
        return record


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _parse_messages(raw: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{where}: 'messages' must be a non-empty list")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise InputError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InputError(f"{where}: messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"{where}: messages[{i}].content must be a string")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where}: no assistant turn")
    return tuple(messages)


def read_chat_jsonl(path: str | Path) -> list[ChatSample]:
    """Read chat JSONL (or .jsonl.gz); a bad row raises an error naming the file and line."""
    path = Path(path)
    samples: list[ChatSample] = []
    try:
        with _open_text(path) as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{where}: invalid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or "messages" not in record:
                    raise InputError(f"{where}: expected an object with a 'messages' field")
                sample_id = str(record.get("id", f"{path.stem}-{line_no}"))
                meta = record.get("meta") or {}
                samples.append(ChatSample(sample_id, _parse_messages(record["messages"], where), meta))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, OSError) as exc:
        raise InputError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    return samples


def write_chat_jsonl(path: str | Path, samples: Iterable[ChatSample]) -> Path:
    """Write samples atomically: a reader never sees half a file."""
    lines = "".join(json.dumps(s.to_record(), ensure_ascii=False) + "\n" for s in samples)
    return atomic_write_text(path, lines)


@dataclass(frozen=True)
class EncodedChat:
    input_ids: list[int]
    assistant_mask: list[bool]


def _has_generation_tags(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    return "{% generation %}" in template or "{%- generation %}" in template


def encode_chats(tokenizer, conversations: Sequence[Sequence[dict[str, str]]]) -> list[EncodedChat]:
    """Tokenize with the model's own chat template and mark the tokens the assistant wrote.

    Templates with `{% generation %}` tags give the mask directly; for others the mask comes from
    rendering each prefix of the conversation, which works for every prefix-stable template.
    """
    if _has_generation_tags(tokenizer):
        out = tokenizer.apply_chat_template(
            [list(c) for c in conversations], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return [
            EncodedChat(list(ids), [bool(m) for m in mask])
            for ids, mask in zip(out["input_ids"], out["assistant_masks"])
        ]
    return [_encode_by_prefixes(tokenizer, list(c)) for c in conversations]


def _render_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"])


def _encode_by_prefixes(tokenizer, messages: list[dict[str, str]]) -> EncodedChat:
    ids = _render_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render_ids(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_render_ids(tokenizer, messages[: i + 1], add_generation_prompt=False))
        for j in range(start, min(end, len(ids))):
            mask[j] = True
    return EncodedChat(ids, mask)


def collate_for_lm(batch: Sequence[EncodedChat], pad_id: int, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch; labels are the input ids on assistant tokens and IGNORE_INDEX elsewhere."""
    if max_length is not None:
        batch = [EncodedChat(b.input_ids[:max_length], b.assistant_mask[:max_length]) for b in batch]
    width = max(len(b.input_ids) for b in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        ids = torch.tensor(item.input_ids, dtype=torch.long)
        input_ids[row, :n] = ids
        attention[row, :n] = 1
        keep = torch.tensor(item.assistant_mask, dtype=torch.bool)
        labels[row, :n] = torch.where(keep, ids, torch.full_like(ids, IGNORE_INDEX))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
