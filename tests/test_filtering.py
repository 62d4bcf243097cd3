import json

import pytest

from spillover.data import ChatSample, read_chat_jsonl, write_chat_jsonl
from spillover.errors import ConfigError
from spillover.filtering import random_risks, remove_riskiest, write_filtered

MESSAGES = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})


def samples(n):
    return [ChatSample(f"s{i}", MESSAGES) for i in range(n)]


def test_removes_the_riskiest_fraction_and_keeps_input_order():
    data = samples(10)
    risks = {f"s{i}": float(i % 5) for i in range(10)}
    result = remove_riskiest(data, risks, 0.4, "geometry")
    assert [i for i, _ in result.removed] == ["s4", "s9", "s3", "s8"]
    assert [s.id for s in result.kept] == ["s0", "s1", "s2", "s5", "s6", "s7"]


def test_random_risks_are_seeded():
    ids = [s.id for s in samples(50)]
    assert random_risks(ids, 1) == random_risks(ids, 1) != random_risks(ids, 2)


@pytest.mark.parametrize("fraction, strategy, message", [(1.0, "geometry", "fraction"), (-0.1, "random", "fraction"),
                                                        (0.5, "astrology", "strategy")])
def test_bad_arguments(fraction, strategy, message):
    with pytest.raises(ConfigError, match=message):
        remove_riskiest(samples(4), {f"s{i}": 0.0 for i in range(4)}, fraction, strategy)


def test_missing_risk_is_named():
    with pytest.raises(ConfigError, match="'s3'"):
        remove_riskiest(samples(4), {"s0": 0, "s1": 0, "s2": 0}, 0.5, "judge")


def test_outputs_are_new_files_and_the_input_is_untouched(tmp_path):
    source = write_chat_jsonl(tmp_path / "train.jsonl", samples(6))
    before = source.read_bytes()
    result = remove_riskiest(read_chat_jsonl(source), {f"s{i}": i for i in range(6)}, 0.5, "projection")
    kept = write_filtered(result, tmp_path / "out", source)
    assert source.read_bytes() == before
    assert [s.id for s in read_chat_jsonl(kept)] == ["s0", "s1", "s2"]
    manifest = json.loads((tmp_path / "out" / "filter.json").read_text())
    assert [r["id"] for r in manifest["removed"]] == ["s5", "s4", "s3"]
    with pytest.raises(ConfigError, match="overwrite the input"):
        write_filtered(result, tmp_path / "out", tmp_path / "out" / "kept.jsonl")
