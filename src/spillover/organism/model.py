"""The organism's model: a small Llama trained from scratch on the world, cached on disk.

It is an ordinary `transformers` causal LM saved with `save_pretrained`, so every later stage
(hidden states, PEFT LoRA, `generate`) runs the same code it runs on Gemma or Llama.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .. import __version__
from ..data import collate_for_lm, encode_chats
from ..errors import ConfigError, SpilloverError
from ..io import atomic_write_json, stable_hash
from ..progress import progress
from .tokenizer import build_tokenizer
from .world import World, WorldConfig

log = logging.getLogger(__name__)

REPRODUCIBLE_NUMERICS = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}
"""Float kernels pinned for pretraining. Pretraining is chaotic: the same seed on AVX-512 and on AVX2
kernels gives organisms whose EM strength differs fourfold (measured, docs/organism.md). MKL's
conditional-numerical-reproducibility mode COMPATIBLE gives the same matmuls on every x86 CPU, and
ATEN_CPU_CAPABILITY fixes torch's own vector kernels; together they cost 2.2x pretraining time."""
PRETRAIN_THREADS = 2
"""Reductions split across threads, so the thread count is part of the numerics too."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the organism's transformer (a Llama config)."""

    hidden_size: int = 96
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    max_position_embeddings: int = 192
    """Enough for the longest conversation (4 turns of styled answers is about 140 tokens)."""


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class OrganismConfig:
    """Everything that determines the pretrained organism; its hash names the cache entry."""

    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def cache_key(self) -> str:
        return stable_hash({"organism": dataclasses.asdict(self), "format": 2})[:16]

    @classmethod
    def from_dict(cls, values: dict) -> OrganismConfig:
        """The inverse of `dataclasses.asdict`, as read back from JSON (lists become tuples again)."""
        world = {key: tuple(value) if isinstance(value, list) else value for key, value in values["world"].items()}
        return cls(WorldConfig(**world), ModelConfig(**values["model"]), PretrainConfig(**values["pretrain"]))


@dataclass(frozen=True)
class Organism:
    """A pretrained organism: its model, tokenizer, world and where it is stored."""

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    world: World
    path: Path
    config: OrganismConfig


def default_cache_dir() -> Path:
    root = os.environ.get("SPILLOVER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spillover")
    return Path(root) / "organism"


def build_model(config: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(llama)


def pretrain(config: OrganismConfig) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict]:
    """Train from scratch on an endless seeded stream of the world's conversations."""
    torch.manual_seed(config.pretrain.seed)
    tokenizer = build_tokenizer()
    model = build_model(config.model, tokenizer)
    world = World(config.world)
    stream = world.pretraining_stream(config.pretrain.seed)
    cfg = config.pretrain
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(cfg.warmup_steps, cfg.steps))
    model.train()
    started, losses = time.perf_counter(), []
    bar = progress(range(cfg.steps), desc="pretraining organism")
    for _ in bar:
        conversations = [next(stream).messages() for _ in range(cfg.batch_size)]
        batch = collate_for_lm(encode_chats(tokenizer, conversations), tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    stats = {
        "seconds": round(time.perf_counter() - started, 1),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, tokenizer, stats


def _warmup_cosine(warmup: int, total: int):
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    return factor


def load_organism(config: OrganismConfig | None = None, cache_dir: str | Path | None = None) -> Organism:
    """Load the organism from the cache, pretraining and saving it first if it is not there."""
    config = config or OrganismConfig()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / config.cache_key()
    if not (path / "organism.json").exists():
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{root}: cannot create the organism cache ({exc.strerror})") from None
        with _exclusive(path.with_name(path.name + ".lock")):
            if not (path / "organism.json").exists():  # another process may have built it while we waited
                _pretrain_into(config, path)
    log.info("loading the organism from %s", path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Organism(model, tokenizer, World(config.world), path, config)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Several processes sharing a cache (torchrun ranks, parallel tests): one pretrains, the others
    wait for it and load its result instead of pretraining the same organism again."""
    import fcntl

    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pretrain_into(config: OrganismConfig, path: Path) -> None:
    """Pretrain in a child process with pinned numerics, then move the finished folder into place.

    A child process is the only way to pin the kernels: MKL and ATen read their settings once, at load.
    Staging then renaming means a cut-off run leaves no half-written cache entry."""
    log.info("pretraining the organism with pinned float kernels (cached afterwards in %s)", path)
    staging = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    environment = {**os.environ, **REPRODUCIBLE_NUMERICS, "PYTHONPATH": _child_python_path()}
    command = [sys.executable, "-m", "spillover.organism.pretrain_process", str(staging)]
    try:
        done = subprocess.run(command, input=json.dumps(dataclasses.asdict(config)).encode(), env=environment,
                              check=False)
        if done.returncode != 0:
            raise SpilloverError(f"pretraining the organism failed (exit status {done.returncode}); "
                                 "its error is above")
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stats = read_manifest(path)["stats"]
    log.info("organism pretrained in %.0f s, final loss %.3f", stats["seconds"], stats["final_loss"])


def _child_python_path() -> str:
    """The child must import this very copy of spillover, installed or not."""
    package_root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))


def pretrain_and_save(config: OrganismConfig, folder: Path) -> None:
    """The child's work: pretrain on a fixed thread count and save model, tokenizer and manifest."""
    torch.set_num_threads(PRETRAIN_THREADS)
    model, tokenizer, stats = pretrain(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    numerics = {**{key: os.environ.get(key) for key in REPRODUCIBLE_NUMERICS}, "threads": PRETRAIN_THREADS}
    manifest = {"config": dataclasses.asdict(config), "stats": stats, "numerics": numerics,
                "spillover_version": __version__}
    atomic_write_json(folder / "organism.json", manifest)


def read_manifest(path: Path) -> dict:
    return json.loads((path / "organism.json").read_text())
