"""Supervised fine-tuning on chat samples with PEFT LoRA (or all weights), loss on assistant tokens only.

This is the only module that imports peft. The loop runs through `accelerate`, so the same code
runs on one CPU, one GPU or several devices under `accelerate launch` (docs/harness.md); on one
process it computes exactly what a plain PyTorch loop computes. It checkpoints every few optimizer
steps and resumes from the last checkpoint with the same result as a run that was never cut off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import random
import shutil
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from accelerate import Accelerator, PartialState
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import SchedulerType, get_scheduler

from . import __version__
from .data import ChatSample, collate_for_lm, encode_chats, read_chat_jsonl
from .errors import ConfigError, InputError, shown
from .io import (
    atomic_save_tensors,
    atomic_write_json,
    ensure_dir,
    matching_manifest,
    remove_temp_files,
    stable_hash,
    write_error,
)
from .lm import check_layers
from .progress import progress

log = logging.getLogger(__name__)

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT_FILE = "state.safetensors"
MANIFEST = "finetune.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """Defaults follow the setup most EM papers share (Betley et al. 2025; Turner et al. 2025)."""

    method: Literal["lora", "full"] = "lora"
    """'lora': train adapters only; 'full': train every weight."""
    rank: int = 32
    """LoRA rank r."""
    alpha: float = 64.0
    """LoRA alpha; the adapter is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    rslora: bool = True
    """Scale the adapter by alpha / sqrt(rank) (rank-stabilised LoRA)."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    """Module names that get adapters (all attention and MLP projections by default)."""
    layers: tuple[int, ...] | None = None
    """Put adapters only on these blocks (e.g. a rank-1 adapter on one layer); None means all."""
    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    epochs: float = 1.0
    """Passes over the data; fractions stop part-way through the last pass."""
    batch_size: int = 2
    """Samples per micro-batch (per process under accelerate)."""
    grad_accum: int = 8
    """Micro-batches per optimizer step."""
    warmup_steps: int = 5
    """Optimizer steps of linear warm-up."""
    schedule: str = "linear"
    """A `transformers.get_scheduler` name: linear, cosine, constant_with_warmup, ..."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_length: int = 2048
    """Tokens per conversation; longer ones are cut."""
    seed: int = 0
    """Seeds the adapter's initialisation, the data order and dropout."""

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ConfigError(f"finetune.method: {self.method!r}; choose 'lora' or 'full'")
        for name in ("rank", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"finetune.{name}: must be at least 1")
        if not (0 < self.lr < math.inf and 0 < self.epochs < math.inf):  # also refuses NaN
            raise ConfigError("finetune.lr and finetune.epochs must be positive and finite")
        if not 0 < self.alpha < math.inf:
            raise ConfigError(f"finetune.alpha: {self.alpha}; must be positive and finite")
        if not 0 <= self.dropout < 1 or self.warmup_steps < 0 or not 0 <= self.weight_decay < math.inf:
            raise ConfigError("finetune.dropout must be in [0, 1), warmup_steps and weight_decay at least 0")
        if not self.target_modules:
            raise ConfigError("finetune.target_modules: give at least one module name")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ConfigError(f"finetune.layers: {list(self.layers)}; give block numbers from 0, or none for all")
        schedules = [s.value for s in SchedulerType]
        if self.schedule not in schedules:
            raise ConfigError(f"finetune.schedule: {self.schedule!r}; choose one of: {', '.join(schedules)}")


PRESETS: dict[str, FinetuneConfig] = {
    "default": FinetuneConfig(),
    "organism": FinetuneConfig(rank=8, alpha=16.0, rslora=False, lr=2e-3, batch_size=16, grad_accum=1, warmup_steps=2),
}


def preset(name: str, **overrides) -> FinetuneConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown fine-tuning preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# --- `--set field=value` ---------------------------------------------------------------------


def apply_overrides(config, assignments: Sequence[str], stage: str = "finetune"):
    """A copy of the dataclass `config` with `field=value` strings applied, each checked against
    the field's type; `stage.field=value` works too. Unknown fields are an error."""
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    changes = {}
    for text in assignments:
        key, sep, value = text.partition("=")
        key = key.strip().removeprefix(f"{stage}.")
        if not sep:
            raise ConfigError(f"--set {text!r}: expected field=value")
        if key not in names:
            named = key if key.isidentifier() else shown(key)  # a key with a newline stays on one line
            raise ConfigError(f"--set {named}: unknown {stage} field; valid keys: {', '.join(names)}")
        changes[key] = _parse_value(value.strip(), hints[key], f"--set {key}")
    return dataclasses.replace(config, **changes)


