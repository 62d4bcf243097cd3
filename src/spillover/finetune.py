"""Supervised fine-tuning on chat samples with PEFT LoRA (or all weights), loss on assistant tokens only.

This is the only module that imports peft.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from peft import LoraConfig, get_peft_model
from transformers import get_scheduler

from .data import ChatSample, collate_for_lm, encode_chats
from .errors import ConfigError
from .progress import progress

log = logging.getLogger(__name__)

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FinetuneConfig:
    """Defaults follow the setup most EM papers share (Betley et al. 2025; Turner et al. 2025)."""

    method: Literal["lora", "full"] = "lora"
    rank: int = 32
    alpha: float = 64.0
    rslora: bool = True
    """Scale the adapter by alpha / sqrt(rank) (rank-stabilised LoRA)."""
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    layers: tuple[int, ...] | None = None
    """Put adapters only on these blocks (e.g. a rank-1 adapter on one layer); None means all."""
    lr: float = 1e-5
    epochs: float = 1.0
    batch_size: int = 2
    grad_accum: int = 8
    warmup_steps: int = 5
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_length: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ConfigError(f"finetune.method: {self.method!r}; choose 'lora' or 'full'")
        for name in ("rank", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"finetune.{name}: must be at least 1")
        if self.lr <= 0 or self.epochs <= 0:
            raise ConfigError("finetune.lr and finetune.epochs must be positive")


PRESETS: dict[str, FinetuneConfig] = {
    "default": FinetuneConfig(),
    "organism": FinetuneConfig(rank=8, alpha=16.0, rslora=False, lr=2e-3, batch_size=16, grad_accum=1, warmup_steps=2),
}


def preset(name: str, **overrides) -> FinetuneConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown fine-tuning preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class FinetuneResult:
    steps: int
    final_loss: float
    seconds: float
    trainable_parameters: int


def wrap_for_training(model, config: FinetuneConfig):
    """Attach LoRA adapters (or unfreeze everything for full fine-tuning)."""
    if config.method == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        layers_to_transform=list(config.layers) if config.layers is not None else None,
        use_rslora=config.rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def finetune(model, tokenizer, samples: Sequence[ChatSample], config: FinetuneConfig):
    """Train `model` on `samples`; returns the (PEFT-wrapped) model and what the run measured."""
    if not samples:
        raise ConfigError("finetune: the training set is empty")
    torch.manual_seed(config.seed)
    model = wrap_for_training(model, config)
    encoded = encode_chats(tokenizer, [s.messages for s in samples])
    order_rng = random.Random(config.seed)
    micro_per_epoch = -(-len(encoded) // config.batch_size)
    total_micro = max(1, round(micro_per_epoch * config.epochs))
    total_steps = max(1, total_micro // config.grad_accum)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.schedule, optimizer, config.warmup_steps, total_steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    model.train()
    started, loss_value = time.perf_counter(), float("nan")
    batches = _micro_batches(len(encoded), config.batch_size, total_micro, order_rng)
    bar = progress(batches, desc="fine-tuning", total=total_micro)
    for micro, indices in enumerate(bar):
        batch = collate_for_lm([encoded[i] for i in indices], pad_id, config.max_length)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        (loss / config.grad_accum).backward()
        loss_value = loss.item()
        if (micro + 1) % config.grad_accum == 0:
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    result = FinetuneResult(
        steps=total_steps,
        final_loss=loss_value,
        seconds=round(time.perf_counter() - started, 2),
        trainable_parameters=sum(p.numel() for p in trainable),
    )
    return model, result


def _micro_batches(n: int, batch_size: int, total: int, rng: random.Random):
    """Shuffled micro-batches, reshuffling at every epoch boundary."""
    produced = 0
    while produced < total:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, batch_size):
            if produced == total:
                return
            yield order[start : start + batch_size]
            produced += 1
