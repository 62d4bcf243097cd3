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


def files(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_filter_is_reused_with_the_same_inputs_and_never_replaced_with_others(tmp_path):
    from spillover.errors import InputError, OtherInputsError
    from spillover.risk import filter_file

    source = write_chat_jsonl(tmp_path / "train.jsonl", samples(8))
    out = tmp_path / "out"
    kept = filter_file(source, out, "random", 0.5, seed=1)
    written = files(out)
    assert filter_file(source, out, "random", 0.5, seed=1) == kept
    assert files(out) == written  # not rewritten
    with pytest.raises(OtherInputsError, match=r"\(fraction differ\)"):
        filter_file(source, out, "random", 0.25, seed=1)
    with pytest.raises(OtherInputsError, match=r"\(seed differ\)"):
        filter_file(source, out, "random", 0.5, seed=2)
    assert files(out) == written  # nothing replaced
    kept.write_text(kept.read_text().splitlines()[0] + "\n")
    with pytest.raises(InputError, match="kept.jsonl: changed since"):
        filter_file(source, out, "random", 0.5, seed=1)


def test_a_filter_written_before_inputs_were_recorded_is_replaced_only_by_the_same_kept_set(tmp_path):
    from spillover.errors import OtherInputsError
    from spillover.risk import filter_file

    source = write_chat_jsonl(tmp_path / "train.jsonl", samples(8))
    out = tmp_path / "out"
    filter_file(source, out, "random", 0.5, seed=1)
    manifest = json.loads((out / "filter.json").read_text())
    legacy = {k: v for k, v in manifest.items() if k not in ("inputs", "kept_sha256")}
    (out / "filter.json").write_text(json.dumps(legacy))
    before = (out / "kept.jsonl").read_bytes()
    with pytest.raises(OtherInputsError, match="kept other samples"):
        filter_file(source, out, "random", 0.5, seed=2)
    assert (out / "kept.jsonl").read_bytes() == before
    filter_file(source, out, "random", 0.5, seed=1)
    assert json.loads((out / "filter.json").read_text()) == manifest


def test_the_judge_is_asked_once_for_every_fraction_and_rerun(tmp_path, monkeypatch):
    from spillover import risk

    calls = []

    def judge(rows, spec):
        calls.append(spec)
        return {s.id: float(i) for i, s in enumerate(rows)}

    monkeypatch.setattr(risk, "judge_risks", judge)
    source = write_chat_jsonl(tmp_path / "train.jsonl", samples(8))
    scores = risk.judge_score_file(source, "local:judge.gguf", tmp_path / "judge")
    assert risk.judge_score_file(source, "local:judge.gguf", tmp_path / "judge") == scores
    assert calls == ["local:judge.gguf"]
    assert json.loads((tmp_path / "judge" / "score.json").read_text())["judge_calls"] == 8
    for fraction in (0.25, 0.5):
        kept = risk.filter_file(source, tmp_path / f"kept-{fraction}", "judge", fraction, scores)
        assert [s.id for s in read_chat_jsonl(kept)] == [f"s{i}" for i in range(8 - round(8 * fraction))]
    assert len(calls) == 1


def test_the_judge_strategy_ranks_without_a_fluency_gate(tmp_path, monkeypatch):
    """The gate changes coherence only; the risk reads alignment, so the gate's reference LM is
    never run over the training set, and a gated and an ungated spec share their judge scores."""
    from spillover import risk

    # a gate would fail on this reference at once; the ranking never builds it
    assert set(risk.judge_risks(samples(2), "organism+fluency:/no/such/model")) == {"s0", "s1"}
    calls = []
    monkeypatch.setattr(risk, "judge_risks", lambda rows, spec: calls.append(spec) or {s.id: 0.0 for s in rows})
    source = write_chat_jsonl(tmp_path / "train.jsonl", samples(4))
    first = risk.judge_score_file(source, "classifier+fluency:gemma3-270m", tmp_path / "judge")
    assert risk.judge_score_file(source, "classifier", tmp_path / "judge") == first and len(calls) == 1
    assert risk.ranking_judge("organism+fluency:organism") == "organism" == risk.ranking_judge("organism")
