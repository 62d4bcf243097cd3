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


# --- the residual stream -------------------------------------------------------------------
# Convention, written once: `layer = l` is the residual stream after block l, i.e. the output of
# decoder block l. That is HF `hidden_states[l + 1]` for every block but the last (HF applies the
# final norm to its last entry) and Gemma Scope's `layer_l` (resid_post).

_BLOCK_PATHS = (
    "model.layers",  # Llama, Gemma 1-3, Qwen 2, Mistral, gpt-oss
    "model.language_model.layers",  # Gemma 3 multimodal wrappers
    "transformer.h",  # GPT-2
    "gpt_neox.layers",  # GPT-NeoX / Pythia
)


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The model's list of decoder blocks, through PEFT wrappers too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in _BLOCK_PATHS:
        node = base
        for attribute in path.split("."):
            node = getattr(node, attribute, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList):
            return node
    from .errors import ConfigError

    raise ConfigError(f"cannot find the decoder blocks of {type(base).__name__}; known paths: {', '.join(_BLOCK_PATHS)}")


def check_layers(model, layers: Sequence[int]) -> tuple[int, ...]:
    from .errors import ConfigError

    n = len(decoder_blocks(model))
    for layer in layers:
        if not 0 <= layer < n:
            raise ConfigError(f"layer {layer} is out of range: this model has blocks 0..{n - 1}")
    if not layers:
        raise ConfigError("give at least one layer")
    return tuple(sorted(set(layers)))


class _StopForward(Exception):
    """Raised by a hook once the deepest requested block has run: later blocks cost nothing."""


@torch.no_grad()
def residuals(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Residual stream after each requested block, [batch, seq, d]; stops after the deepest one."""
    blocks = decoder_blocks(model)
    wanted = check_layers(model, layers)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == wanted[-1]:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in wanted]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured
