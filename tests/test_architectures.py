"""`layer = l` is the output of block l on every architecture family we claim, from tiny random models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoConfig

from spillover.lm import decoder_blocks, residuals

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)

CONFIGS = {
    "llama": dict(TINY),
    "gemma2": dict(TINY, head_dim=8, query_pre_attn_scalar=8, sliding_window=16),
    "gemma3_text": dict(TINY, head_dim=8, query_pre_attn_scalar=8, sliding_window=16),
    "qwen2": dict(TINY),
    "gpt_neox": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, max_position_embeddings=64),
    "gpt2": dict(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "gpt_oss": dict(TINY, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def tiny_model(model_type: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_layer_l_is_block_l_output(model_type):
    model = tiny_model(model_type)
    assert len(decoder_blocks(model)) == 3
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    got = residuals(model, ids, mask, [0, 1])
    for layer in (0, 1):  # the last entry of hidden_states has the final norm applied, so skip block 2
        assert torch.allclose(got[layer], hidden[layer + 1], atol=1e-5), (model_type, layer)
