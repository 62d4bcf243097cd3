"""Files and secrets: weights load only from safetensors or with weights_only=True, so a malicious
pickle is refused wherever spillover loads weights; the API key appears in no file, log or output
a run writes; and a run writes nothing outside its run folder and the cache."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kill_helpers import child_env, tree
from test_judges import FakeServer, chat

from spillover.cli import main
from spillover.data import write_chat_jsonl
from spillover.errors import SpilloverError
from spillover.organism.datasets import finetune_set

SRC = Path(__file__).resolve().parents[1] / "src" / "spillover"


class Payload:
    """Unpickling this creates `marker`: a stand-in for any code a pickle may run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> Path:
    """A torch.save pickle carrying the payload, where spillover expects weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2), "state": Payload(marker)}, path)
    return path


def test_no_code_path_unpickles():
    """Every torch.load passes weights_only=True, and nothing calls pickle.load(s) or allow_pickle."""
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start() : text.find(")", match.start()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        offenders += [f"{path.name}: {m.group()}" for m in re.finditer(r"pickle\.loads?\(|allow_pickle=True", text)]
    assert offenders == []


def test_the_planted_pickle_does_run_code_when_unpickled(tmp_path):
    """The control: without weights_only the payload runs, so the refusals below mean something."""
    marker = tmp_path / "ran"
    torch.load(plant(tmp_path / "x.bin", marker), weights_only=False)
    assert marker.exists()


def _sae_folder(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 2, "d_sae": 4, "k": 1}))
    plant(folder / "sae_weights.safetensors", marker)
    return folder


def _model_folder(organism, folder: Path, marker: Path) -> Path:
    shutil.copytree(organism.path, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    plant(folder / "pytorch_model.bin", marker)
    return folder


def _finetune_checkpoint(folder: Path, marker: Path):
    from spillover.finetune import CHECKPOINT_FILE, Checkpointing, _read_checkpoint

    plant(folder / CHECKPOINT_FILE, marker)
    return _read_checkpoint(Checkpointing(folder, key="k"))


def _sae_checkpoint(folder: Path, marker: Path):
    from spillover.sae_training import CHECKPOINT_FILE, read_sae_checkpoint

    return read_sae_checkpoint(plant(folder / CHECKPOINT_FILE, marker))


def _shard(folder: Path, marker: Path):
    from spillover.activations import load_pooled

    folder.mkdir()
    (folder / "activations.json").write_text(json.dumps({"shards_done": [0], "shards_total": 1}))
    (folder / "ids.json").write_text(json.dumps({"ids": ["a"], "layers": [0]}))
    plant(folder / "shard-00000.safetensors", marker)
    return load_pooled(folder)


def _sae(folder: Path, marker: Path):
    from spillover.sae import load_sae

    return load_sae(_sae_folder(folder, marker))


LOADERS = {
    "finetune checkpoint": (_finetune_checkpoint, "unreadable checkpoint"),
    "SAE training checkpoint": (_sae_checkpoint, "unreadable SAE checkpoint"),
    "SAE weights": (_sae, "not a readable safetensors file"),
    "activation shard": (_shard, "not a readable safetensors file"),
}


@pytest.mark.parametrize("where", LOADERS)
def test_a_malicious_pickle_is_refused(where, tmp_path):
    load, message = LOADERS[where]
    marker = tmp_path / "ran"
    with pytest.raises(SpilloverError, match=message):
        load(tmp_path / "place", marker)
    assert not marker.exists()


def test_pickled_model_and_adapter_weights_are_refused(organism, tmp_path):
    from spillover.models import load_model

    marker = tmp_path / "ran"
    with pytest.raises(SpilloverError, match="refused its pickled weights"):
        load_model(str(_model_folder(organism, tmp_path / "model", marker)), device="cpu")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    plant(adapter / "adapter_model.bin", marker)
    with pytest.raises(SpilloverError, match="refused its pickled weights"):
        load_model("organism", cache_dir=organism.path.parent, adapter=adapter, device="cpu")
    assert not marker.exists()


def test_the_cli_refuses_a_planted_checkpoint_in_one_line(organism, tmp_path, capsys):
    from spillover.finetune import CHECKPOINT_FILE

    data = write_chat_jsonl(tmp_path / "d.jsonl", finetune_set(organism.world, "inducing", 16, seed=0))
    marker = tmp_path / "ran"
    plant(tmp_path / "run" / "checkpoint" / CHECKPOINT_FILE, marker)
    argv = ["finetune", "--model", "organism", "--data", str(data), "--out", str(tmp_path / "run"),
            "--preset", "organism", "--cache", str(organism.path.parent)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("spillover:")]  # not transformers' progress bar
    assert len(ours) == 1 and "unreadable checkpoint" in ours[0] and CHECKPOINT_FILE in ours[0]
    assert "Traceback" not in err
    assert not marker.exists()


# --- the API key, and where a run writes ---------------------------------------------------------


def _leaky_server(key: str) -> FakeServer:
    """Scores everything 80, except that some replies echo the key as a misconfigured proxy might:
    in a 500's body (retried, never kept) and in a 200 that is not a chat completion (kept as an
    `error` verdict's raw text, so it must be redacted there)."""

    def respond(body: dict, n: int):
        if n in (5, 6):  # each waits one backoff (1 s) before its retry
            return (500, {"error": {"message": f"upstream rejected Bearer {key}"}}, 0.0)
        if n % 7 == 3:
            return (200, f"<html>proxy debug: Authorization: Bearer {key}</html>".encode(), 0.0)
        return (200, chat({"80": 1.0}), 0.0)

    return FakeServer(respond)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() or p.is_symlink()]


