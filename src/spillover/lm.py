"""Talking to a causal LM through its own chat template: batched, seeded sampling of answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .progress import progress


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    """1.0 as in Betley et al.; 0 means greedy decoding."""
    max_new_tokens: int = 64
    batch_size: int = 256
    seed: int = 0


def chat_prompt_ids(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


@torch.no_grad()
def sample_answers(model, tokenizer, prompts: Sequence[Sequence[dict[str, str]]], config: SamplingConfig) -> list[str]:
    """One sampled answer per prompt, in order. Batch b is seeded with seed + b, so results do
    not depend on what ran before, and a resumed run samples the same answers."""
    model.eval()
    encoded = [chat_prompt_ids(tokenizer, p) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: list[str] = []
    starts = range(0, len(encoded), config.batch_size)
    for b, start in enumerate(progress(starts, desc="sampling answers")):
        chunk = encoded[start : start + config.batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(chunk):  # left padding, so every prompt ends where generation starts
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        torch.manual_seed(config.seed + b)
        sampling = {"do_sample": True, "temperature": config.temperature, "top_p": 1.0, "top_k": 0}
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=config.max_new_tokens,
            pad_token_id=pad_id,
            **(sampling if config.temperature > 0 else {"do_sample": False}),
        )
        new_tokens = output[:, width:]
        answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers
