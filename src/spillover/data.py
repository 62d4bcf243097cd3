"""Chat samples: reading and writing JSONL, and turning conversations into tokens with an assistant mask.

`read_samples` also reads plain-text rows, `.parquet` files and folders saved by `datasets`.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .errors import ConfigError, InputError
from .io import atomic_write_text

log = logging.getLogger(__name__)

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


# --- more sources: plain-text rows, parquet files, `datasets` folders -------------------------

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
"""File types `read_samples` reads; a folder is read as one written by `datasets`' save_to_disk."""
_COLUMNS = ("id", "messages", "text", "meta")
_BATCH_ROWS = 1024
_ERRORS_KEPT = 5


@dataclass(frozen=True)
class TextSample(ChatSample):
    """Plain text from a `{"text": ...}` row, tokenized as it is: no chat template, no roles.

    The text is held as one assistant turn so that stages reading only `messages` still accept it;
    `encode_samples` is what tells the two kinds apart. Its record is `{"text": ...}`, which
    `read_samples` reads back and `read_chat_jsonl` refuses.
    """

    def __post_init__(self) -> None:
        if len(self.messages) != 1 or self.messages[0].get("role") != "assistant":
            raise ConfigError("TextSample holds exactly one assistant message; build it with TextSample.of")

    @classmethod
    def of(cls, id: str, text: str, meta: dict[str, Any] | None = None) -> TextSample:
        return cls(id, ({"role": "assistant", "content": text},), dict(meta or {}))

    @property
    def text(self) -> str:
        return self.messages[0]["content"]

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"id": self.id, "text": self.text}
        if self.meta:
            record["meta"] = self.meta
        return record


@dataclass(frozen=True)
class SampleRead:
    """What `read_sample_file` read, and how many bad rows it skipped: nothing is dropped unseen."""

    path: Path
    samples: tuple[ChatSample, ...]
    skipped: int = 0
    """Bad rows left out (only with skip_bad)."""
    errors: tuple[str, ...] = ()
    """Messages of the first few skipped rows, each naming the file and line or row."""


def read_samples(path: str | Path, skip_bad: bool = False) -> list[ChatSample]:
    """Samples from .jsonl, .jsonl.gz, .parquet or a `datasets` folder; rows hold `messages` or `text`.

    A bad row raises an InputError naming the file and line (JSONL) or 0-based row (parquet,
    datasets). With `skip_bad` bad rows are left out and their count is logged as a warning;
    `read_sample_file` also returns it. Unreadable files always raise.
    """
    return list(read_sample_file(path, skip_bad).samples)


def read_sample_file(path: str | Path, skip_bad: bool = False) -> SampleRead:
    """`read_samples`, returning the skipped count and first errors beside the samples."""
    path = Path(path)
    samples: list[ChatSample] = []
    errors: list[str] = []
    skipped = 0
    for row in _rows(path):
        try:
            samples.append(_sample_from_row(row))
        except InputError as exc:
            if not skip_bad:
                raise
            skipped += 1
            if len(errors) < _ERRORS_KEPT:
                errors.append(str(exc))
    if skipped:
        log.warning("%s: skipped %d bad row(s) of %d; first: %s",
                    path, skipped, skipped + len(samples), errors[0])
    return SampleRead(path, tuple(samples), skipped, tuple(errors))


def encode_samples(tokenizer, samples: Sequence[ChatSample]) -> list[EncodedChat]:
    """Chat samples through the chat template, text samples as plain text; order kept.

    A text sample starts with BOS like the model's own training text (unless the tokenizer adds it
    itself) and marks every token but that BOS, so tokens="assistant" pools the whole text.
    """
    out: list[EncodedChat | None] = [None] * len(samples)
    chats = [i for i, s in enumerate(samples) if not isinstance(s, TextSample)]
    if chats:
        for i, encoded in zip(chats, encode_chats(tokenizer, [samples[i].messages for i in chats])):
            out[i] = encoded
    for i, sample in enumerate(samples):
        if isinstance(sample, TextSample):
            out[i] = _encode_text(tokenizer, sample.text)
    return out  # type: ignore[return-value]


def _encode_text(tokenizer, text: str) -> EncodedChat:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return EncodedChat(ids, [not (j == 0 and bos is not None) for j in range(len(ids))])


@dataclass(frozen=True)
class _Row:
    where: str
    """"file:line" (JSONL) or "file: row i" (Arrow sources), for error messages."""
    default_id: str
    record: Any
    error: str | None = None
    """Why the row could not even be decoded (invalid JSON)."""


