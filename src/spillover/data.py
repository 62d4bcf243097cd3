"""Chat samples: reading and writing JSONL, and turning conversations into tokens with an assistant mask.

`read_samples` also reads plain-text rows, `.parquet` files and folders saved by `datasets`.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .errors import ConfigError, InputError, shown
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


def _open_binary(path: Path):
    """Bytes, not text: a line that is not UTF-8 is then reported with its number."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return path.open("rb")


def _json_kind(value: Any) -> str:
    """What a JSON value is, in the words of the JSON format, for messages."""
    kinds = {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}
    return kinds.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _is_unicode(text: str) -> bool:
    """JSON may encode lone surrogates (\\ud800); they cannot be tokenized or written back as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(value: Any, name: str, where: str) -> str:
    if value is None:
        raise InputError(f"{where}: field '{name}': missing (expected text)")
    if not isinstance(value, str):
        parts = " (content parts are not supported; join them into one string)" if isinstance(value, list) else ""
        raise InputError(f"{where}: field '{name}': expected text, got {_json_kind(value)}{parts}")
    if not value.strip():
        raise InputError(f"{where}: field '{name}': empty (expected non-empty text)")
    if not _is_unicode(value):
        raise InputError(f"{where}: field '{name}': holds an unpaired surrogate (not valid Unicode)")
    return value


def _parse_message(message: Any, name: str, where: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise InputError(f"{where}: field '{name}': expected an object with 'role' and 'content', "
                         f"got {_json_kind(message)}")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        got = "missing" if role is None else f"{shown(role)} is not a role"
        raise InputError(f"{where}: field '{name}.role': {got} (expected one of {', '.join(ROLES)})")
    return {"role": role, "content": _check_text(message.get("content"), f"{name}.content", where)}


def _parse_messages(raw: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{where}: field 'messages': expected a non-empty list of role/content objects, "
                         f"got {_json_kind(raw) if raw != [] else 'an empty list'}")
    messages = tuple(_parse_message(m, f"messages[{i}]", where) for i, m in enumerate(raw))
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where}: field 'messages': no assistant turn (expected a message with role 'assistant')")
    return messages


def _existing_file(path: Path) -> Path:
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a JSONL file")
    if not path.exists():
        raise InputError(f"{path}: no such file")
    return path


def read_chat_jsonl(path: str | Path) -> list[ChatSample]:
    """Read chat JSONL (or .jsonl.gz) rows with `messages`; a bad row raises an error naming the
    file and line. Ids must be unique and a file without rows is an error: every stage after this
    one keys its results by id and has nothing to do on an empty set."""
    path = _existing_file(Path(path))
    samples: list[ChatSample] = []
    seen: dict[str, str] = {}
    for row in _jsonl_rows(path):
        if row.error is None and (not isinstance(row.record, dict) or row.record.get("messages") is None):
            raise InputError(f"{row.where}: expected an object with a 'messages' field")
        sample = _sample_from_row(row)
        _check_unique(sample.id, row, seen)
        samples.append(sample)
    if not samples:
        raise InputError(f"{path}: no samples (the file holds no rows)")
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
    seen: dict[str, str] = {}
    for row in _rows(path):
        try:
            sample = _sample_from_row(row)
            _check_unique(sample.id, row, seen)
            samples.append(sample)
        except InputError as exc:
            if not skip_bad:
                raise
            skipped += 1
            if len(errors) < _ERRORS_KEPT:
                errors.append(str(exc))
    if skipped:
        log.warning("%s: skipped %d bad row(s) of %d; first: %s",
                    path, skipped, skipped + len(samples), errors[0])
    if not samples:
        detail = f"all {skipped} rows are bad; first: {errors[0]}" if skipped else "the file holds no rows"
        raise InputError(f"{path}: no samples ({detail})")
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
    """Why the row could not even be decoded (invalid UTF-8 or JSON)."""
    at: str = ""
    """"line N" or "row N", to point back at a row from a message about another one."""


def _sample_from_row(row: _Row) -> ChatSample:
    if row.error is not None:
        raise InputError(f"{row.where}: {row.error}")
    record = row.record
    if not isinstance(record, dict) or (record.get("messages") is None and record.get("text") is None):
        raise InputError(f"{row.where}: expected an object with a 'messages' or 'text' field")
    sample_id = _sample_id(record.get("id"), row)
    meta = record.get("meta") or {}
    if not isinstance(meta, dict):
        raise InputError(f"{row.where}: field 'meta' must be an object, got {_json_kind(meta)}")
    if record.get("messages") is not None:  # a row with both is a chat: the richer form wins
        return ChatSample(sample_id, _parse_messages(record["messages"], row.where), meta)
    text = record["text"]
    if not isinstance(text, str) or not text.strip():
        got = "blank text" if isinstance(text, str) else _json_kind(text)
        raise InputError(f"{row.where}: 'text' must be a non-empty string, got {got}")
    if not _is_unicode(text):
        raise InputError(f"{row.where}: field 'text': holds an unpaired surrogate (not valid Unicode)")
    return TextSample.of(sample_id, text, meta)


def _sample_id(value: Any, row: _Row) -> str:
    """Ids are text or whole numbers (as datasets write them); a row without one gets FILE-LINE."""
    if value is None:
        return row.default_id
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip() or not _is_unicode(value):
        raise InputError(f"{row.where}: field 'id': expected non-empty text or a whole number, "
                         f"got {_json_kind(value) if not isinstance(value, str) else shown(value)}")
    return value


def _check_unique(sample_id: str, row: _Row, seen: dict[str, str]) -> None:
    """Scores, filters and activations are keyed by id: a repeated id would silently merge two rows."""
    if sample_id in seen:
        raise InputError(f"{row.where}: field 'id': {shown(sample_id)} repeats the id of {seen[sample_id]} "
                         "(ids must be unique)")
    seen[sample_id] = row.at or row.where


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
    """Rows of a JSONL(.gz) file; bad rows come as errors, an unreadable file raises at once."""
    line_no = 0
    try:
        with _open_binary(path) as handle:
            for line_no, raw in enumerate(handle, start=1):
                row = _jsonl_row(path, line_no, raw)
                if row is not None:
                    yield row
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"{path}: cannot read line {line_no + 1} ({_read_problem(exc)})") from None


def _jsonl_row(path: Path, line_no: int, raw: bytes) -> _Row | None:
    """One line as a row; None for a blank line. Ids default to FILE-LINE, as read_chat_jsonl's always did."""
    where, default_id, at = f"{path}:{line_no}", f"{path.stem}-{line_no}", f"line {line_no}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if line_no == 1 and raw.startswith(b"\x1f\x8b"):
            return _Row(where, default_id, None, "not UTF-8 text: the file looks gzip-compressed; name it .jsonl.gz", at)
        return _Row(where, default_id, None, f"invalid UTF-8 at byte {exc.start + 1} of the line", at)
    if line_no == 1:
        line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return _Row(where, default_id, None, f"invalid JSON ({exc.msg})", at)
    except RecursionError:
        return _Row(where, default_id, None, "invalid JSON (nested too deeply)", at)
    except ValueError as exc:  # e.g. an integer longer than Python converts
        return _Row(where, default_id, None, f"invalid JSON ({str(exc).splitlines()[0][:120]})", at)
    return _Row(where, default_id, record, None, at)


def _read_problem(exc: BaseException) -> str:
    """Why a file stopped being readable part-way, in a few words."""
    if isinstance(exc, EOFError):
        return "the gzip data is cut short: the file is truncated"
    if isinstance(exc, gzip.BadGzipFile):
        return f"not valid gzip: {exc}"
    if isinstance(exc, zlib.error):
        return f"corrupt gzip data: {exc}"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


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
            yield _Row(f"{source}: row {index}", f"{source.stem}-{index}", record, at=f"row {index}")
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