def _parse_value(text: str, hint, where: str):
    """`text` as a value of type `hint` (bool, int, float, str, Literal, tuple[...], X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null", ""):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse_value(text, inner, where)
    if origin is Literal:
        if text not in args:
            raise ConfigError(f"{where}: {text!r}; choose one of: {', '.join(map(str, args))}")
        return text
    if origin is tuple:
        items = [t.strip() for t in text.strip("[]()").split(",") if t.strip()]
        return tuple(_parse_value(t, args[0], where) for t in items)
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{where}: {text!r} is not true or false")
        return text.lower() in ("true", "1", "yes")
    kinds = {int: "a whole number", float: "a number", str: "text"}
    try:
        return hint(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {text!r} is not {kinds.get(hint, hint)}") from None


# --- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneResult:
    steps: int
    """Optimizer steps of the whole run."""
    final_loss: float
    """Mean loss over the micro-batches of the last optimizer step."""
    seconds: float
    """Training time, including the time before a resume."""
    trainable_parameters: int
    resumed_from: int = 0
    """Optimizer steps restored from a checkpoint rather than computed in this call."""


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often `finetune` saves what it needs to resume."""

    folder: Path
    every: int = 50
    """Optimizer steps between checkpoints."""
    key: str = ""
    """Identity of the run's inputs; a checkpoint saved under another key is refused."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"checkpoint interval: {self.every}; must be at least 1")


@dataclass(frozen=True)
class _Plan:
    micro: int
    """Micro-batches per process."""
    steps: int
    """Optimizer steps; the last may accumulate fewer micro-batches."""


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
    if config.layers is not None:
        try:
            check_layers(model, config.layers)
        except ConfigError as exc:
            raise ConfigError(f"finetune.layers: {exc}") from None
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:  # peft's word for modules the model lacks
        raise ConfigError(f"finetune.target_modules: {str(exc).splitlines()[0][:200]}") from None


def finetune(
    model,
    tokenizer,
    samples: Sequence[ChatSample],
    config: FinetuneConfig,
    *,
    checkpointing: Checkpointing | None = None,
    on_step: Callable[[int, float], None] | None = None,
):
    """Train `model` on `samples`; returns the (PEFT-wrapped) model and what the run measured.

    With `checkpointing`, resumes from the checkpoint there if any. `on_step(step, loss)` runs
    after every optimizer step (and its checkpoint).
    """
    if not samples:
        raise ConfigError("finetune: the training set is empty")
    torch.manual_seed(config.seed)
    model = wrap_for_training(model, config)
    accelerator = Accelerator(cpu=_cpu_only())
    plan = _plan(len(samples), config, accelerator.num_processes)
    encoded = encode_chats(tokenizer, [s.messages for s in samples])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.schedule, optimizer, config.warmup_steps, plan.steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    start, loss, elapsed = 0, float("nan"), 0.0
    if checkpointing is not None and (saved := _read_checkpoint(checkpointing)) is not None:
        start, loss, elapsed = _restore(saved, accelerator.unwrap_model(model), optimizer, scheduler)
        log.info("resuming from the checkpoint at step %d of %d", start, plan.steps)
    windows = _step_windows(len(encoded), config, plan, accelerator.process_index, accelerator.num_processes)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    started = time.perf_counter()
    bar = progress(range(plan.steps), desc="fine-tuning", total=plan.steps)
    for step in bar:
        if step < start:
            continue
        loss = _accumulate(model, windows[step], encoded, pad_id, config, accelerator)
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss:.3f}")
        done = step + 1
        if checkpointing is not None and done % checkpointing.every == 0 and done < plan.steps:
            seconds = elapsed + time.perf_counter() - started
            _write_checkpoint(checkpointing, accelerator, model, optimizer, scheduler, done, loss, seconds)
        if on_step is not None:
            on_step(done, loss)
    model = accelerator.unwrap_model(model)
    model.eval()
    result = FinetuneResult(
        steps=plan.steps,
        final_loss=loss,
        seconds=round(elapsed + time.perf_counter() - started, 2),
        trainable_parameters=sum(p.numel() for p in trainable),
        resumed_from=start,
    )
    return model, result


def _cpu_only() -> bool:
    """No GPU (or other accelerator): tell accelerate, so that several CPU processes started by
    `torchrun` or `accelerate launch` train together (gloo) instead of each alone."""
    has_accelerator = getattr(torch, "accelerator", None)
    return not (has_accelerator.is_available() if has_accelerator else torch.cuda.is_available())


def _processes() -> PartialState:
    """The process group as accelerate sees it (one process unless launched with several)."""
    return PartialState(cpu=_cpu_only())


def _plan(n_samples: int, config: FinetuneConfig, processes: int) -> _Plan:
    micro_per_epoch = -(-n_samples // config.batch_size)
    total_micro = max(1, round(micro_per_epoch * config.epochs))
    micro = max(1, total_micro // processes)
    return _Plan(micro=micro, steps=-(-micro // config.grad_accum))


def _step_windows(n: int, config: FinetuneConfig, plan: _Plan, rank: int,
                  world: int) -> list[list[list[int]]]:
    """Each optimizer step's micro-batches for this process: every process draws the same seeded
    stream and takes every world-th micro-batch, so the data order survives a resume."""
    stream = _micro_batches(n, config.batch_size, plan.micro * world, random.Random(config.seed))
    mine = [batch for g, batch in enumerate(stream) if g % world == rank]
    return [mine[i : i + config.grad_accum] for i in range(0, len(mine), config.grad_accum)]


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


def _accumulate(model, window, encoded, pad_id: int, config: FinetuneConfig,
                accelerator: Accelerator) -> float:
    """Forward and backward over one step's micro-batches; gradients sync on the last only."""
    losses = []
    for i, indices in enumerate(window):
        batch = collate_for_lm([encoded[j] for j in indices], pad_id, config.max_length)
        last = i == len(window) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = model(**{k: v.to(accelerator.device) for k, v in batch.items()}).loss
            accelerator.backward(loss / len(window))
        losses.append(loss.item())
    return sum(losses) / len(losses)


