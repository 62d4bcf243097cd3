"""A full disk while writing shards: one line naming the file, no traceback, nothing half-written,
and what the folder held before still loads. (The judge's HTTP faults are in test_judges.py.)

The disk fills for real, without root: the child runs under RLIMIT_FSIZE with SIGXFSZ ignored,
so its first write past the limit fails with EFBIG, as a write to a full disk fails with ENOSPC.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys

import pytest
import torch
from kill_helpers import child_env, temp_files, tree

from spillover.activations import load_pooled
from spillover.cli import main
from spillover.data import write_chat_jsonl
from spillover.organism.datasets import finetune_set

pytestmark = pytest.mark.usefixtures("one_thread")

LIMIT = 64 * 1024
"""Bytes a child may write to one file: the manifests fit, a 200-sample shard (about 150 kB) does not."""


def _small_disk() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_a_full_disk_while_writing_a_shard_fails_cleanly_and_keeps_the_previous_results(organism, tmp_path):
    data = write_chat_jsonl(tmp_path / "d.jsonl", finetune_set(organism.world, "inducing", 200, seed=0))
    folder = tmp_path / "activations"
    argv = ["collect", "--model", "organism", "--data", str(data), "--out", str(folder)]
    assert main([*argv, "--layers", "0"]) == 0  # the previous results
    before, previous = tree(folder), load_pooled(folder)

    command = [sys.executable, "-m", "spillover", *argv, "--layers", "1"]  # other inputs: collects afresh
    result = subprocess.run(command, env=child_env(organism.path.parent.parent), preexec_fn=_small_disk,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"spillover: error: {folder / 'shard-00000.safetensors'}: cannot write it (File too large)")
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert tree(folder) == before and temp_files(folder) == []  # no half shard, no temp file, manifest as it was
    again = load_pooled(folder)
    assert again.ids == previous.ids and again.layers == (0,)
    assert all(torch.equal(again.tensors[k], previous.tensors[k]) for k in previous.tensors)

    assert main([*argv, "--layers", "1"]) == 0  # with room again, the same command succeeds
    assert load_pooled(folder).layers == (1,)
