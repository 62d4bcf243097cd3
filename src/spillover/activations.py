"""Per-sample activations: residual streams (and their SAE features) pooled over a sample's tokens.

Samples are batched by length (little padding), the forward pass stops after the deepest layer
asked for, and results are streamed to disk in shards beside a manifest, so a cut-off run
resumes where it stopped and a finished one is reused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import __version__
from .data import ChatSample, EncodedChat, TextSample, encode_samples
from .errors import ConfigError, InputError
from .io import atomic_save_tensors, atomic_write_json, ensure_dir, remove_temp_files, stable_hash
from .lm import check_layers, residuals
from .progress import progress
from .sae import check_fits

log = logging.getLogger(__name__)


class Encoder(Protocol):
    def encode(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class CollectConfig:
    layers: tuple[int, ...]
    """Blocks whose output (residual stream) is read; see spillover.lm for the convention."""
    tokens: Literal["assistant", "all"] = "assistant"
    """Pool over the assistant's tokens (the paper's choice) or over every token."""
    token_budget: int = 16384
    """Padded tokens per forward batch; batches are formed from samples of similar length."""
    max_length: int = 1024
    shard_size: int = 4096
    """Samples per shard on disk: the unit of resumption."""

    def __post_init__(self) -> None:
        if self.tokens not in ("assistant", "all"):
            raise ConfigError(f"collect.tokens: {self.tokens!r}; choose 'assistant' or 'all'")
        if self.token_budget < 1 or self.shard_size < 1 or self.max_length < 1:
            raise ConfigError("collect.token_budget, shard_size and max_length must be at least 1")


@dataclass(frozen=True)
class PooledActivations:
    """Mean and max over each sample's selected tokens, per layer; SAE features when an SAE was given."""

    ids: tuple[str, ...]
    layers: tuple[int, ...]
    tensors: dict[str, torch.Tensor]
    """Keys: `resid_mean.L`, `resid_max.L` [n, d]; `feat_mean.L`, `feat_max.L` [n, d_sae]; `n_tokens` [n]."""

    def resid_mean(self, layer: int) -> torch.Tensor:
        return self.tensors[f"resid_mean.{layer}"]

    def feat_mean(self, layer: int) -> torch.Tensor:
        return self.tensors[f"feat_mean.{layer}"]

    def feat_max(self, layer: int) -> torch.Tensor:
        return self.tensors[f"feat_max.{layer}"]


def token_mask(encoded: EncodedChat, tokens: str, max_length: int) -> list[bool]:
    mask = encoded.assistant_mask if tokens == "assistant" else [True] * len(encoded.input_ids)
    return mask[:max_length]


def length_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices grouped so that longest * count stays within the budget, shortest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and lengths[i] * (len(current) + 1) > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(batch: list[EncodedChat], masks: list[list[bool]], pad_id: int, max_length: int):
    """Right-padded ids, attention mask, and the mask of tokens to read."""
    width = min(max(len(item.input_ids) for item in batch), max_length)
    rows = [item.input_ids[:width] for item in batch]
    reads = [list(mask[:width]) for mask in masks]
    # Built from padded Python lists in one call each: a tensor per row costs more than the rest.
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in rows], dtype=torch.long)
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows], dtype=torch.long)
    select = torch.tensor([read + [False] * (width - len(read)) for read in reads], dtype=torch.bool)
    return input_ids, attention, select