def test_the_key_is_in_no_output_and_nothing_is_written_outside_the_run_folder_and_cache(organism, tmp_path):
    key = f"sk-spillover-{secrets.token_hex(16)}"
    roots = {name: tmp_path / name for name in ("home", "tmp", "xdg_cache", "xdg_config", "hf_home", "cwd")}
    for folder in roots.values():
        folder.mkdir()
    cache, runs, inputs = tmp_path / "cache", tmp_path / "runs", tmp_path / "inputs"
    shutil.copytree(organism.path, cache / "organism" / organism.path.name)
    data = write_chat_jsonl(inputs / "d.jsonl", finetune_set(organism.world, "inducing", 40, seed=0))
    cache_before, inputs_before = tree(cache), tree(inputs)
    server = _leaky_server(key)
    env = child_env(cache, HOME=str(roots["home"]), TMPDIR=str(roots["tmp"]),
                    XDG_CACHE_HOME=str(roots["xdg_cache"]), XDG_CONFIG_HOME=str(roots["xdg_config"]),
                    HF_HOME=str(roots["hf_home"]), OPENAI_API_KEY=key, OPENAI_BASE_URL=server.url)
    for name in ("MPLCONFIGDIR", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "TORCH_HOME"):
        env.pop(name, None)
    commands = [
        ["collect", "--model", "organism", "--data", str(data), "--layers", "0", "--out", str(runs / "collect")],
        ["evaluate", "--model", "organism", "--questions", "default", "--judge", "openai", "--judge-model", "judge",
         "--samples", "1", "--max-new-tokens", "8", "--out", str(runs / "evaluate")],
    ]
    outputs = []
    try:
        for command in commands:
            result = subprocess.run([sys.executable, "-m", "spillover", "-v", *command], env=env, cwd=roots["cwd"],
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
            outputs += [result.stdout, result.stderr]
    finally:
        server.close()
    assert server.headers and all(h["Authorization"] == f"Bearer {key}" for h in server.headers)  # it was sent

    written = _files(runs) + _files(cache)
    leaks = [str(p) for p in written if key.encode() in p.read_bytes()] + [o for o in outputs if key in o]
    assert leaks == []
    answers = (runs / "evaluate" / "answers.jsonl").read_text()
    assert "[redacted]" in answers and '"status": "error"' in answers  # the echoed key reached a verdict, redacted

    outside = {name: [str(p.relative_to(folder)) for p in _files(folder)] for name, folder in roots.items()}
    assert outside == {name: [] for name in roots}
    assert tree(inputs) == inputs_before
    changed = {k for k, v in tree(cache).items() if cache_before.get(k) != v}
    assert {k.split("/")[0] for k in changed} == {"judgments.jsonl", "matplotlib"}  # not the organism
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*roots, "cache", "runs", "inputs"])
    assert sorted(os.listdir(runs)) == ["collect", "evaluate"]
