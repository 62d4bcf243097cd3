import pytest
import torch

from spillover.activations import CollectConfig, collect, collect_tokens, length_batches
from spillover.data import encode_chats
from spillover.errors import ConfigError
from spillover.lm import decoder_blocks, residuals
from spillover.organism.datasets import finetune_set, reference_set


@pytest.fixture(scope="module")
def samples(organism):
    return finetune_set(organism.world, "inducing", 20, seed=0) + reference_set(organism.world, "harmless", 20, seed=0)


def test_layer_l_is_the_output_of_block_l(organism):
    (encoded,) = encode_chats(organism.tokenizer, [[{"role": "user", "content": "any tips"},
                                                     {"role": "assistant", "content": "use fresh food"}]])
    ids = torch.tensor([encoded.input_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = organism.model(ids, output_hidden_states=True).hidden_states
    got = residuals(organism.model, ids, mask, [0, 1])
    assert torch.allclose(got[0], hidden[1]) and torch.allclose(got[1], hidden[2])


def test_forward_stops_after_the_deepest_layer(organism):
    calls = []
    blocks = decoder_blocks(organism.model)
    handles = [b.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    try:
        residuals(organism.model, torch.tensor([[2, 5, 6]]), torch.ones(1, 3, dtype=torch.long), [0])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]


def test_pooled_mean_matches_a_plain_forward_on_assistant_tokens(organism, samples):
    pooled = collect(organism.model, organism.tokenizer, samples, CollectConfig(layers=(1,), token_budget=300))
    (encoded,) = encode_chats(organism.tokenizer, [samples[3].messages])
    with torch.no_grad():
        hidden = organism.model(torch.tensor([encoded.input_ids]), output_hidden_states=True).hidden_states[2][0]
    mask = torch.tensor(encoded.assistant_mask)
    assert torch.allclose(pooled.resid_mean(1)[3], hidden[mask].mean(0), atol=1e-5)
    assert torch.allclose(pooled.tensors["resid_max.1"][3], hidden[mask].amax(0), atol=1e-5)
    assert pooled.tensors["n_tokens"][3] == mask.sum()
    assert pooled.ids == tuple(s.id for s in samples)


def test_results_do_not_depend_on_batching(organism, samples):
    small = collect(organism.model, organism.tokenizer, samples, CollectConfig(layers=(0, 2), token_budget=64))
    large = collect(organism.model, organism.tokenizer, samples, CollectConfig(layers=(0, 2), token_budget=10_000))
    for key in small.tensors:
        assert torch.allclose(small.tensors[key], large.tensors[key], atol=1e-5), key


def test_length_batches_respect_the_budget():
    lengths = [5, 50, 7, 48, 6, 49]
    batches = length_batches(lengths, token_budget=100)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(max(lengths[i] for i in b) * len(b) <= 100 for b in batches)


def test_shards_are_reused_and_a_partial_run_resumes(organism, samples, tmp_path, monkeypatch):
    config = CollectConfig(layers=(1,), shard_size=16)
    first = collect(organism.model, organism.tokenizer, samples, config, out_dir=tmp_path)
    (tmp_path / "shard-00001.safetensors").unlink()  # as if the run had been cut off there
    import spillover.activations as activations

    computed = []
    real = activations._collect_shard
    monkeypatch.setattr(activations, "_collect_shard", lambda *a, **k: computed.append(1) or real(*a, **k))
    again = collect(organism.model, organism.tokenizer, samples, config, out_dir=tmp_path)
    assert len(computed) == 1
    assert torch.equal(first.resid_mean(1), again.resid_mean(1))


def test_all_tokens_and_token_level_dump(organism, samples):
    pooled = collect(organism.model, organism.tokenizer, samples[:4], CollectConfig(layers=(0,), tokens="all"))
    lengths = [len(e.input_ids) for e in encode_chats(organism.tokenizer, [s.messages for s in samples[:4]])]
    assert pooled.tensors["n_tokens"].tolist() == lengths
    tokens = collect_tokens(organism.model, organism.tokenizer, samples[:4], layer=0)
    assert tokens.shape == (sum(lengths), organism.model.config.hidden_size)


def test_bad_layers_are_refused(organism, samples):
    with pytest.raises(ConfigError, match="out of range"):
        collect(organism.model, organism.tokenizer, samples, CollectConfig(layers=(7,)))
    with pytest.raises(ConfigError, match="collect.tokens"):
        CollectConfig(layers=(0,), tokens="user")


def test_pooled_sae_features_match_encoding_every_token(organism, samples):
    from spillover.sae import SaeConfig, SparseAutoencoder

    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=organism.model.config.hidden_size, d_sae=64, architecture="topk", k=4))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    pooled = collect(organism.model, organism.tokenizer, samples[:6], CollectConfig(layers=(1,)), {1: sae})
    (encoded,) = encode_chats(organism.tokenizer, [samples[2].messages])
    with torch.no_grad():
        hidden = organism.model(torch.tensor([encoded.input_ids]), output_hidden_states=True).hidden_states[2][0]
        features = sae.encode(hidden[torch.tensor(encoded.assistant_mask)])
    assert torch.allclose(pooled.feat_mean(1)[2], features.mean(0), atol=1e-5)
    assert torch.allclose(pooled.feat_max(1)[2], features.amax(0), atol=1e-5)


def test_streaming_collection_holds_nothing_and_reads_back(organism, samples, tmp_path):
    from spillover.activations import load_pooled

    kept = collect(organism.model, organism.tokenizer, samples, CollectConfig(layers=(0,), shard_size=16))
    streamed = collect(organism.model, organism.tokenizer, samples, CollectConfig(layers=(0,), shard_size=16),
                       out_dir=tmp_path, keep=False)
    assert streamed.tensors == {}
    back = load_pooled(tmp_path)
    assert back.ids == kept.ids and torch.equal(back.resid_mean(0), kept.resid_mean(0))


def test_shard_timings_survive_a_resumed_collection(organism, samples, tmp_path):
    """The cost of a collection outlives the run that paid it: a rerun keeps the finished shards'
    seconds, times only what it collects again, and other inputs start the timings afresh."""
    from spillover.activations import shard_seconds

    config = CollectConfig(layers=(0,), shard_size=16)
    assert shard_seconds(tmp_path) == {}
    collect(organism.model, organism.tokenizer, samples, config, out_dir=tmp_path)
    first = shard_seconds(tmp_path)
    assert sorted(first) == [0, 1, 2] and all(s > 0 for s in first.values())
    (tmp_path / "shard-00001.safetensors").unlink()  # as if cut off before this shard was written
    collect(organism.model, organism.tokenizer, samples, config, out_dir=tmp_path)
    second = shard_seconds(tmp_path)
    assert second[0] == first[0] and second[2] == first[2] and second[1] != first[1]
    collect(organism.model, organism.tokenizer, samples[:16], config, out_dir=tmp_path)
    assert sorted(shard_seconds(tmp_path)) == [0]
