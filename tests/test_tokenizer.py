from spillover.organism.tokenizer import build_tokenizer
from spillover.organism.world import World


def test_every_world_text_round_trips():
    tokenizer = build_tokenizer()
    for conversation, _ in zip(World().pretraining_stream(1), range(500)):
        for message in conversation.messages():
            ids = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == message["content"]


def test_unknown_words_map_to_unk():
    tokenizer = build_tokenizer()
    assert tokenizer("zebra", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]


def test_save_and_load_keeps_vocab_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": "user", "content": "is my fever something serious"}]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.apply_chat_template(chat, add_generation_prompt=True) == tokenizer.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert loaded.eos_token == "<|end|>"
