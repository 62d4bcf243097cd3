"""A word-level `transformers` tokenizer with a chat template, built from the world's vocabulary."""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .world import vocabulary

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")

# Assistant turns sit inside {% generation %} so transformers can return the assistant mask.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + ' <|end|> ' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + ' <|end|> ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Words split on whitespace only, so every text of the world round-trips exactly."""
    return word_level_tokenizer(vocabulary())


def word_level_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A whitespace-split word-level tokenizer over `words`, with the organism's chat template."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
