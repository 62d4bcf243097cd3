"""The streaming scoring path: same scores as pooling first, resumable chunks, and torchrun shards
that reproduce a single process byte for byte."""

import json
import os
import subprocess
import sys

import pytest
import torch

from spillover.activations import CollectConfig, collect, collect_tokens
from spillover.data import write_chat_jsonl
from spillover.features import FeatureSet
from spillover.organism.datasets import finetune_set
from spillover.sae import TopKTrainingConfig, save_sae, train_topk_sae
from spillover.score_stream import ScoreStream, StreamConfig, chunk_seconds
from spillover.scoring import ToxicReference, score_samples

LAYER = 1


@pytest.fixture(scope="module")
def scoring_inputs(organism, tmp_path_factory):
    """A small SAE at layer 1, a toxic feature set, and a mixed training file."""
    folder = tmp_path_factory.mktemp("score")
    samples = finetune_set(organism.world, "inducing", 40, 0) + finetune_set(organism.world, "aligned", 40, 1)
    tokens = collect_tokens(organism.model, organism.tokenizer, samples, LAYER)
    sae, _ = train_topk_sae(tokens, TopKTrainingConfig(d_sae=256, k=8, steps=60, batch_size=256))
    save_sae(sae, folder / "sae")
    toxic = FeatureSet("toxic", LAYER, "correlation", tuple(range(0, 256, 16)), (0.5,) * 16, (0.1,) * 16)
    toxic.save(folder / "toxic.json")
    write_chat_jsonl(folder / "train.jsonl", samples)
    return folder, samples, sae, toxic


@pytest.mark.parametrize("score", ["spillover", "toxic_activation", "hidden_cosine"])
def test_streamed_scores_equal_scores_of_pooled_activations(organism, scoring_inputs, score):
    _, samples, sae, toxic = scoring_inputs
    reference = ToxicReference(sae.W_dec.detach(), toxic.indices)
    pooled = collect(organism.model, organism.tokenizer, samples, CollectConfig(layers=(LAYER,)), {LAYER: sae})
    expected = score_samples(score, [s.id for s in samples], reference, pooled.feat_mean(LAYER),
                             pooled.resid_mean(LAYER))
    stream = ScoreStream(organism.model, organism.tokenizer, sae, LAYER, reference, score,
                         StreamConfig(chunk_size=16, token_budget=512))
    got = [s for chunk in stream.chunks(samples, range(5)) for s in stream.score_chunk(chunk)]
    assert [s.id for s in got] == [s.id for s in expected]
    assert torch.allclose(torch.tensor([s.score for s in got]), torch.tensor([s.score for s in expected]), atol=1e-5)


def test_topk_features_pooled_from_their_k_values_sum_as_dense_rows_do(organism, scoring_inputs):
    _, _, sae, toxic = scoring_inputs
    reference = ToxicReference(sae.W_dec.detach(), toxic.indices)
    stream = ScoreStream(organism.model, organism.tokenizer, sae, LAYER, reference, "spillover")
    select = torch.rand(6, 20, generator=torch.Generator().manual_seed(0)) < 0.4
    select[3] = False  # a sample with no selected token pools to zeros
    rows = torch.randn(int(select.sum()), sae.cfg.d_in, generator=torch.Generator().manual_seed(1))
    counts = select.sum(dim=1).clamp(min=1)
    dense = torch.zeros(6, sae.cfg.d_sae).index_add_(0, select.nonzero()[:, 0], sae.encode(rows).detach())
    assert torch.equal(stream._pooled_features(rows, select, counts), dense / counts.unsqueeze(-1))


def _score_argv(folder, out, *extra):
    return ["score", "--model", "organism", "--data", str(folder / "train.jsonl"), "--sae", str(folder / "sae"),
            "--toxic", str(folder / "toxic.json"), "--out", str(out), "--chunk-size", "16", *extra]