# --- checkpoints: one safetensors file, tensors plus a JSON header, replaced atomically --------


def _write_checkpoint(ck: Checkpointing, accelerator: Accelerator, model, optimizer, scheduler,
                      step: int, loss: float, seconds: float) -> None:
    """Trainable weights, optimizer and scheduler state, RNG states and the step, on the main
    process; the others wait, so every process resumes from the same file."""
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        tensors = {f"param.{n}": p.detach().cpu().contiguous().clone()
                   for n, p in unwrapped.named_parameters() if p.requires_grad}
        state = optimizer.state_dict()
        for index, entries in state["state"].items():
            for name, value in entries.items():
                tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous().clone()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, rng in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = rng
        header = {"format": 1, "key": ck.key, "step": step, "loss": loss, "seconds": seconds,
                  "param_groups": state["param_groups"], "scheduler": scheduler.state_dict()}
        folder = ensure_dir(ck.folder)
        remove_temp_files(folder)  # one cut off by a kill
        atomic_save_tensors(folder / CHECKPOINT_FILE, tensors, metadata={"state": json.dumps(header)})
        log.info("checkpoint at step %d in %s", step, folder)
    accelerator.wait_for_everyone()


def _read_checkpoint(ck: Checkpointing) -> tuple[dict[str, torch.Tensor], dict] | None:
    path = ck.folder / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            header = json.loads(handle.metadata()["state"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - any damage means the same thing to the user
        reason = type(exc).__name__
        raise InputError(f"{path}: unreadable checkpoint ({reason}); delete it to start over") from None
    if header.get("key") != ck.key:
        raise ConfigError(f"{path}: a checkpoint of another run (config, data or model differ); "
                          f"delete {ck.folder} or choose another output folder")
    return tensors, header


def _restore(saved: tuple[dict[str, torch.Tensor], dict], model, optimizer,
             scheduler) -> tuple[int, float, float]:
    """Put a checkpoint back; returns (step, loss, seconds) as they were when it was saved."""
    tensors, header = saved
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if {k.removeprefix("param.") for k in tensors if k.startswith("param.")} != set(params):
        raise ConfigError("checkpoint: its trainable weights do not match this model's; "
                          "delete it to start over")
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(tensors[f"param.{name}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in header["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(header["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return header["step"], header["loss"], header["seconds"]


# --- adapters on disk --------------------------------------------------------------------------


def adapter_folder(path: str | Path) -> Path:
    """The PEFT adapter folder at `path`, or in `path/adapter` (a `spillover finetune` output)."""
    path = Path(path)
    for folder in (path, path / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return folder
    raise ConfigError(f"--adapter {path}: no adapter_config.json there or in {path / 'adapter'}; "
                      "give a `spillover finetune` output folder or a PEFT adapter folder")


def apply_adapter(model, folder: str | Path):
    """`model` with the LoRA adapter in `folder` merged into its weights (faster to sample from).

    A pickled adapter (adapter_model.bin) is read with weights_only=True: one holding code is refused."""
    try:
        return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except pickle.UnpicklingError:
        raise ConfigError(f"--adapter {folder}: refused its pickled weights (loading them could run code); "
                          "use an adapter saved as safetensors") from None


# --- `spillover finetune`: a run folder with adapter, manifest and checkpoints -----------------


@dataclass(frozen=True)
class FinetuneRun:
    """What `run_finetune` left in its folder."""

    out: Path
    weights: Path
    """The adapter folder (LoRA), or the whole model's folder (full fine-tuning)."""
    merged: Path | None
    """Base model with the adapter merged in, when asked for."""
    result: FinetuneResult
    reused: bool
    """True when a finished run with the same inputs was found and nothing was trained."""


def run_finetune(
    model: str,
    data: str | Path,
    out: str | Path,
    config: FinetuneConfig,
    *,
    merge: bool = False,
    checkpoint_every: int = 50,
    cache_dir: str | Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneRun:
    """Fine-tune `model` (a local HF folder or `organism`) on the chat JSONL `data` into `out`.

    Writes `out/adapter` (or `out/model` for full fine-tuning), `out/merged` with `merge`, and
    `out/finetune.json`. A finished run with the same inputs is reused; a cut-off one resumes
    from `out/checkpoint`.
    """
    from .models import load_model, model_fingerprint, sha256_file

    out, data = ensure_dir(out), Path(data)
    samples = read_chat_jsonl(data)
    inputs = _normalised({"config": dataclasses.asdict(config), "data_sha256": sha256_file(data),
                          "base_model": model_fingerprint(model, cache_dir),
                          "processes": _processes().num_processes})
    if (manifest := _finished_manifest(out, inputs)) is not None:
        return _reuse(out, manifest, model, merge, cache_dir)
    base = load_model(model, cache_dir=cache_dir, device=str(_processes().device))  # this process's device
    checkpointing = Checkpointing(out / "checkpoint", checkpoint_every, stable_hash(inputs))
    tuned, result = finetune(base.model, base.tokenizer, samples, config, checkpointing=checkpointing,
                             on_step=on_step)
    state = _processes()
    weights, merged = out / ("adapter" if config.method == "lora" else "model"), None
    if state.is_main_process:
        tokenizer = base.tokenizer if config.method == "full" else None
        _save_folder(weights, lambda tmp: _save_model(tuned, tokenizer, tmp))
        if merge and config.method == "lora":
            merged = _save_folder(out / "merged",
                                  lambda tmp: _save_model(tuned.merge_and_unload(), base.tokenizer, tmp))
        manifest = {"inputs": inputs, "base_model": model, "data": str(data), "n_samples": len(samples),
                    "spillover_version": __version__, "seed": config.seed, **dataclasses.asdict(result),
                    "weights": weights.name, "merged": merged.name if merged else None}
        atomic_write_json(out / MANIFEST, manifest)
        shutil.rmtree(checkpointing.folder, ignore_errors=True)
    state.wait_for_everyone()
    return FinetuneRun(out, weights, merged, result, reused=False)


def _normalised(obj):
    """As it reads back from JSON (tuples become lists), so manifests compare equal."""
    return json.loads(json.dumps(obj))


def _finished_manifest(out: Path, inputs: dict) -> dict | None:
    """The manifest of a finished run with these inputs; an error if it was run on other inputs."""
    return matching_manifest(out / MANIFEST, inputs, "fine-tuning run")


def _reuse(out: Path, manifest: dict, model: str, merge: bool, cache_dir) -> FinetuneRun:
    """The finished run as it is, merging its adapter first if that is asked for now."""
    log.info("%s: fine-tuned already with the same inputs; reusing it", out)
    weights = out / manifest["weights"]
    merged = out / manifest["merged"] if manifest.get("merged") else None
    if merge and merged is None and manifest["weights"] == "adapter" and _processes().is_main_process:
        from .models import load_model

        base = load_model(model, cache_dir=cache_dir, adapter=weights, device="cpu")
        merged = _save_folder(out / "merged", lambda tmp: _save_model(base.model, base.tokenizer, tmp))
        atomic_write_json(out / MANIFEST, {**manifest, "merged": merged.name})
    fields = {f.name for f in dataclasses.fields(FinetuneResult)}
    result = FinetuneResult(**{k: v for k, v in manifest.items() if k in fields})
    return FinetuneRun(out, weights, merged, result, reused=True)


def _save_model(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _save_folder(final: Path, save: Callable[[Path], None]) -> Path:
    """Save into a hidden folder beside `final`, then move it into place: whole or absent."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
    except OSError as exc:  # a full disk: no half folder left, and one line rather than a traceback
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(final, exc) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