def _pool_batch(model, batch: list[EncodedChat], masks: list[list[bool]], layers: tuple[int, ...],
                saes: dict[int, Encoder], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    input_ids, attention, select = pad_batch(batch, masks, pad_id, max_length)
    streams = residuals(model, input_ids.to(device), attention.to(device), layers)
    select = select.to(device)
    counts = select.sum(dim=1).clamp(min=1)
    out: dict[str, torch.Tensor] = {"n_tokens": select.sum(dim=1).cpu()}
    for layer in layers:
        x = streams[layer].float()
        out.update(masked_pools(x, select, counts, "resid", layer))
        if layer in saes:
            out.update(_pool_selected(saes[layer].encode(x[select]), select, counts, layer))
    return out


def _pool_selected(flat: torch.Tensor, select: torch.Tensor, counts: torch.Tensor, layer: int):
    """Mean and max per sample of the SAE features of the selected tokens [n_selected, f].

    Pooling straight from the selected rows never builds a [batch, seq, d_sae] tensor, which for a
    wide SAE would be the largest allocation of the whole collection.
    """
    rows = select.nonzero()[:, 0]
    shape = (select.shape[0], flat.shape[1])
    total = torch.zeros(shape, dtype=flat.dtype, device=flat.device).index_add_(0, rows, flat)
    peak = torch.zeros(shape, dtype=flat.dtype, device=flat.device).scatter_reduce_(
        0, rows.unsqueeze(1).expand_as(flat), flat, reduce="amax", include_self=False)
    return {f"feat_mean.{layer}": (total / counts.unsqueeze(-1)).cpu(), f"feat_max.{layer}": peak.cpu()}


def masked_pools(x: torch.Tensor, select: torch.Tensor, counts: torch.Tensor, name: str, layer: int):
    keep = select.unsqueeze(-1)
    mean = (x * keep).sum(dim=1) / counts.unsqueeze(-1)
    peak = x.masked_fill(~keep, float("-inf")).amax(dim=1)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # samples with no selected token
    return {f"{name}_mean.{layer}": mean.cpu(), f"{name}_max.{layer}": peak.cpu()}


def _collect_shard(model, tokenizer, samples: Sequence[ChatSample], config: CollectConfig,
                   saes: dict[int, Encoder]) -> dict[str, torch.Tensor]:
    encoded = encode_samples(tokenizer, samples)
    masks = [token_mask(e, config.tokens, config.max_length) for e in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    parts: dict[str, list[torch.Tensor]] = {}
    order: list[int] = []
    for indices in length_batches([len(m) for m in masks], config.token_budget):
        pooled = _pool_batch(model, [encoded[i] for i in indices], [masks[i] for i in indices],
                             config.layers, saes, pad_id, config.max_length)
        for key, value in pooled.items():
            parts.setdefault(key, []).append(value)
        order += indices
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {key: torch.cat(values)[inverse].contiguous() for key, values in parts.items()}


@torch.no_grad()
def collect(model, tokenizer, samples: Sequence[ChatSample], config: CollectConfig,
            saes: dict[int, Encoder] | None = None, out_dir: str | Path | None = None,
            keep: bool = True) -> PooledActivations:
    """Pool activations of every sample; with `out_dir`, shards are saved and reused on rerun.

    With `keep=False` (and an `out_dir`) nothing is held in memory: the shards on disk are the
    result (read them with `load_pooled`), so memory stays flat in the number of samples.
    """
    if not keep and out_dir is None:
        raise ConfigError("collect: keep=False needs an out_dir to stream the shards to")
    saes = saes or {}
    config = dataclasses.replace(config, layers=check_layers(model, config.layers))
    unknown = sorted(set(saes) - set(config.layers))
    if unknown:
        raise ConfigError(f"SAEs were given for layers {unknown} that are not collected ({list(config.layers)})")
    for layer, sae in saes.items():
        check_fits(sae, model, layer)
    shards = [samples[i : i + config.shard_size] for i in range(0, len(samples), config.shard_size)]
    store = _ShardStore(Path(out_dir), _manifest_key(model, samples, config, saes)) if out_dir else None
    if store and store.done:
        log.info("%s: %d of %d shards already collected; resuming", out_dir, len(store.done), len(shards))
    results = []
    for index, shard in enumerate(progress(shards, desc="collecting activations")):
        cached = store.load(index) if store else None
        if cached is None:
            started = time.perf_counter()
            cached = _collect_shard(model, tokenizer, shard, config, saes)
            if store:
                store.save(index, cached, len(shards), time.perf_counter() - started)
        if keep:
            results.append(cached)
    ids = tuple(s.id for s in samples)
    if store:
        atomic_write_json(store.folder / "ids.json", {"ids": list(ids), "layers": list(config.layers)})
    tensors = {key: torch.cat([r[key] for r in results]) for key in results[0]} if results else {}
    return PooledActivations(ids, config.layers, tensors)


def load_pooled(folder: str | Path) -> PooledActivations:
    """Read back what `collect(..., out_dir=folder)` finished (e.g. by `spillover collect`)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "activations.json").read_text())
        index = json.loads((folder / "ids.json").read_text())
    except FileNotFoundError:
        raise InputError(f"{folder}: no finished activations here (activations.json and ids.json)") from None
    if len(manifest["shards_done"]) != manifest["shards_total"]:
        raise InputError(f"{folder}: collection is unfinished ({len(manifest['shards_done'])} of "
                         f"{manifest['shards_total']} shards); rerun spillover collect to resume")
    shards = [_read_shard(folder / f"shard-{i:05d}.safetensors") for i in range(manifest["shards_total"])]
    tensors = {key: torch.cat([s[key] for s in shards]) for key in shards[0]} if shards else {}
    return PooledActivations(tuple(index["ids"]), tuple(index["layers"]), tensors)


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    """A shard's tensors; safetensors only, so a file planted in its place cannot run code."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc}); delete the folder and collect again") from None


def _manifest_key(model, samples: Sequence[ChatSample], config: CollectConfig, saes: dict[int, Encoder]) -> dict:
    """What the shards depend on; a change in any of it makes the shards stale."""
    params = list(model.parameters())
    return {
        "config": dataclasses.asdict(config),
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_fingerprint": [_fingerprint(p) for p in params[:: max(1, len(params) // 8)]],
        "samples_sha256": stable_hash([[s.id, list(s.messages)] + (["text"] if isinstance(s, TextSample) else [])
                                      for s in samples]),
        "saes": {str(layer): _fingerprint(sae.W_enc) if hasattr(sae, "W_enc") else type(sae).__name__
                 for layer, sae in saes.items()},
    }


SHARD_SECONDS = "shard-seconds.json"
"""Collection time of each shard: what the shards cost, not part of the result."""


class _ShardStore:
    """Shards as safetensors files plus a manifest; a manifest from other inputs starts afresh."""

    def __init__(self, folder: Path, key: dict):
        self.folder = ensure_dir(folder)
        remove_temp_files(folder)  # a shard or manifest cut off by a kill: never a result
        self.key = json.loads(json.dumps(key))  # as it reads back from disk (tuples become lists)
        self.manifest_path = folder / "activations.json"
        manifest = json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else None
        same_inputs = manifest is not None and manifest.get("key") == self.key
        self.done: set[int] = set(manifest["shards_done"]) if same_inputs else set()
        self.seconds_path = folder / SHARD_SECONDS
        self.seconds: dict[str, float] = (json.loads(self.seconds_path.read_text())
                                          if same_inputs and self.seconds_path.exists() else {})
        if manifest is not None and not same_inputs:
            log.info("%s holds activations of other inputs; collecting afresh", folder)

    def load(self, index: int) -> dict[str, torch.Tensor] | None:
        path = self.folder / f"shard-{index:05d}.safetensors"
        return _read_shard(path) if index in self.done and path.exists() else None

    def save(self, index: int, tensors: dict[str, torch.Tensor], total: int, seconds: float) -> None:
        """The shard and its timing first, then the manifest that lists it: a kill or a full disk
        in between leaves a shard the manifest does not list, which a rerun simply collects again
        (and times anew). Timings stay out of the manifest, so a resumed collection's result is
        byte for byte an uninterrupted one's."""
        atomic_save_tensors(self.folder / f"shard-{index:05d}.safetensors", tensors)
        self.seconds[str(index)] = round(seconds, 6)
        atomic_write_json(self.seconds_path, self.seconds)
        self.done.add(index)
        atomic_write_json(self.manifest_path, {"key": self.key, "shards_done": sorted(self.done),
                                               "shards_total": total, "spillover_version": __version__})


def shard_seconds(folder: str | Path) -> dict[int, float]:
    """Seconds each shard in `folder` took to collect, whichever run collected it (empty where
    nothing was collected), so the cost of a resumed or shared collection can be told."""
    path = Path(folder) / SHARD_SECONDS
    return {int(i): float(s) for i, s in json.loads(path.read_text()).items()} if path.exists() else {}


def _fingerprint(tensor: torch.Tensor) -> str:
    return stable_hash([float(tensor.detach().float().sum()), list(tensor.shape)])


def collect_tokens(model, tokenizer, samples: Sequence[ChatSample], layer: int, tokens: str = "all",
                   max_tokens: int = 200_000, token_budget: int = 16384, max_length: int = 1024) -> torch.Tensor:
    """Token-level residuals at one layer, [n_tokens, d], e.g. to train an SAE on."""
    return collect_token_layers(model, tokenizer, samples, [layer], tokens, max_tokens, token_budget,
                                max_length)[layer]


@torch.no_grad()
def collect_token_layers(model, tokenizer, samples: Sequence[ChatSample], layers: Sequence[int],
                         tokens: str = "all", max_tokens: int = 200_000, token_budget: int = 16384,
                         max_length: int = 1024, skip_first: bool = False) -> dict[int, torch.Tensor]:
    """Token-level residuals at several layers from one forward pass each batch: {layer: [n_tokens, d]}.

    `skip_first` leaves out each sequence's first position: in pretrained LMs it is an attention
    sink whose residual norm is 100x the others' (SmolLM2: about 25,000 against 170 at layer 15),
    so an SAE trained with it spends its capacity and its input scaling on that one token, as the
    Gemma Scope SAEs avoid by excluding BOS.
    """
    layers = check_layers(model, layers)
    encoded = encode_samples(tokenizer, samples)
    masks = [token_mask(e, tokens, max_length) for e in encoded]
    if skip_first:
        masks = [[False, *m[1:]] if m else m for m in masks]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    total = 0
    batches = length_batches([len(m) for m in masks], token_budget)
    for indices in progress(batches, desc="collecting tokens"):
        input_ids, attention, select = pad_batch([encoded[i] for i in indices], [masks[i] for i in indices],
                                                  pad_id, max_length)
        streams = residuals(model, input_ids.to(device), attention.to(device), layers)
        for layer in layers:
            rows[layer].append(streams[layer][select.to(device)].float().cpu())
        total += rows[layers[0]][-1].shape[0]
        if total >= max_tokens:
            break
    return {layer: torch.cat(parts)[:max_tokens] for layer, parts in rows.items()}
