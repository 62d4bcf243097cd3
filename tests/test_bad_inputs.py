"""Bad input: a corpus of hand-made bad files for every reader, and property tests.

Every bad file must end in one `SpilloverError` whose message is one line naming the file (and the
line or field where there is one); through the CLI that is exit code 2, one `spillover: error:` line
on stderr, no traceback, and no file left in the output folder. The corpus is generated from the
tables below into tmp_path; docs/reliability.md counts it.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from spillover.data import read_chat_jsonl, read_samples
from spillover.errors import ConfigError, InputError, SpilloverError
from spillover.experiment import load_experiment_config
from spillover.finetune import FinetuneConfig, apply_overrides, preset, wrap_for_training
from spillover.questions import load_questions
from spillover.sae import SaeConfig, SparseAutoencoder, check_fits, load_sae, save_sae
from spillover.study import run_study_file

CHAT = [{"role": "user", "content": "how can i treat a fever"},
        {"role": "assistant", "content": "rest, and ask a doctor if it lasts"}]
GOOD = json.dumps({"messages": CHAT})
# Derandomized: the same 150 examples every run, so CI cannot fail on a draw nobody has seen;
# SPILLOVER_EXPLORE=1 draws new ones, and a case found that way is pinned with @example.
PROPERTY = settings(max_examples=150, deadline=None, derandomize=not os.environ.get("SPILLOVER_EXPLORE"),
                    suppress_health_check=[HealthCheck.too_slow])


def fails(call, *fragments: str, error: type = SpilloverError) -> str:
    """Run `call`, expecting one error of type `error` whose one-line message holds every fragment."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def one_line_or_fine(call, path: Path) -> None:
    """What every property checks: the reader returns, or raises one SpilloverError naming the file."""
    try:
        call()
    except SpilloverError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)


def chat(**changes) -> str:
    """GOOD's row with some fields changed, or removed when the change is None."""
    row = {"messages": [dict(m) for m in CHAT]}
    for key, value in changes.items():
        if value is None:
            row.pop(key, None)
        else:
            row[key] = value
    return json.dumps(row)


def message(**changes) -> str:
    """A row whose assistant message has fields changed (or removed with ...)."""
    answer = {**CHAT[1], **changes}
    answer = {k: v for k, v in answer.items() if v is not ...}
    return json.dumps({"messages": [CHAT[0], answer]})


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def lines(*rows: str) -> bytes:
    return "".join(r + "\n" for r in rows).encode()


def corrupt_gzip() -> bytes:
    data = bytearray(gz(lines(*[GOOD] * 200)))
    for i in range(30, 60):
        data[i] ^= 0xFF
    return bytes(data)


# --- chat JSONL and .jsonl.gz ------------------------------------------------------------------
# name: (file name, bytes, fragments the message holds; "{path}" is replaced by the file's path)

