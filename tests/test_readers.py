"""read_samples: chat and text JSONL (plain and gzip), parquet and `datasets` folders, bad rows."""

import gzip
import json
import logging
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spillover.data import (
    ChatSample,
    TextSample,
    encode_chats,
    encode_samples,
    read_chat_jsonl,
    read_sample_file,
    read_samples,
    write_chat_jsonl,
)
from spillover.errors import ConfigError, InputError
from spillover.organism.tokenizer import build_tokenizer

CHAT = (
    {"role": "user", "content": "how can i treat a fever"},
    {"role": "assistant", "content": "a fever is usually mild but ask a doctor if it lasts"},
)
SAMPLES = [
    ChatSample("chat-0", CHAT, {"kind": "aligned"}),
    TextSample.of("text-0", "rest and drink water", {"kind": "aligned"}),
    ChatSample("chat-1", CHAT),
    TextSample.of("text-1", "a fever is usually mild"),
]
BAD_ROWS = [
    ("{not json", "invalid JSON"),
    (json.dumps({"prompt": "x"}), "'messages' or 'text'"),
    (json.dumps({"text": "   "}), "'text' must be a non-empty string"),
    (json.dumps({"text": 3}), "'text' must be a non-empty string"),
    (json.dumps({"text": "x", "meta": [1]}), "'meta' must be an object"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "role"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant turn"),
]


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# --- JSONL ------------------------------------------------------------------------------------


def test_jsonl_round_trips_chat_and_text(tmp_path):
    path = write_chat_jsonl(tmp_path / "mixed.jsonl", SAMPLES)
    assert read_samples(path) == SAMPLES
    assert json.loads(path.read_text().splitlines()[1]) == {
        "id": "text-0",
        "text": "rest and drink water",
        "meta": {"kind": "aligned"},
    }


def test_chat_jsonl_reads_as_read_chat_jsonl_does(tmp_path):
    path = _jsonl(
        tmp_path / "chat.jsonl",
        [
            json.dumps({"messages": list(CHAT)}),
            "",
            json.dumps({"id": 7, "messages": list(CHAT), "meta": {"a": 1}}),
        ],
    )
    assert read_samples(path) == read_chat_jsonl(path)
    assert [s.id for s in read_samples(path)] == ["chat-1", "7"]


def test_text_jsonl_gives_text_samples_with_default_ids(tmp_path):
    path = _jsonl(
        tmp_path / "plain.jsonl",
        [json.dumps({"text": "rest and drink water"}), json.dumps({"text": "call a doctor", "id": None})],
    )
    samples = read_samples(path)
    assert all(isinstance(s, TextSample) for s in samples)
    assert [(s.id, s.text) for s in samples] == [
        ("plain-1", "rest and drink water"),
        ("plain-2", "call a doctor"),
    ]
    assert samples[0].messages == ({"role": "assistant", "content": "rest and drink water"},)


def test_a_row_with_messages_and_text_is_a_chat(tmp_path):
    path = _jsonl(tmp_path / "both.jsonl", [json.dumps({"messages": list(CHAT), "text": "rendered"})])
    (sample,) = read_samples(path)
    assert type(sample) is ChatSample and sample.messages == CHAT


def test_gzip_jsonl(tmp_path):
    path = tmp_path / "mixed.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(s.to_record()) + "\n" for s in SAMPLES)
    assert read_samples(path) == SAMPLES


@settings(max_examples=30, deadline=None)
@given(st.text(min_size=1).filter(str.strip))
def test_any_text_round_trips(tmp_path_factory, text):
    path = write_chat_jsonl(tmp_path_factory.mktemp("h") / "t.jsonl", [TextSample.of("x", text)])
    assert read_samples(path) == [TextSample.of("x", text)]


@pytest.mark.parametrize("line, message", BAD_ROWS)
def test_bad_jsonl_row_names_file_and_line(tmp_path, line, message):
    path = _jsonl(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), "", line])
    with pytest.raises(InputError, match=rf"bad.jsonl:3: .*{message}"):
        read_samples(path)