def test_a_rerun_rescores_only_missing_chunks(organism, scoring_inputs, tmp_path):
    from spillover.cli import main

    folder, *_ = scoring_inputs
    argv = _score_argv(folder, tmp_path / "s", "--cache", str(organism.path.parent))
    assert main(argv) == 0
    first = (tmp_path / "s" / "scores.jsonl").read_bytes()
    chunks = sorted((tmp_path / "s" / "chunks").glob("chunk-*.jsonl"))
    assert len(chunks) == 5
    chunks[2].unlink()
    stamps = {c: c.stat().st_mtime_ns for c in chunks if c != chunks[2]}
    assert main(argv) == 0
    assert (tmp_path / "s" / "scores.jsonl").read_bytes() == first
    assert {c: c.stat().st_mtime_ns for c in stamps} == stamps  # finished chunks were not redone


def test_chunk_timings_outlive_a_cut_off_run(organism, scoring_inputs, tmp_path):
    """What the experiment's scoring cost is built from: every chunk's seconds, whichever run scored it."""
    from spillover.cli import main
    from spillover.experiment import _reused_seconds

    folder, *_ = scoring_inputs
    out = tmp_path / "s"
    assert main(_score_argv(folder, out, "--cache", str(organism.path.parent))) == 0
    assert sorted(chunk_seconds(out)) == [0, 1, 2, 3, 4] and all(s > 0 for s in chunk_seconds(out).values())
    (out / "chunks" / "chunk-000003.jsonl").unlink()  # as if the run had been cut off there
    with (out / "chunks" / "seconds-rank0.jsonl").open("a") as timings:
        timings.write('{"chunk": 3, "seconds": 99.0}\n{"chunk": 9, "seco')  # a timing to be replaced; a torn line
    first = chunk_seconds(out)
    assert main(_score_argv(folder, out, "--cache", str(organism.path.parent))) == 0
    second = chunk_seconds(out)
    assert sorted(second) == [0, 1, 2, 3, 4]
    assert second[3] != 99.0
    assert _reused_seconds(first, second) == pytest.approx(sum(first.values()) - 99.0)


def test_torchrun_two_processes_write_the_same_bytes_as_one(organism, scoring_inputs, tmp_path):
    folder, *_ = scoring_inputs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cache = ("--cache", str(organism.path.parent))
    single = subprocess.run([sys.executable, "-m", "spillover", *_score_argv(folder, tmp_path / "one", *cache)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "spillover", *_score_argv(folder, tmp_path / "two", *cache)]
    both = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=300)
    assert both.returncode == 0, both.stderr[-2000:]
    one, two = (tmp_path / "one" / "scores.jsonl").read_bytes(), (tmp_path / "two" / "scores.jsonl").read_bytes()
    assert len(one.splitlines()) == 80 and one == two
    assert json.loads((tmp_path / "two" / "score.json").read_text())["n"] == 80


def test_a_score_costs_its_reference_activations_too(tmp_path):
    """The experiment's scoring cost counts the reference shards a score read, whichever run or
    strategy collected them; a shard collected again is counted once, at its new time."""
    from spillover.activations import SHARD_SECONDS
    from spillover.experiment import _reused_seconds, _timings

    scores, references = tmp_path / "scores", tmp_path / "references"
    (scores / "chunks").mkdir(parents=True)
    (scores / "chunks" / "seconds-rank0.jsonl").write_text('{"chunk": 0, "seconds": 1.0}\n')
    for name, seconds in (("toxic_ref", 2.0), ("harmless_ref", 3.0)):
        (references / name).mkdir(parents=True)
        (references / name / SHARD_SECONDS).write_text(json.dumps({"0": seconds}))
    before = _timings(scores, references)
    assert before == {("chunk", 0): 1.0, ("toxic_ref", 0): 2.0, ("harmless_ref", 0): 3.0}
    (references / "toxic_ref" / SHARD_SECONDS).write_text(json.dumps({"0": 2.5}))
    assert _reused_seconds(before, _timings(scores, references)) == 4.0