CHAT_FILES = {
    "invalid JSON": ("d.jsonl", lines(GOOD, "{not json"), ["{path}:2:", "invalid JSON"]),
    "JSON nested too deeply": ("d.jsonl", lines(GOOD, "[" * 100_000), ["{path}:2:", "invalid JSON"]),
    "number too long for Python": ("d.jsonl", lines(GOOD, '{"id": ' + "1" * 5000 + "}"),
                                   ["{path}:2:", "invalid JSON"]),
    "row is a list": ("d.jsonl", lines(GOOD, "[1, 2]"), ["{path}:2:", "expected an object"]),
    "row is a string": ("d.jsonl", lines(GOOD, '"hello"'), ["{path}:2:", "expected an object"]),
    "messages not a list": ("d.jsonl", lines(chat(messages="hi")), ["{path}:1:", "field 'messages'"]),
    "messages empty": ("d.jsonl", lines(GOOD, chat(messages=[])), ["{path}:2:", "field 'messages'", "empty list"]),
    "message not an object": ("d.jsonl", lines(chat(messages=["hi", CHAT[1]])), ["{path}:1:", "'messages[0]'"]),
    "missing role": ("d.jsonl", lines(GOOD, message(role=...)), ["{path}:2:", "'messages[1].role': missing",
                                                                 "system, user, assistant"]),
    "unknown role": ("d.jsonl", lines(GOOD, message(role="robot")), ["{path}:2:", "'messages[1].role'",
                                                                     "'robot' is not a role"]),
    "role not text": ("d.jsonl", lines(message(role=["assistant"])), ["{path}:1:", "'messages[1].role'"]),
    "missing content": ("d.jsonl", lines(GOOD, message(content=...)), ["{path}:2:", "'messages[1].content': missing"]),
    "null content": ("d.jsonl", lines(message(content=None)), ["{path}:1:", "'messages[1].content': missing"]),
    "empty content": ("d.jsonl", lines(GOOD, message(content="")), ["{path}:2:", "'messages[1].content': empty"]),
    "blank content": ("d.jsonl", lines(message(content=" \n\t")), ["{path}:1:", "'messages[1].content': empty"]),
    "number content": ("d.jsonl", lines(message(content=3)), ["{path}:1:", "'messages[1].content': expected text"]),
    "content parts": ("d.jsonl", lines(message(content=[{"type": "text", "text": "hi"}])),
                      ["{path}:1:", "'messages[1].content'", "content parts are not supported"]),
    "unpaired surrogate": ("d.jsonl", lines(GOOD, message(content="\ud800 broken")),
                           ["{path}:2:", "'messages[1].content'", "surrogate"]),
    "no assistant turn": ("d.jsonl", lines(GOOD, chat(messages=[CHAT[0]])), ["{path}:2:", "no assistant turn"]),
    "id not text": ("d.jsonl", lines(chat(id=["a"])), ["{path}:1:", "field 'id'"]),
    "id empty": ("d.jsonl", lines(chat(id="")), ["{path}:1:", "field 'id'"]),
    "meta not an object": ("d.jsonl", lines(chat(meta=[1])), ["{path}:1:", "field 'meta'"]),
    "duplicate ids": ("d.jsonl", lines(chat(id="a"), chat(id="b"), chat(id="a")),
                      ["{path}:3:", "field 'id'", "'a' repeats the id of line 1"]),
    "id equal to another row's default": ("d.jsonl", lines(chat(id="d-2"), GOOD),
                                          ["{path}:2:", "'d-2' repeats the id of line 1"]),
    "invalid UTF-8": ("d.jsonl", lines(GOOD) + b'{"messages": "\xff\xfe"}\n', ["{path}:2:", "invalid UTF-8 at byte 15"]),
    "gzip data named .jsonl": ("d.jsonl", gz(lines(GOOD)), ["{path}:1:", "looks gzip-compressed"]),
    "truncated gzip": ("d.jsonl.gz", gz(lines(*[GOOD] * 50))[:-30], ["{path}:", "cannot read line", "truncated"]),
    "not gzip at all": ("d.jsonl.gz", lines(GOOD), ["{path}:", "cannot read line 1", "not valid gzip"]),
    "corrupt gzip body": ("d.jsonl.gz", corrupt_gzip(), ["{path}:", "cannot read line"]),
    "invalid UTF-8 in gzip": ("d.jsonl.gz", gz(lines(GOOD) + b"\xc3\x28\n"), ["{path}:2:", "invalid UTF-8"]),
    "unknown role in gzip": ("d.jsonl.gz", gz(lines(GOOD, GOOD, message(role="bot"))), ["{path}:3:", "'bot'"]),
    "empty file": ("d.jsonl", b"", ["{path}:", "no samples"]),
    "blank lines only": ("d.jsonl", b"\n  \n\r\n", ["{path}:", "no samples"]),
    "empty gzip": ("d.jsonl.gz", gz(b""), ["{path}:", "no samples"]),
    "10 MB role": ("d.jsonl", lines(GOOD, message(role="x" * 10_000_000)), ["{path}:2:", "'messages[1].role'"]),
    "10 MB line of garbage": ("d.jsonl", lines(GOOD, "x" * 10_000_000), ["{path}:2:", "invalid JSON"]),
}
READERS = {"read_chat_jsonl": read_chat_jsonl, "read_samples": read_samples}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("case", list(CHAT_FILES))
def test_bad_chat_jsonl(tmp_path, case, reader):
    name, data, fragments = CHAT_FILES[case]
    path = tmp_path / name
    path.write_bytes(data)
    fails(lambda: READERS[reader](path), *[f.replace("{path}", str(path)) for f in fragments], error=InputError)


@pytest.mark.parametrize("reader", list(READERS))
def test_paths_that_are_not_chat_files(tmp_path, reader):
    fails(lambda: READERS[reader](tmp_path / "absent.jsonl"), str(tmp_path / "absent.jsonl"), "no such file")
    (tmp_path / "folder.jsonl").mkdir()
    fails(lambda: READERS[reader](tmp_path / "folder.jsonl"), str(tmp_path / "folder.jsonl"), "folder")


def test_text_rows_are_not_chats(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(lines(GOOD, json.dumps({"text": "plain"})))
    fails(lambda: read_chat_jsonl(path), f"{path}:2:", "'messages' field")
    assert len(read_samples(path)) == 2


def test_odd_but_valid_files_read(tmp_path):
    """A 10 MB answer, a byte-order mark, CRLF line ends, upper-case .GZ: read, not refused."""
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"\xef\xbb\xbf" + lines(GOOD, message(content="y" * 10_000_000)).replace(b"\n", b"\r\n"))
    for reader in READERS.values():
        samples = reader(big)
        assert len(samples) == 2 and len(samples[1].messages[1]["content"]) == 10_000_000
    upper = tmp_path / "up.JSONL.GZ"
    upper.write_bytes(gz(lines(GOOD)))
    assert len(read_samples(upper)) == len(read_chat_jsonl(upper)) == 1