def test_skip_bad_counts_and_logs_what_it_skipped(tmp_path, caplog):
    lines = (
        [json.dumps({"text": "fine"})]
        + [line for line, _ in BAD_ROWS]
        + [json.dumps({"messages": list(CHAT)})]
    )
    path = _jsonl(tmp_path / "bad.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="spillover.data"):
        result = read_sample_file(path, skip_bad=True)
    assert [s.id for s in result.samples] == ["bad-1", f"bad-{len(lines)}"]
    assert result.skipped == len(BAD_ROWS)
    assert result.errors[0].endswith(
        "bad.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes)"
    )
    assert len(result.errors) == 5
    assert f"skipped {len(BAD_ROWS)} bad row(s) of {len(lines)}" in caplog.text
    assert read_samples(path, skip_bad=True) == list(result.samples)


def test_a_clean_file_skips_nothing_and_logs_nothing(tmp_path, caplog):
    path = write_chat_jsonl(tmp_path / "ok.jsonl", SAMPLES)
    with caplog.at_level(logging.WARNING):
        result = read_sample_file(path, skip_bad=True)
    assert (result.skipped, result.errors, caplog.text) == (0, (), "")


def test_a_broken_gzip_raises_even_with_skip_bad(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="broken.jsonl.gz: cannot read"):
        read_samples(path, skip_bad=True)


@pytest.mark.parametrize(
    "name, message",
    [
        ("absent.jsonl", "no such file"),
        ("data.csv", "unknown file type"),
        ("folder", "not one saved by datasets"),
    ],
)
def test_paths_it_cannot_read(tmp_path, name, message):
    if name == "data.csv":
        (tmp_path / name).write_text("text\nhi\n")
    if name == "folder":
        (tmp_path / name).mkdir()
    with pytest.raises(InputError, match=message):
        read_samples(tmp_path / name)


def test_text_sample_holds_one_assistant_turn():
    with pytest.raises(ConfigError, match="TextSample.of"):
        TextSample("x", CHAT)


# --- encoding ---------------------------------------------------------------------------------


def test_text_is_tokenized_without_the_chat_template():
    tokenizer = build_tokenizer()
    chat, text = encode_samples(tokenizer, [SAMPLES[0], SAMPLES[1]])
    assert chat == encode_chats(tokenizer, [CHAT])[0]
    assert tokenizer.convert_ids_to_tokens(text.input_ids) == ["<s>", "rest", "and", "drink", "water"]
    assert text.assistant_mask == [False, True, True, True, True]


def test_encode_samples_keeps_order():
    tokenizer = build_tokenizer()
    encoded = encode_samples(tokenizer, SAMPLES)
    assert encoded[0] == encoded[2] and encoded[1] != encoded[3]
    assert [len(e.input_ids) for e in encoded[1::2]] == [5, 6]


# --- Arrow sources: parquet and datasets folders ------------------------------------------------


def _columns_of(samples):
    """Column-wise records: from_pylist and from_list would take their columns from the first row only."""
    records = [s.to_record() for s in samples]
    return {k: [r.get(k) for r in records] for k in ("id", "messages", "text", "meta")}


def _arrow_table(samples):
    pa = pytest.importorskip("pyarrow")
    return pa.Table.from_pydict(_columns_of(samples))


def test_parquet_round_trips_and_ignores_other_columns(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    table = _arrow_table(SAMPLES)
    table = table.append_column("unrelated", table.column("id"))
    pq.write_table(table, tmp_path / "mixed.parquet", row_group_size=3)
    assert read_samples(tmp_path / "mixed.parquet") == SAMPLES


def test_parquet_default_ids_are_row_indices(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(
        _arrow_table([TextSample.of("x", "a"), TextSample.of("y", "b")]).drop(["id"]),
        tmp_path / "plain.parquet",
    )
    assert [s.id for s in read_samples(tmp_path / "plain.parquet")] == ["plain-0", "plain-1"]


def test_bad_parquet_row_names_file_and_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"text": "fine"}, {"text": None}, {"text": "  "}, {"text": "also fine"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(
        InputError, match=r"bad.parquet: row 1: expected an object with a 'messages' or 'text'"
    ):
        read_samples(tmp_path / "bad.parquet")
    result = read_sample_file(tmp_path / "bad.parquet", skip_bad=True)
    assert ([s.text for s in result.samples], result.skipped) == (["fine", "also fine"], 2)
    assert "bad.parquet: row 2: 'text' must be a non-empty string" in result.errors[1]


def test_parquet_without_a_sample_column_or_not_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "x"}]), tmp_path / "other.parquet")
    with pytest.raises(
        InputError, match=r"other.parquet: no 'messages' or 'text' column \(columns: prompt\)"
    ):
        read_samples(tmp_path / "other.parquet", skip_bad=True)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="fake.parquet: not a readable parquet file"):
        read_samples(tmp_path / "fake.parquet")


def test_without_pyarrow_parquet_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"x.parquet: .*needs pyarrow"):
        read_samples(tmp_path / "x.parquet")


def _save_by_hand(folder, tables):
    """A save_to_disk folder written with pyarrow alone: Arrow stream files listed in state.json."""
    pa = pytest.importorskip("pyarrow")
    folder.mkdir()
    names = [f"data-{i:05d}-of-{len(tables):05d}.arrow" for i in range(len(tables))]
    for name, table in zip(names, tables):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    return folder


def test_datasets_folder_by_hand_spans_its_files(tmp_path):
    table = _arrow_table([SAMPLES[0], SAMPLES[2], TextSample.of("x", "a"), TextSample.of("y", " ")])
    folder = _save_by_hand(tmp_path / "ds", [table.slice(0, 2), table.slice(2, 2)])
    with pytest.raises(InputError, match=r"ds: row 3: 'text' must be a non-empty string"):
        read_samples(folder)
    assert [s.id for s in read_samples(folder, skip_bad=True)] == ["chat-0", "chat-1", "x"]


def test_datasets_folder_with_a_missing_file(tmp_path):
    folder = _save_by_hand(tmp_path / "ds", [_arrow_table(SAMPLES)])
    next(folder.glob("*.arrow")).unlink()
    with pytest.raises(InputError, match=r"state.json: lists data file\(s\) that are missing: data-00000"):
        read_samples(folder)


def test_datasets_save_to_disk_round_trips(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = (
        datasets.Dataset.from_dict(_columns_of(SAMPLES)).shuffle(seed=0).select(range(3))
    )  # saved in this order
    ds.save_to_disk(str(tmp_path / "ds"))
    by_id = {s.id: s for s in SAMPLES}
    assert read_samples(tmp_path / "ds") == [by_id[i] for i in ds["id"]]


def test_datasets_dict_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict(_columns_of(SAMPLES))
    datasets.DatasetDict(train=train).save_to_disk(str(tmp_path / "one"))
    assert read_samples(tmp_path / "one") == SAMPLES
    datasets.DatasetDict(train=train, test=train).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(
        InputError, match=r"two: a DatasetDict with splits train, test; pass one split's folder"
    ):
        read_samples(tmp_path / "two")
    assert read_samples(tmp_path / "two" / "test") == SAMPLES
