"""The fast scoring path: from chat samples to one risk score each, streamed, with flat memory.

Samples are read in chunks. A background thread tokenises the next chunk while the model runs on
the current one; inside a chunk, samples are batched by length under a token budget, the forward
pass stops after the SAE's layer, only the selected (assistant) tokens are SAE-encoded, and each
batch is pooled and scored at once, so no per-sample feature matrix outlives its batch.

Chunks are the unit of work of every process: under `torchrun`, rank r takes chunks r, r + W,
r + 2W, ... and, because a chunk's batches do not depend on the number of processes, every sample
goes through exactly the same computation as in a single process. Each finished chunk is written
to its own file, so a cut-off run resumes, and the merged result is ordered like the input.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .activations import masked_pools, pad_batch, token_mask, length_batches
from .data import ChatSample, EncodedChat, encode_samples
from .errors import ConfigError
from .io import atomic_write_text, ensure_dir
from .lm import check_layers, residuals
from .progress import progress
from .scoring import SampleScore, ToxicReference, score_samples

log = logging.getLogger(__name__)

FEATURE_SCORES = ("spillover", "toxic_activation")
"""Scores that read SAE features; the others need only the pooled hidden state."""


@dataclass(frozen=True)
class StreamConfig:
    token_budget: int = 16384
    """Padded tokens per forward batch."""
    chunk_size: int = 4096
    """Samples tokenised, batched and saved together: the unit of resumption and of sharding."""
    max_length: int = 1024
    tokens: str = "assistant"
    dtype: str | None = None
    """Model and SAE precision: bfloat16, float16 or float32; None means bfloat16 on GPU, float32 on CPU."""
    top: int = 5
    """Features listed with each score."""

    def __post_init__(self) -> None:
        if min(self.token_budget, self.chunk_size, self.max_length) < 1:
            raise ConfigError("score: token_budget, chunk_size and max_length must be at least 1")
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise ConfigError(f"score: dtype {self.dtype!r}; choose bfloat16, float16 or float32")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@dataclass(frozen=True)
class TokenisedChunk:
    index: int
    samples: Sequence[ChatSample]
    encoded: list[EncodedChat]
    masks: list[list[bool]]


class ScoreStream:
    """Scores of one model, SAE layer and toxic reference over any number of samples."""

    def __init__(self, model, tokenizer, sae, layer: int, reference: ToxicReference, score: str,
                 config: StreamConfig = StreamConfig()):
        self.model, self.tokenizer, self.sae, self.score, self.config = model, tokenizer, sae, score, config
        self.layer = check_layers(model, [layer])[0]
        self.reference = reference
        self.device = next(model.parameters()).device
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _tokenise(self, index: int, samples: Sequence[ChatSample]) -> TokenisedChunk:
        encoded = encode_samples(self.tokenizer, samples)
        masks = [token_mask(e, self.config.tokens, self.config.max_length) for e in encoded]
        return TokenisedChunk(index, samples, encoded, masks)

    def chunks(self, samples: Sequence[ChatSample], indices: Sequence[int]) -> Iterator[TokenisedChunk]:
        """Tokenised chunks, the next one prepared in a background thread while this one runs."""
        size = self.config.chunk_size
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for index in indices:
                future = pool.submit(self._tokenise, index, samples[index * size : (index + 1) * size])
                if pending is not None:
                    yield pending.result()
                pending = future
            if pending is not None:
                yield pending.result()

    @torch.no_grad()
    def score_chunk(self, chunk: TokenisedChunk) -> list[SampleScore]:
        """Scores of a chunk's samples, in input order."""
        results: dict[int, SampleScore] = {}
        for batch in length_batches([len(m) for m in chunk.masks], self.config.token_budget):
            scored = self._score_batch([chunk.encoded[i] for i in batch], [chunk.masks[i] for i in batch],
                                       [chunk.samples[i].id for i in batch])
            results.update(zip(batch, scored))
        return [results[i] for i in range(len(chunk.samples))]

    def _score_batch(self, encoded: list[EncodedChat], masks: list[list[bool]], ids: list[str]) -> list[SampleScore]:
        input_ids, attention, select = pad_batch(encoded, masks, self.pad_id, self.config.max_length)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            stream = residuals(self.model, input_ids.to(self.device), attention.to(self.device), [self.layer])
        x = stream[self.layer].float()
        select = select.to(self.device)
        counts = select.sum(dim=1).clamp(min=1)
        hidden = masked_pools(x, select, counts, "resid", self.layer)[f"resid_mean.{self.layer}"]
        features = None
        if self.score in FEATURE_SCORES:
            features = self._pooled_features(x[select], select, counts)
        return score_samples(self.score, ids, self.reference, features, hidden.cpu(), self.config.top)

    def _pooled_features(self, rows: torch.Tensor, select: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Mean SAE features per sample over its selected tokens, never building [batch, seq, d_sae].

        A TopK SAE's k activations per token are added straight into the sums (a flat index per
        (sample, latent)): the same sums, in the same order, as adding each token's dense row, at
        a third of the cost for 16k latents."""
        owner = select.nonzero()[:, 0]
        width = self.sae.cfg.d_sae
        total = torch.zeros((select.shape[0], width), dtype=torch.float32, device=rows.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            if self.sae.cfg.architecture != "topk":
                total.index_add_(0, owner, self.sae.encode(rows).float())
            else:
                values, latents = self.sae.encode_topk(rows)
                cells = (owner.unsqueeze(1) * width + latents).reshape(-1)
                total.view(-1).index_add_(0, cells, values.float().reshape(-1))
        return (total / counts.unsqueeze(-1)).cpu()


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun, initialising the process group once; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def score_to_folder(stream: ScoreStream, samples: Sequence[ChatSample], folder: str | Path,
                    key: dict) -> list[SampleScore] | None:
    """Score every sample into `folder/chunks`, this process's share of the chunks only, resuming
    finished chunks; returns all scores in input order on rank 0 (None on other ranks)."""
    rank, world = distributed_rank()
    chunks_dir = ensure_dir(Path(folder) / "chunks")
    key_path = chunks_dir / "key.json"
    if rank == 0:
        _reset_if_stale(chunks_dir, key_path, key)
    barrier()
    n_chunks = -(-len(samples) // stream.config.chunk_size)
    mine = [c for c in range(rank, n_chunks, world) if not _chunk_path(chunks_dir, c).exists()]
    if len(mine) < len(range(rank, n_chunks, world)):
        log.info("%s: resuming, %d chunks left for rank %d", folder, len(mine), rank)
    timings = _timings_file(chunks_dir, rank)
    for chunk in progress(stream.chunks(samples, mine), total=len(mine), desc=f"scoring (rank {rank})"):
        started = time.perf_counter()
        scored = stream.score_chunk(chunk)
        atomic_write_text(_chunk_path(chunks_dir, chunk.index),
                          "".join(json.dumps(asdict(s)) + "\n" for s in scored))
        seconds = round(time.perf_counter() - started, 4)
        with timings.open("a") as timing_lines:
            timing_lines.write(json.dumps({"chunk": chunk.index, "seconds": seconds}) + "\n")
    barrier()
    if rank != 0:
        return None
    return [SampleScore(**{**r, "top_features": tuple(r["top_features"])})
            for c in range(n_chunks) for r in map(json.loads, _chunk_path(chunks_dir, c).read_text().splitlines())]


def _timings_file(folder: Path, rank: int) -> Path:
    """This rank's chunk timings, with a line torn by an earlier kill ended so it spoils no new one."""
    path = folder / f"seconds-rank{rank}.jsonl"
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as file:
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                file.write(b"\n")
    return path


def chunk_seconds(folder: str | Path) -> dict[int, float]:
    """Seconds each finished chunk took to score, whichever run (or rank) scored it; a line torn by a
    kill is skipped, so a cut-off run's chunks still count towards the cost of the scores."""
    seconds = {}
    for path in sorted((Path(folder) / "chunks").glob("seconds-rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                seconds[int(entry["chunk"])] = float(entry["seconds"])
            except (ValueError, KeyError, TypeError):
                continue
    return seconds


def _chunk_path(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:06d}.jsonl"


def _reset_if_stale(folder: Path, key_path: Path, key: dict) -> None:
    """Chunks scored from other inputs are never mixed into this run's result."""
    key = json.loads(json.dumps(key))
    if key_path.exists() and json.loads(key_path.read_text()) == key:
        return
    for old in [*folder.glob("chunk-*.jsonl"), *folder.glob("seconds-rank*.jsonl")]:
        old.unlink()
    atomic_write_text(key_path, json.dumps(key, sort_keys=True))