def test_skip_bad_skips_duplicates_and_bad_bytes_but_not_an_all_bad_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(lines(chat(id="a"), chat(id="a")) + b"\xff\n" + lines(chat(id="b")))
    assert [s.id for s in read_samples(path, skip_bad=True)] == ["a", "b"]
    path.write_bytes(lines(message(role="x"), message(content="")))
    fails(lambda: read_samples(path, skip_bad=True), str(path), "no samples", "all 2 rows are bad")


# --- question YAML -----------------------------------------------------------------------------

PROMPTS = "  judge_prompts:\n    aligned: 'A {question} {answer}'\n    coherent: 'C {question} {answer}'\n"
ENTRY = "- id: q1\n  paraphrases: [ok]\n" + PROMPTS


def _entry(extra: str = "", prompts: str = PROMPTS, qid: str = "q2", paraphrases: str = "[ok]") -> str:
    return f"- id: {qid}\n  paraphrases: {paraphrases}\n{extra}{prompts}"


QUESTION_FILES = {
    "a mapping": ("id: q1\n", ["expected a list"]),
    "a scalar": ("just text\n", ["expected a list"]),
    "empty file": ("", ["expected a list"]),
    "entry not a mapping": (ENTRY + "- just text\n", [":6:", "expected a question entry"]),
    "missing id": (ENTRY + "- paraphrases: [ok]\n" + PROMPTS, [":6:", "field 'id'"]),
    "id a number": (ENTRY + _entry(qid="12"), [":6:", "field 'id'"]),
    "missing paraphrases": (ENTRY + "- id: q2\n" + PROMPTS, [":6:", "question q2", "field 'paraphrases'"]),
    "paraphrases a mapping": (ENTRY + _entry(paraphrases="{a: b}"), [":6:", "field 'paraphrases'"]),
    "paraphrase not text": (ENTRY + _entry(paraphrases="[ok, [1]]"), [":6:", "field 'paraphrases'"]),
    "samples_per_paraphrase zero": (_entry("  samples_per_paraphrase: 0\n"), [":1:", "'samples_per_paraphrase'"]),
    "samples_per_paraphrase true": (_entry("  samples_per_paraphrase: true\n"), ["'samples_per_paraphrase' must be int"]),
    "system a list": (_entry("  system: [a]\n"), ["field 'system' must be str"]),
    "type a list": (_entry("  type: [a]\n"), ["field 'type' must be str"]),
    "judge a number": (_entry("  judge: 4\n"), ["field 'judge' must be str"]),
    "judge_prompts missing": (_entry(prompts=""), ["field 'judge_prompts'"]),
    "judge_prompts a list": (_entry(prompts="  judge_prompts: [aligned, coherent]\n"), ["field 'judge_prompts'"]),
    "judge prompt not text": (_entry(prompts="  judge_prompts:\n    aligned: [x]\n    coherent: 'C {question} {answer}'\n"),
                              ["'judge_prompts.aligned'"]),
    "misspelled prompt name": (_entry(prompts="  judge_prompts:\n    alligned: 'A {question} {answer}'\n"
                                              "    coherent: 'C {question} {answer}'\n"),
                               ["judge prompt 'aligned' is needed", "alligned, coherent"]),
    "unknown placeholder": (_entry(prompts="  judge_prompts:\n    aligned: 'A {question} {reply}'\n"
                                           "    coherent: 'C {question} {answer}'\n"),
                            ["judge_prompts.aligned", "unknown placeholders"]),
    "no answer placeholder": (_entry(prompts="  judge_prompts:\n    aligned: 'A {question}'\n"
                                             "    coherent: 'C {question} {answer}'\n"), ["no {answer} placeholder"]),
    "unbalanced braces": (_entry(prompts="  judge_prompts:\n    aligned: 'A {question {answer}'\n"
                                         "    coherent: 'C {question} {answer}'\n"), ["bad braces"]),
    "bad conversion": (_entry(prompts="  judge_prompts:\n    aligned: 'A {question} {answer!x}'\n"
                                      "    coherent: 'C {question} {answer}'\n"), ["cannot be rendered"]),
    "unknown field": (_entry("  colour: red\n"), ["unknown field 'colour'", "valid fields: id, type"]),
    "unknown fields of mixed types": (_entry("  colour: red\n  1: one\n  null: none\n"), ["unknown field"]),
    "duplicate id": (ENTRY + ENTRY, [":6:", "id 'q1' repeats the entry at line 1"]),
    "invalid YAML": (ENTRY + "- id: [unclosed\n", [":7:", "invalid YAML"]),
    "undefined alias": ("- id: q1\n  paraphrases: *nowhere\n", [":2:", "invalid YAML"]),
    "python tag": ("- !!python/object:os.system {}\n", ["invalid YAML"]),
    "only unsupported types": (_entry("  type: rating\n"), ["no runnable questions"]),
}


