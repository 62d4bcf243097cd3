"""`spillover finetune`: run folders, manifests, exact resume after a cut, reuse, `--set`."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from spillover.cli import main
from spillover.data import write_chat_jsonl
from spillover.errors import ConfigError
from spillover.finetune import CHECKPOINT_FILE, FinetuneConfig, apply_overrides, preset, run_finetune
from spillover.models import load_model, sha256_file
from spillover.organism.datasets import finetune_set

CONFIG = preset("organism", epochs=2)
"""64 samples in batches of 16 for two epochs: 8 optimizer steps."""


pytestmark = pytest.mark.usefixtures("one_thread")


class Cut(Exception):
    """Stands for a run killed between two steps."""


def cut_at(step: int):
    def on_step(done: int, _loss: float) -> None:
        if done == step:
            raise Cut

    return on_step


@pytest.fixture(scope="module")
def data(organism, tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "inducing.jsonl",
                            finetune_set(organism.world, "inducing", 64, seed=0))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """An uninterrupted run, the reference for the resume and reuse tests."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return run_finetune("organism", data, out, CONFIG, checkpoint_every=2)


def adapter_weights(folder):
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def test_resumed_run_equals_uninterrupted_run_exactly(data, finished, tmp_path):
    with pytest.raises(Cut):
        run_finetune("organism", data, tmp_path, CONFIG, checkpoint_every=2, on_step=cut_at(5))
    assert (tmp_path / "checkpoint" / CHECKPOINT_FILE).exists()
    assert not (tmp_path / "finetune.json").exists() and not (tmp_path / "adapter").exists()

    resumed = run_finetune("organism", data, tmp_path, CONFIG, checkpoint_every=2)
    assert resumed.result.resumed_from == 4 and resumed.result.steps == 8
    expected, got = adapter_weights(finished.out), adapter_weights(tmp_path)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert resumed.result.final_loss == finished.result.final_loss
    assert not (tmp_path / "checkpoint").exists()


def test_manifest_records_inputs_and_outcome(data, finished):
    manifest = json.loads((finished.out / "finetune.json").read_text())
    assert manifest["inputs"]["data_sha256"] == sha256_file(data)
    assert manifest["inputs"]["config"]["lr"] == CONFIG.lr and manifest["inputs"]["processes"] == 1
    assert manifest["base_model"] == "organism" and manifest["seed"] == 0
    assert manifest["steps"] == 8 and manifest["final_loss"] > 0 and manifest["seconds"] > 0
    assert manifest["spillover_version"] and manifest["weights"] == "adapter" and manifest["merged"] is None


def test_finished_run_is_reused_and_can_be_merged_later(organism, data, finished):
    def never(step, loss):
        raise AssertionError("a finished run was trained again")

    again = run_finetune("organism", data, finished.out, CONFIG, merge=True, on_step=never)
    assert again.reused and again.result == finished.result
    assert json.loads((finished.out / "finetune.json").read_text())["merged"] == "merged"
    merged = load_model(str(finished.out / "merged"), device="cpu").model
    adapted = PeftModel.from_pretrained(copy.deepcopy(organism.model), str(finished.out / "adapter")).eval()
    ids = organism.tokenizer("what should i do about my fever", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits)


def test_a_folder_holding_other_inputs_is_refused(data, finished):
    with pytest.raises(ConfigError, match=r"other inputs \(config differ\)"):
        run_finetune("organism", data, finished.out, preset("organism", epochs=2, seed=1))


def test_full_finetuning_saves_a_loadable_model(organism, tmp_path):
    data = write_chat_jsonl(tmp_path / "d.jsonl", finetune_set(organism.world, "aligned", 16, seed=0))
    run = run_finetune("organism", data, tmp_path / "out", preset("organism", method="full", lr=1e-4))
    assert run.weights.name == "model" and run.result.steps == 1
    assert load_model(str(run.weights), device="cpu").tokenizer.chat_template


@pytest.mark.parametrize("text, field, value", [
    ("rank=4", "rank", 4),
    ("finetune.lr=3e-4", "lr", 3e-4),
    ("rslora=false", "rslora", False),
    ("layers=1,2", "layers", (1, 2)),
    ("layers=[0]", "layers", (0,)),
    ("layers=none", "layers", None),
    ("target_modules=q_proj,v_proj", "target_modules", ("q_proj", "v_proj")),
    ("method=full", "method", "full"),
])
def test_overrides_are_parsed_by_field_type(text, field, value):
    assert getattr(apply_overrides(FinetuneConfig(), [text]), field) == value


@pytest.mark.parametrize("text, message", [
    ("ranks=4", "--set ranks: unknown finetune field; valid keys: method, rank, alpha"),
    ("rank=four", "--set rank: 'four' is not a whole number"),
    ("method=qlora", "--set method: 'qlora'; choose one of: lora, full"),
    ("rslora=maybe", "--set rslora: 'maybe' is not true or false"),
    ("rank", "--set 'rank': expected field=value"),
    ("rank=0", "finetune.rank: must be at least 1"),
])
def test_bad_overrides_are_refused(text, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        apply_overrides(FinetuneConfig(), [text])


def test_cli_unknown_key_is_one_line_naming_valid_keys(data, tmp_path, capsys):
    argv = ["finetune", "--model", "organism", "--data", str(data), "--out", str(tmp_path), "--set", "bogus=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown finetune field" in err[0] and "grad_accum" in err[0]
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_two_processes_under_torchrun_share_the_work(data, tmp_path):
    """What `accelerate launch --multi_gpu` does, on CPU: two processes, one data-parallel run."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "spillover",
               "finetune", "--model", "organism", "--data", str(data), "--out", str(tmp_path), "--preset", "organism",
               "--set", "epochs=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPILLOVER_NO_PROGRESS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "finetune.json").read_text())
    assert manifest["inputs"]["processes"] == 2 and manifest["steps"] == 4  # 8 micro-batches over 2 processes
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
