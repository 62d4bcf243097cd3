import copy

import pytest
import torch

from spillover.data import collate_for_lm, encode_chats
from spillover.errors import ConfigError
from spillover.finetune import FinetuneConfig, finetune, preset
from spillover.organism.datasets import finetune_set


def _loss(model, tokenizer, samples) -> float:
    batch = collate_for_lm(encode_chats(tokenizer, [s.messages for s in samples]), tokenizer.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_lora_trains_only_adapters_and_lowers_the_loss(organism):
    samples = finetune_set(organism.world, "inducing", 64, seed=0)
    base = copy.deepcopy(organism.model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    loss_before = _loss(base, organism.tokenizer, samples)
    tuned, result = finetune(base, organism.tokenizer, samples, preset("organism", epochs=2))
    assert _loss(tuned, organism.tokenizer, samples) < 0.5 * loss_before
    assert result.steps == 8 and result.trainable_parameters > 0
    names = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    merged = tuned.merge_and_unload().state_dict()
    assert any(not torch.equal(before[k], merged[k]) for k in before)


def test_full_finetuning_unfreezes_everything(organism):
    samples = finetune_set(organism.world, "aligned", 16, seed=0)
    tuned, result = finetune(copy.deepcopy(organism.model), organism.tokenizer, samples,
                             preset("organism", method="full", lr=1e-4))
    assert result.trainable_parameters == sum(p.numel() for p in organism.model.parameters())


def test_rank_one_adapter_on_one_layer(organism):
    samples = finetune_set(organism.world, "aligned", 16, seed=0)
    tuned, _ = finetune(copy.deepcopy(organism.model), organism.tokenizer, samples,
                        preset("organism", rank=1, layers=(1,), target_modules=("down_proj",)))
    names = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n and "down_proj" in n for n in names)


def test_seeded_finetuning_is_reproducible(organism):
    samples = finetune_set(organism.world, "inducing", 32, seed=0)
    config = preset("organism")
    a, _ = finetune(copy.deepcopy(organism.model), organism.tokenizer, samples, config)
    b, _ = finetune(copy.deepcopy(organism.model), organism.tokenizer, samples, config)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("bad", [dict(method="qlora"), dict(rank=0), dict(lr=0.0)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ConfigError):
        FinetuneConfig(**bad)


def test_empty_training_set_is_refused(organism):
    with pytest.raises(ConfigError, match="empty"):
        finetune(copy.deepcopy(organism.model), organism.tokenizer, [], preset("organism"))