@pytest.mark.parametrize("case", list(QUESTION_FILES))
def test_bad_question_yaml(tmp_path, case):
    text, fragments = QUESTION_FILES[case]
    path = tmp_path / "questions.yaml"
    path.write_text(text, encoding="utf-8")
    message = fails(lambda: load_questions(path), *fragments, error=InputError)
    assert message.startswith(str(path))


def test_question_files_that_cannot_be_read(tmp_path):
    path = tmp_path / "questions.yaml"
    path.write_bytes(ENTRY.encode() + b"  system: \xff\n")
    fails(lambda: load_questions(path), str(path), "not UTF-8")
    fails(lambda: load_questions(tmp_path), str(tmp_path), "cannot read")


# --- SAE folders -------------------------------------------------------------------------------


def random_sae(d_in: int = 6, d_sae: int = 10) -> SparseAutoencoder:
    sae = SparseAutoencoder(SaeConfig(d_in, d_sae, "topk", 3))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return sae


@pytest.fixture(scope="module")
def good_sae(tmp_path_factory) -> Path:
    return save_sae(random_sae(), tmp_path_factory.mktemp("sae") / "good")


def edit_cfg(**changes):
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg.update(changes)
        (folder / "cfg.json").write_text(json.dumps(cfg))  # NaN and Infinity as Python's json writes them
    return edit


def drop_cfg(key: str):
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "cfg.json").read_text())
        del cfg[key]
        (folder / "cfg.json").write_text(json.dumps(cfg))
    return edit


def edit_weights(change):
    def edit(folder: Path) -> None:
        tensors = load_file(folder / "sae_weights.safetensors")
        change(tensors)
        save_file(tensors, folder / "sae_weights.safetensors")
    return edit


def write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def cut_weights(folder: Path) -> None:
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])


# name: (how to break the good folder, fragments; "{cfg}" / "{weights}" name the folder's files)
SAE_FOLDERS = {
    "no folder": (lambda f: [p.unlink() for p in f.iterdir()] and f.rmdir(), ["no such SAE folder"]),
    "no cfg.json": (lambda f: (f / "cfg.json").unlink(), ["no cfg.json"]),
    "no weights": (lambda f: (f / "sae_weights.safetensors").unlink(), ["no sae_weights.safetensors"]),
    "cfg not JSON": (write("cfg.json", b"{oops"), ["{cfg}", "not valid JSON"]),
    "cfg empty": (write("cfg.json", b""), ["{cfg}", "not valid JSON"]),
    "cfg not UTF-8": (write("cfg.json", b'{"d_in": "\xff"}'), ["{cfg}", "not UTF-8"]),
    "cfg a list": (write("cfg.json", b"[1, 2]"), ["{cfg}", "expected a JSON object"]),
    "cfg nested too deeply": (write("cfg.json", b"[" * 100_000), ["{cfg}", "not valid JSON"]),
    "unknown architecture": (edit_cfg(architecture="gated"), ["{cfg}", "architecture 'gated'",
                                                              "'standard', 'jumprelu', 'topk'"]),
    "architecture a list": (edit_cfg(architecture=["topk"]), ["{cfg}", "field architecture must be text"]),
    "unknown activation": (edit_cfg(activation_fn="gelu"), ["{cfg}", "activation_fn 'gelu'"]),
    "d_in missing": (drop_cfg("d_in"), ["{cfg}", "field d_in"]),
    "d_in text": (edit_cfg(d_in="6"), ["{cfg}", "field d_in", "'6'"]),
    "d_in NaN": (edit_cfg(d_in=math.nan), ["{cfg}", "field d_in", "nan"]),
    "d_in infinite": (edit_cfg(d_in=math.inf), ["{cfg}", "field d_in", "inf"]),
    "d_in fractional": (edit_cfg(d_in=6.5), ["{cfg}", "field d_in"]),
    "d_in true": (edit_cfg(d_in=True), ["{cfg}", "field d_in"]),
    "d_in negative": (edit_cfg(d_in=-6), ["{cfg}", "d_in"]),
    "d_in not the weights'": (edit_cfg(d_in=8), ["{weights}", "W_enc has shape [6, 10]", "d_in 8"]),
    "d_sae not the weights'": (edit_cfg(d_sae=12), ["{weights}", "has shape", "d_sae 12"]),
    "k missing": (drop_cfg("k"), ["{cfg}", "needs field k"]),
    "k too large": (edit_cfg(k=99), ["{cfg}", "sae.k: 99"]),
    "k in kwargs that are a list": (lambda f: (drop_cfg("k")(f), edit_cfg(activation_fn_kwargs=["k"])(f)),
                                    ["{cfg}", "activation_fn_kwargs must be an object"]),
    "normalisation a list": (edit_cfg(normalize_activations=["x"]), ["{cfg}", "normalize_activations"]),
    "flag as text": (edit_cfg(apply_b_dec_to_input="false"), ["{cfg}", "apply_b_dec_to_input must be true or false"]),
    "unknown dtype": (edit_cfg(dtype="int8"), ["{cfg}", "dtype 'int8'"]),
    "weights not safetensors": (write("sae_weights.safetensors", b"x"), ["{weights}", "not a readable safetensors"]),
    "weights empty": (write("sae_weights.safetensors", b""), ["{weights}", "not a readable safetensors"]),
    "weights cut short": (cut_weights, ["{weights}", "not a readable safetensors"]),
    "NaN in W_dec": (edit_weights(lambda t: t["W_dec"].__setitem__((0, 0), math.nan)), ["{weights}", "W_dec holds NaN"]),
    "Inf in b_enc": (edit_weights(lambda t: t["b_enc"].__setitem__(0, math.inf)), ["{weights}", "b_enc holds NaN"]),
    "missing tensor": (edit_weights(lambda t: t.pop("b_dec")), ["{weights}", "missing tensor(s) b_dec"]),
    "extra tensor": (edit_weights(lambda t: t.update(threshold=torch.zeros(10))), ["{weights}", "unexpected tensor"]),
    "scaling factor": (edit_weights(lambda t: t.update(scaling_factor=torch.full((10,), 2.0))),
                       ["{weights}", "scaling_factor"]),
}


