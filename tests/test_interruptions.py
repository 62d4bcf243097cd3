"""SIGKILL at a random point, then the same command again: the result equals an uninterrupted
run's byte for byte, and work finished before the kill is not done again.

Each test runs the real command as a child process, waits until it has finished some work (a
shard, a checkpoint, a batch, a stage), kills it a seeded random moment later, reruns the same
command, and compares with a run that was never cut. The reference and the rerun run in this
process (one thread, as the child), which saves a process start each.
"""

from __future__ import annotations

import json
import logging
import random
import time

import pytest
from kill_helpers import child_env, kill_at_random_point, stamps, start, temp_files, tree

from spillover.activations import SHARD_SECONDS
from spillover.cli import main
from spillover.data import write_chat_jsonl
from spillover.organism.datasets import finetune_set

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 8
"""Seeds the kill delays; change it to land the kills elsewhere."""


@pytest.fixture
def env(organism):
    return child_env(organism.path.parent.parent)


@pytest.fixture
def rng(request) -> random.Random:
    return random.Random(f"{SEED}/{request.node.name}")


def resumed(caplog, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


def test_collect(organism, env, rng, tmp_path, caplog):
    """Two shards (4096 + 1200 samples); the kill lands after shard 0 is recorded, within 5% of the
    time the uninterrupted run took (shard 1 is about a fifth of the work), so it lands before the
    end on an idle machine and on a busy one alike."""
    data = write_chat_jsonl(tmp_path / "d.jsonl", finetune_set(organism.world, "inducing", 5296, seed=0))
    argv = ["collect", "--model", "organism", "--data", str(data), "--layers", "0"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    started = time.perf_counter()
    assert main([*argv, "--out", str(whole)]) == 0
    spread = 0.05 * (time.perf_counter() - started)

    child = start([*argv, "--out", str(cut)], env, tmp_path / "logs")
    manifest = cut / "activations.json"
    kill_at_random_point(child, lambda: manifest.exists() and json.loads(manifest.read_text())["shards_done"],
                         rng, spread=spread)
    assert not (cut / "ids.json").exists()  # cut before the end
    first = stamps(cut, "shard-00000.safetensors")

    caplog.set_level(logging.INFO, logger="spillover")
    assert main([*argv, "--out", str(cut)]) == 0
    assert resumed(caplog, "1 of 2 shards already collected; resuming")
    assert stamps(cut, "shard-00000.safetensors") == first  # not collected again
    def timings(path):  # what each run took differs
        return path.name == SHARD_SECONDS

    assert tree(cut, timings) == tree(whole, timings) and temp_files(cut) == []


def test_sae_training(organism, env, rng, tmp_path):
    """600 steps with a checkpoint every 25; the kill lands after the first checkpoint, within the
    first half of the training time the uninterrupted run took (see test_finetune)."""
    data = write_chat_jsonl(tmp_path / "d.jsonl", finetune_set(organism.world, "aligned", 300, seed=0))
    argv = ["--model", "organism", "--data", str(data), "--layer", "1", "--d-sae", "256", "--k", "8",
            "--steps", "600", "--batch-size", "256", "--checkpoint-every", "25"]
    from spillover.sae_training import CHECKPOINT_FILE, checkpoint_folder
    from spillover.sae_training import main as train

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train([*argv, "--out", str(whole)]) == 0
    training_seconds = json.loads((whole / "training.json").read_text())["seconds"]

    child = start([*argv, "--out", str(cut)], env, tmp_path / "logs", module="spillover.sae_training")
    checkpoint = checkpoint_folder(cut) / CHECKPOINT_FILE
    kill_at_random_point(child, checkpoint.exists, rng, spread=training_seconds / 2)
    assert not (cut / "training.json").exists()

    assert train([*argv, "--out", str(cut)]) == 0
    report = json.loads((cut / "training.json").read_text())
    assert 25 <= report["resumed_from"] < 600 and report["resumed_from"] % 25 == 0  # not trained again
    for name in ("sae_weights.safetensors", "cfg.json"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name
    assert not checkpoint_folder(cut).exists() and temp_files(tmp_path) == []


def test_finetune(organism, env, rng, tmp_path):
    """32 optimizer steps with a checkpoint every 2; the kill lands after the first checkpoint, within
    the first half of the training time the uninterrupted run took (under a second on an idle machine,
    several on a busy one, so a fixed delay would overshoot on one or never reach far on the other)."""
    data = write_chat_jsonl(tmp_path / "d.jsonl", finetune_set(organism.world, "inducing", 128, seed=0))
    argv = ["finetune", "--model", "organism", "--data", str(data), "--preset", "organism", "--set", "epochs=4",
            "--checkpoint-every", "2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*argv, "--out", str(whole)]) == 0
    training_seconds = json.loads((whole / "finetune.json").read_text())["seconds"]

    child = start([*argv, "--out", str(cut)], env, tmp_path / "logs")
    kill_at_random_point(child, (cut / "checkpoint" / "state.safetensors").exists, rng, spread=training_seconds / 2)
    assert not (cut / "finetune.json").exists()

    assert main([*argv, "--out", str(cut)]) == 0
    manifest, reference = (json.loads((d / "finetune.json").read_text()) for d in (cut, whole))
    assert 2 <= manifest["resumed_from"] < 32  # steps up to the checkpoint are not trained again
    for varies in ("seconds", "resumed_from"):
        manifest.pop(varies), reference.pop(varies)
    assert manifest == reference
    assert tree(cut / "adapter") == tree(whole / "adapter")
    assert not (cut / "checkpoint").exists() and temp_files(cut) == []


EVALUATE = ["evaluate", "--model", "organism", "--questions", "organism", "--judge", "organism", "--samples", "1",
            "--batch-size", "8", "--max-new-tokens", "24", "--seed", "5"]
"""132 held-out questions, one answer each, in 17 batches."""


def test_evaluate(env, rng, tmp_path, caplog):
    """The kill lands after at least two batches are on disk, possibly mid-append, within a quarter
    of the time the uninterrupted run took (15 of its 17 batches are still to come)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    started = time.perf_counter()
    assert main([*EVALUATE, "--out", str(whole)]) == 0
    spread = 0.25 * (time.perf_counter() - started)

    child = start([*EVALUATE, "--out", str(cut)], env, tmp_path / "logs")
    answers = cut / "answers.jsonl"
    kill_at_random_point(child, lambda: answers.exists() and answers.read_bytes().count(b"\n") >= 16, rng,
                         spread=spread)
    assert not (cut / "summary.json").exists()
    kept = answers.read_bytes().count(b"\n") // 8  # whole batches on disk at the kill

    caplog.set_level(logging.INFO, logger="spillover")
    assert main([*EVALUATE, "--out", str(cut)]) == 0
    assert resumed(caplog, f"{kept} of 17 batches already answered; resuming")  # not sampled again
    assert tree(cut) == tree(whole) and temp_files(cut) == []


def test_experiment(organism, env, rng, tmp_path):
    """Strategies none and random, one seed: two filter / fine-tune / evaluate runs. The kill lands
    after the first run's fine-tuning finished, in its evaluation or in the second run, within a
    quarter of the time the uninterrupted experiment took."""
    data = write_chat_jsonl(tmp_path / "train.jsonl", finetune_set(organism.world, "inducing", 48, seed=0))
    config = tmp_path / "experiment.yaml"
    config.write_text(f"model: organism\ntrain: {data}\nsae: unused\ntoxic: unused\nquestions: organism\n"
                      "judge: organism\nstrategies: [random]\nfractions: [0.5]\nseeds: [0]\npreset: organism\n"
                      "samples: 1\nmax_new_tokens: 16\n")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    started = time.perf_counter()
    assert main(["experiment", str(config), "--out", str(whole)]) == 0
    spread = 0.25 * (time.perf_counter() - started)

    child = start(["experiment", str(config), "--out", str(cut)], env, tmp_path / "logs")
    first = cut / "runs" / "none-0.00-seed0"
    kill_at_random_point(child, (first / "finetune" / "finetune.json").exists, rng, spread=spread)
    assert not (cut / "summary.json").exists()
    finished = stamps(first / "finetune")

    assert main(["experiment", str(config), "--out", str(cut)]) == 0
    assert stamps(first / "finetune") == finished  # the finished fine-tuning is reused, not redone
    assert (cut / "summary.json").read_bytes() == (whole / "summary.json").read_bytes()
    for run in ("none-0.00-seed0", "random-0.50-seed0"):
        for name in ("data/kept.jsonl", "finetune/adapter/adapter_model.safetensors", "evaluate/answers.jsonl"):
            assert (cut / "runs" / run / name).read_bytes() == (whole / "runs" / run / name).read_bytes(), name
        summaries = [json.loads((d / "runs" / run / "evaluate" / "summary.json").read_text()) for d in (cut, whole)]
        assert [s.pop("adapter") for s in summaries] == [str(d / "runs" / run / "finetune") for d in (cut, whole)]
        assert summaries[0] == summaries[1]
    assert temp_files(cut) == []
