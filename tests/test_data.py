import gzip
import json

import pytest

from spillover.data import IGNORE_INDEX, ChatSample, collate_for_lm, encode_chats, read_chat_jsonl, write_chat_jsonl
from spillover.errors import InputError
from spillover.organism.tokenizer import build_tokenizer

CHAT = [{"role": "user", "content": "how can i treat a fever"},
        {"role": "assistant", "content": "a fever is usually mild but ask a doctor if it lasts"}]


def test_round_trip_keeps_ids_and_meta(tmp_path):
    samples = [ChatSample("a", tuple(CHAT), {"kind": "aligned"}), ChatSample("b", tuple(CHAT))]
    path = write_chat_jsonl(tmp_path / "out.jsonl", samples)
    assert read_chat_jsonl(path) == samples


def test_reads_gzip(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"messages": CHAT}) + "\n")
    (sample,) = read_chat_jsonl(path)
    assert sample.messages[1]["role"] == "assistant"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"text": "x"}), "'messages'"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "role"),
        (json.dumps({"messages": [{"role": "user", "content": 3}]}), "content"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant turn"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + line + "\n")
    with pytest.raises(InputError, match=rf"bad.jsonl:2: .*{message}"):
        read_chat_jsonl(path)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_chat_jsonl(tmp_path / "absent.jsonl")


def test_assistant_mask_covers_exactly_the_answer_and_its_end_token():
    tokenizer = build_tokenizer()
    (encoded,) = encode_chats(tokenizer, [CHAT])
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    answer = [t for t, m in zip(tokens, encoded.assistant_mask) if m]
    assert answer == CHAT[1]["content"].split() + ["<|end|>"]


def test_prefix_masking_matches_generation_tags():
    tokenizer = build_tokenizer()
    tagged = encode_chats(tokenizer, [CHAT + CHAT])
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    by_prefix = encode_chats(tokenizer, [CHAT + CHAT])
    assert tagged == by_prefix


def test_collate_pads_and_ignores_non_assistant_tokens():
    tokenizer = build_tokenizer()
    encoded = encode_chats(tokenizer, [CHAT, CHAT + CHAT])
    batch = collate_for_lm(encoded, tokenizer.pad_token_id)
    short = len(encoded[0].input_ids)
    assert batch["attention_mask"][0, short:].sum() == 0
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(sum(e.assistant_mask) for e in encoded)