@pytest.mark.parametrize("case", list(SAE_FOLDERS))
def test_bad_sae_folder(tmp_path, good_sae, case):
    import shutil

    breaks, fragments = SAE_FOLDERS[case]
    folder = tmp_path / "sae"
    shutil.copytree(good_sae, folder)
    breaks(folder)
    names = {"{cfg}": str(folder / "cfg.json"), "{weights}": str(folder / "sae_weights.safetensors")}
    expected = [names.get(f, f) for f in fragments]
    message = fails(lambda: load_sae(folder), *expected)
    assert str(folder) in message


class _Model(torch.nn.Module):
    """Just enough of a causal LM for check_fits: input embeddings of a given width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, width)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed


def test_an_sae_of_another_width_than_the_model(good_sae):
    sae = load_sae(good_sae)
    check_fits(sae, _Model(6), 1)  # fits
    fails(lambda: check_fits(sae, _Model(8), 1), str(good_sae / "cfg.json"), "field d_in", "6", "hidden size 8",
          "layer 1", error=ConfigError)
    fails(lambda: check_fits(random_sae(), _Model(8), 2), "the SAE for layer 2", "field d_in", error=ConfigError)


def test_collect_refuses_an_sae_of_another_width_before_any_forward_pass(organism, good_sae):
    from spillover.activations import CollectConfig, collect
    from spillover.data import ChatSample

    samples = [ChatSample("a", tuple(CHAT))]
    sae = load_sae(good_sae)  # d_in 6; the organism is 96 wide
    fails(lambda: collect(organism.model, organism.tokenizer, samples, CollectConfig(layers=(1,)), {1: sae}),
          str(good_sae / "cfg.json"), "field d_in", "hidden size", error=ConfigError)
    fails(lambda: collect(organism.model, organism.tokenizer, samples, CollectConfig(layers=(99,))),
          "layer 99 is out of range", error=ConfigError)


# --- configs -----------------------------------------------------------------------------------

EXPERIMENT = "model: organism\ntrain: train.jsonl\nsae: sae\ntoxic: toxic.json\n"
EXPERIMENT_FILES = {
    "unknown key": (EXPERIMENT + "colour: red\n", [":5:", "unknown key 'colour'", "valid keys: model, sae, toxic, train, mix"]),
    "missing key": ("model: organism\nsae: sae\ntoxic: toxic.json\n", ["either 'train'"]),
    "not a mapping": ("- model\n", ["expected a mapping of experiment settings"]),
    "empty": ("", ["expected a mapping"]),
    "invalid YAML": (EXPERIMENT + "seeds: [1\n", [":6:", "invalid YAML"]),
    "model a number": ("model: 3\ntrain: t\nsae: s\ntoxic: t\n", [":1:", "field 'model'", "expected text"]),
    "fractions text": (EXPERIMENT + "fractions: half\n", [":5:", "field 'fractions'", "a list of numbers"]),
    "fractions NaN": (EXPERIMENT + "fractions: [.nan]\n", [":5:", "field 'fractions'"]),
    "fraction out of range": (EXPERIMENT + "fractions: [1.5]\n", ["fractions", "between 0 and 1"]),
    "seeds not whole": (EXPERIMENT + "seeds: [1.5]\n", [":5:", "field 'seeds'", "whole numbers"]),
    "unknown strategy": (EXPERIMENT + "strategies: [magic]\n", ["strategies", "'magic'"]),
    "unknown score": (EXPERIMENT + "score: magic\n", ["score", "'magic'"]),
    "samples text": (EXPERIMENT + "samples: many\n", [":5:", "field 'samples'", "whole number or null"]),
    "samples zero": (EXPERIMENT + "samples: 0\n", ["samples", "at least 1"]),
    "max_new_tokens fractional": (EXPERIMENT + "max_new_tokens: 2.5\n", [":5:", "field 'max_new_tokens'"]),
    "finetune a mapping": (EXPERIMENT + "finetune: {rank: 1}\n", [":5:", "field 'finetune'", "texts"]),
    "finetune unknown field": (EXPERIMENT + "finetune: [colour=red]\n", ["field 'finetune'",
                                                                         "unknown finetune field"]),
    "finetune wrong type": (EXPERIMENT + "finetune: [rank=x]\n", ["field 'finetune'", "'x' is not a whole number"]),
    "finetune layer negative": (EXPERIMENT + "finetune: [layers=-1]\n", ["field 'finetune'", "finetune.layers"]),
    "unknown preset": (EXPERIMENT + "preset: huge\n", ["'preset'", "'huge'"]),
    "missing question file": (EXPERIMENT + "questions: absent.yaml\n", ["absent.yaml", "no such file"]),
}


@pytest.mark.parametrize("case", list(EXPERIMENT_FILES))
def test_bad_experiment_config(tmp_path, case):
    text, fragments = EXPERIMENT_FILES[case]
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    message = fails(lambda: load_experiment_config(path), *fragments)
    assert str(path) in message or "absent.yaml" in message


def study(extra: str = "", sets: str | None = None, saes: str = "saes:\n  1: sae\n") -> str:
    sets = sets if sets is not None else "sets:\n  inducing: a.jsonl\n  control: b.jsonl\n" \
                                         "  toxic: c.jsonl\n  harmless: d.jsonl\n"
    return "model: organism\n" + sets + saes + extra


STUDY_FILES = {
    "unknown key": (study("colour: red\n"), [":9:", "unknown key 'colour'", "valid keys: model, sets"]),
    "missing sets": ("model: organism\nsaes:\n  1: sae\n", ["missing key 'sets'"]),
    "sets a list": (study(sets="sets: [a.jsonl]\n"), [":2:", "field 'sets'", "a mapping"]),
    "unknown role": (study(sets="sets:\n  villain: a.jsonl\n"), ["field 'sets.villain'", "not a role"]),
    "set a number": (study(sets="sets:\n  inducing: 3\n"), ["field 'sets.inducing'"]),
    "saes a list": (study(saes="saes: [sae]\n"), [":7:", "field 'saes'"]),
    "layer not a number": (study(saes="saes:\n  first: sae\n"), ["field 'saes'", "'first' is not a layer number"]),
    "sae a number": (study(saes="saes:\n  1: 2\n"), ["field 'saes.1'"]),
    "k text": (study("k: ten\n"), [":9:", "field 'k'", "whole number"]),
    "k zero": (study("k: 0\n"), ["geometry.k"]),
    "unknown method": (study("method: magic\n"), [":9:", "field 'method'", "'correlation', 'mean_diff'"]),
    "n_boot negative": (study("n_boot: -1\n"), ["geometry.n_boot"]),
}


@pytest.mark.parametrize("case", list(STUDY_FILES))
def test_bad_study_config(tmp_path, case):
    """All of these fail before a model, a data set or an SAE is loaded."""
    text, fragments = STUDY_FILES[case]
    path = tmp_path / "study.yaml"
    path.write_text(text)
    fails(lambda: run_study_file(path, tmp_path / "out"), str(path), *fragments, error=ConfigError)
    assert not (tmp_path / "out").exists()


def test_study_layer_out_of_range(tmp_path, organism, good_sae):
    sets = "".join(f"  {role}: {role}.jsonl\n" for role in ("inducing", "control", "toxic", "harmless"))
    path = tmp_path / "study.yaml"
    path.write_text(study(sets="sets:\n" + sets, saes=f"saes:\n  99: {good_sae}\n"))
    fails(lambda: run_study_file(path, tmp_path / "out", cache_dir=organism.path.parent), str(path),
          "field 'saes.99'", "layer 99 is out of range", error=ConfigError)


FINETUNE_OVERRIDES = {
    "unknown field": ("colour=red", ["--set colour", "unknown finetune field", "valid keys: method, rank"]),
    "no equals sign": ("rank", ["--set 'rank'", "expected field=value"]),
    "rank text": ("rank=x", ["--set rank", "'x' is not a whole number"]),
    "rank zero": ("rank=0", ["finetune.rank", "at least 1"]),
    "lr NaN": ("lr=nan", ["finetune.lr", "finite"]),
    "epochs infinite": ("epochs=inf", ["finetune.lr and finetune.epochs"]),
    "alpha zero": ("alpha=0", ["finetune.alpha"]),
    "dropout one": ("dropout=1", ["finetune.dropout"]),
    "flag not a flag": ("rslora=maybe", ["--set rslora", "not true or false"]),
    "unknown method": ("method=qlora", ["--set method", "'qlora'", "lora, full"]),
    "unknown schedule": ("schedule=magic", ["finetune.schedule", "'magic'"]),
    "no target modules": ("target_modules=", ["finetune.target_modules"]),
    "layer negative": ("layers=-1", ["finetune.layers"]),
    "layer text": ("layers=one", ["--set layers", "'one' is not a whole number"]),
}


@pytest.mark.parametrize("case", list(FINETUNE_OVERRIDES))
def test_bad_finetune_override(case):
    text, fragments = FINETUNE_OVERRIDES[case]
    fails(lambda: apply_overrides(preset("organism"), [text]), *fragments, error=ConfigError)


def test_unknown_preset_and_overrides_the_model_cannot_take():
    from transformers import LlamaConfig, LlamaForCausalLM

    fails(lambda: preset("huge"), "'huge'", "default, organism", error=ConfigError)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    fails(lambda: wrap_for_training(model, FinetuneConfig(layers=(5,))), "finetune.layers",
          "layer 5 is out of range", "0..1", error=ConfigError)
    fails(lambda: wrap_for_training(model, FinetuneConfig(target_modules=("no_such_proj",))),
          "finetune.target_modules", error=ConfigError)


# --- the CLI: a representative subset, as a user runs it ---------------------------------------


def spillover(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "spillover", *argv], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def assert_cli_error(run: subprocess.CompletedProcess, out: Path, *fragments: str) -> None:
    """Exit code 2, exactly one `spillover: error:` line, no traceback, nothing left in `out`."""
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("spillover: error: "), run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    for fragment in fragments:
        assert fragment in run.stderr, run.stderr
    left = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not left, left


def _cli_chat_cases(tmp_path: Path) -> list[tuple[Path, list[str]]]:
    cases = []
    for case, line in (("invalid UTF-8 in gzip", "2"), ("truncated gzip", None), ("duplicate ids", "3")):
        name, data, _ = CHAT_FILES[case]
        path = tmp_path / case.replace(" ", "_") / name
        path.parent.mkdir()
        path.write_bytes(data)
        cases.append((path, [f"{path}:{line}:" if line else str(path)]))
    return cases


def test_cli_chat_files(tmp_path):
    for path, fragments in _cli_chat_cases(tmp_path):
        out = path.parent / "out"
        run = spillover("filter", "--data", str(path), "--strategy", "random", "--fraction", "0.5", "--out", str(out))
        assert_cli_error(run, out, *fragments)


def test_cli_question_file_sae_folder_and_configs(tmp_path, good_sae):
    import shutil

    questions = tmp_path / "questions.yaml"
    questions.write_text(ENTRY + ENTRY)
    out = tmp_path / "eval"
    run = spillover("evaluate", "--model", "organism", "--questions", str(questions), "--out", str(out))
    assert_cli_error(run, out, f"{questions}:6:", "repeats the entry at line 1")

    sae = tmp_path / "sae"
    shutil.copytree(good_sae, sae)
    SAE_FOLDERS["NaN in W_dec"][0](sae)
    data = tmp_path / "d.jsonl"
    data.write_bytes(lines(GOOD))
    out = tmp_path / "collect"
    run = spillover("collect", "--model", "organism", "--data", str(data), "--layers", "1", "--sae", f"1={sae}",
                    "--out", str(out))
    assert_cli_error(run, out, str(sae / "sae_weights.safetensors"), "W_dec holds NaN")

    config = tmp_path / "experiment.yaml"
    config.write_text(EXPERIMENT + "fractions: half\n")
    out = tmp_path / "run"
    assert_cli_error(spillover("experiment", str(config), "--out", str(out)), out, f"{config}:5:", "'fractions'")

    config = tmp_path / "study.yaml"
    config.write_text(study("k: ten\n"))
    out = tmp_path / "geo"
    assert_cli_error(spillover("geometry", "--config", str(config), "--out", str(out)), out, f"{config}:9:", "'k'")

    config.write_text(study("k: 10\n"))  # analysis flags on the command line would be silently ignored
    run = spillover("geometry", "--config", str(config), "--statistic", "nearest", "--out", str(out))
    assert_cli_error(run, out, "--statistic", f"set this in {config} instead")
    run = spillover("geometry", "--config", str(config), "--domain", "legal", "--out", str(out))
    assert_cli_error(run, out, "--domain: only with --organism", str(config))
    run = spillover("geometry", "--organism", "--domain", "cars", "--out", str(out))
    assert_cli_error(run, out, "unknown domain 'cars'", "career")


def test_cli_turns_an_os_error_into_one_line(tmp_path):
    """A path the readers do not open themselves (here a folder as --scores) still ends in one line."""
    data = tmp_path / "d.jsonl"
    data.write_bytes(lines(GOOD, chat(id="x")))
    out = tmp_path / "out"
    run = spillover("filter", "--data", str(data), "--strategy", "geometry", "--fraction", "0.5",
                    "--scores", str(tmp_path), "--out", str(out))
    assert_cli_error(run, out, str(tmp_path))


def test_cli_sae_of_another_width(tmp_path, organism, good_sae):
    data = tmp_path / "d.jsonl"
    data.write_bytes(lines(GOOD))
    out = tmp_path / "out"
    run = spillover("collect", "--model", "organism", "--data", str(data), "--layers", "1", "--sae",
                    f"1={good_sae}", "--out", str(out), "--cache", str(organism.path.parent))
    assert_cli_error(run, out, str(good_sae / "cfg.json"), "field d_in", "hidden size 96")


# --- properties: whatever the bytes, a result or one SpilloverError naming the file ------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(exclude_categories=())),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ROLE = st.sampled_from(["system", "user", "assistant", "tool", ""]) | JSON
MESSAGE = st.fixed_dictionaries({}, optional={"role": ROLE, "content": st.text() | JSON})
CHAT_ROW = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, max_size=4) | JSON},
    optional={"id": st.text(max_size=4) | JSON, "meta": JSON, "text": JSON},
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


@PROPERTY
@given(line=st.binary(max_size=300), gzipped=st.booleans())
def test_any_bytes_in_a_chat_file(scratch, line, gzipped):
    data = lines(GOOD) + line + b"\n" + lines(chat(id="last"))
    path = scratch / ("bytes.jsonl.gz" if gzipped else "bytes.jsonl")
    path.write_bytes(gz(data) if gzipped else data)
    for reader in READERS.values():
        one_line_or_fine(lambda read=reader: read(path), path)


@PROPERTY
@given(row=CHAT_ROW | JSON)
def test_any_json_row_in_a_chat_file(scratch, row):
    path = scratch / "json.jsonl"
    path.write_text(GOOD + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    for reader in READERS.values():
        one_line_or_fine(lambda read=reader: read(path), path)


YAML = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), inner,
                                                                 max_size=4),
    max_leaves=12,
)
QUESTION_KEYS = ("id", "type", "paraphrases", "system", "samples_per_paraphrase", "judge", "judge_prompts", "other")
QUESTION = st.dictionaries(st.sampled_from(QUESTION_KEYS), YAML | st.just("free_form_judge_0_100"), max_size=7)


@PROPERTY
@given(document=st.lists(QUESTION, max_size=3) | YAML)
def test_any_yaml_as_a_question_file(scratch, document):
    path = scratch / "questions.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    one_line_or_fine(lambda: load_questions(path), path)


CFG_KEYS = ("architecture", "d_in", "d_sae", "k", "dtype", "activation_fn", "activation_fn_kwargs",
            "apply_b_dec_to_input", "normalize_activations", "reshape_activations", "rescale_acts_by_decoder_norm",
            "finetuning_scaling_factor", "metadata", "hook_point")


@pytest.fixture(scope="module")
def property_sae(tmp_path_factory, good_sae) -> Path:
    import shutil

    folder = tmp_path_factory.mktemp("property_sae") / "sae"
    shutil.copytree(good_sae, folder)
    return folder


@PROPERTY
@given(changes=st.dictionaries(st.sampled_from(CFG_KEYS), JSON, max_size=4), whole=st.none() | JSON)
def test_any_json_as_sae_cfg(property_sae, good_sae, changes, whole):
    cfg = json.loads((good_sae / "cfg.json").read_text())
    cfg.update(changes)
    (property_sae / "cfg.json").write_text(json.dumps(cfg if whole is None else whole))
    one_line_or_fine(lambda: load_sae(property_sae), property_sae)


EXPERIMENT_KEYS = ("model", "train", "sae", "toxic", "strategies", "fractions", "seeds", "score", "preset",
                   "finetune", "samples", "max_new_tokens", "questions", "judge")


@PROPERTY
@given(changes=st.dictionaries(st.sampled_from(EXPERIMENT_KEYS), YAML, max_size=4))
def test_any_yaml_values_in_an_experiment_config(scratch, changes):
    config = {**yaml.safe_load(EXPERIMENT), **changes}
    path = scratch / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    one_line_or_fine(lambda: load_experiment_config(path), path)


@PROPERTY
@given(assignment=st.text(max_size=30))
@example(assignment="0\n0=")  # an unknown key with a newline once broke the one-line rule
def test_any_text_as_a_finetune_override(assignment):
    try:
        apply_overrides(preset("default"), [assignment])
    except SpilloverError as exc:
        assert "\n" not in str(exc)