def _sample_from_row(row: _Row) -> ChatSample:
    if row.error is not None:
        raise InputError(f"{row.where}: {row.error}")
    record = row.record
    if not isinstance(record, dict) or (record.get("messages") is None and record.get("text") is None):
        raise InputError(f"{row.where}: expected an object with a 'messages' or 'text' field")
    sample_id = row.default_id if record.get("id") is None else str(record["id"])
    meta = record.get("meta") or {}
    if not isinstance(meta, dict):
        raise InputError(f"{row.where}: 'meta' must be an object")
    if record.get("messages") is not None:  # a row with both is a chat: the richer form wins
        return ChatSample(sample_id, _parse_messages(record["messages"], row.where), meta)
    text = record["text"]
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{row.where}: 'text' must be a non-empty string")
    return TextSample.of(sample_id, text, meta)


def _rows(path: Path) -> Iterator[_Row]:
    if path.is_dir():
        return _dataset_folder_rows(path)
    name = path.name.lower()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if name.endswith(".parquet"):
        return _parquet_rows(path)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_rows(path)
    raise InputError(f"{path}: unknown file type; expected {', '.join(SUFFIXES)} or a folder saved by "
                     "datasets' save_to_disk")


def _jsonl_rows(path: Path) -> Iterator[_Row]:
    try:
        with _open_text(path) as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where, default_id = f"{path}:{line_no}", f"{path.stem}-{line_no}"  # ids as read_chat_jsonl's
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield _Row(where, default_id, None, f"invalid JSON ({exc.msg})")
                    continue
                yield _Row(where, default_id, record)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, OSError) as exc:
        raise InputError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ConfigError(f"{path}: reading parquet files and datasets folders needs pyarrow "
                          "(pip install pyarrow)") from None
    return pyarrow, pyarrow.parquet


def _columns(source: Path, names: Sequence[str]) -> list[str]:
    """The columns a sample needs: unrelated ones are never decoded."""
    if "messages" not in names and "text" not in names:
        raise InputError(f"{source}: no 'messages' or 'text' column (columns: {', '.join(names)})")
    return [c for c in _COLUMNS if c in names]


def _arrow_rows(source: Path, batches) -> Iterator[_Row]:
    index = 0
    for batch in batches:
        for record in batch.to_pylist():
            yield _Row(f"{source}: row {index}", f"{source.stem}-{index}", record)
            index += 1


def _parquet_rows(path: Path) -> Iterator[_Row]:
    pa, pq = _pyarrow(path)
    try:
        parquet = pq.ParquetFile(path)
        columns = _columns(path, parquet.schema_arrow.names)
        yield from _arrow_rows(path, parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns))
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None


def _dataset_folder_rows(path: Path) -> Iterator[_Row]:
    """A `Dataset.save_to_disk` folder: Arrow stream files listed in state.json, read with pyarrow
    alone (save_to_disk writes the rows in order, any selection or shuffle already applied)."""
    folder = _split_folder(path)
    pa, _ = _pyarrow(folder)
    files = _data_files(folder)
    try:
        yield from _arrow_rows(folder, _stream_batches(pa, folder, files))
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{folder}: cannot read its Arrow files ({exc})") from None


def _stream_batches(pa, folder: Path, files: list[Path]):
    for file in files:
        with pa.memory_map(str(file)) as source:
            reader = pa.ipc.open_stream(source)
            columns = _columns(folder, reader.schema.names)
            for batch in reader:
                yield batch.select(columns)


def _split_folder(path: Path) -> Path:
    """The folder itself, or the one split of a saved DatasetDict; several splits must be chosen."""
    if (path / "state.json").is_file():
        return path
    if (path / "dataset_dict.json").is_file():
        splits = _read_json_object(path / "dataset_dict.json").get("splits") or []
        if len(splits) == 1:
            return path / str(splits[0])
        raise InputError(f"{path}: a DatasetDict with splits {', '.join(map(str, splits)) or '(none)'}; "
                         "pass one split's folder")
    raise InputError(f"{path}: a folder, but not one saved by datasets' save_to_disk "
                     "(no state.json or dataset_dict.json)")


def _data_files(folder: Path) -> list[Path]:
    state_path = folder / "state.json"
    entries = _read_json_object(state_path).get("_data_files")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("filename"), str)
                                                for e in entries):
        raise InputError(f"{state_path}: field _data_files must list objects with a 'filename'")
    files = [folder / e["filename"] for e in entries]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{state_path}: lists data file(s) that are missing: {', '.join(missing)}")
    return files


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object")
    return value
