"""Training a TopK SAE, with step checkpoints so that a killed run resumes to the identical SAE.

A checkpoint is one safetensors file (never a pickle): the weights, Adam's moments, the steps at
which each latent last fired, the shuffling generator's state at the start of the current epoch,
and a JSON header with the step and the identity of the run's inputs. It is written atomically,
so a kill leaves the previous checkpoint or the new one, and a resumed run redraws the same
batches and takes the same steps as a run that was never cut off.

`python -m spillover.sae_training` trains one SAE on a model's token activations into an
SAELens-format folder; rerunning the same command resumes it, or reuses the finished folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import torch
from safetensors import safe_open
from torch import nn

from .errors import ConfigError, InputError, SpilloverError
from .io import atomic_save_tensors, atomic_write_json, remove_temp_files, stable_hash
from .progress import progress
from .sae import SaeConfig, SparseAutoencoder, _check_activations, _unit_rows, sae_metrics, topk_relu

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "sae_checkpoint.safetensors"
_FORMAT = 1


@dataclass(frozen=True)
class TopKTrainingConfig:
    d_sae: int = 512
    """Number of latents."""
    k: int = 16
    """Active latents per row."""
    lr: float = 1e-3
    """Adam learning rate; inputs are rescaled to mean squared norm d_in, so it transfers across models."""
    steps: int | None = None
    """Optimiser steps; None trains for `epochs` passes over the data."""
    epochs: int = 10
    """Passes over the data when `steps` is None."""
    batch_size: int = 1024
    """Rows per step."""
    seed: int = 0
    """Seeds the initial weights and the order of rows."""
    dead_window: int = 200
    """Steps without firing after which a latent counts as dead and gets the AuxK loss."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024) that teaches dead latents the residual; 0 turns it off."""
    auxk_k: int | None = None
    """Dead latents used by AuxK per row; None means d_in // 2, as in Gao et al."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Starting decoder bias; the geometric median is robust to outlier rows."""
    normalize_input: bool = True
    """Train on inputs scaled to mean squared norm d_in, then fold the scale back into b_enc and b_dec."""

    def __post_init__(self) -> None:
        if self.d_sae < 1 or not 1 <= self.k <= self.d_sae:
            raise ConfigError(f"sae_train.k: {self.k}; needs 1 <= k <= d_sae ({self.d_sae})")
        steps = 1 if self.steps is None else self.steps
        if self.lr <= 0 or min(self.batch_size, self.epochs, steps) < 1:
            raise ConfigError("sae_train.lr must be positive and batch_size, epochs and steps at least 1")
        if self.dead_window < 1 or self.auxk_coef < 0 or (self.auxk_k is not None and self.auxk_k < 1):
            raise ConfigError("sae_train.dead_window and auxk_k must be at least 1 and auxk_coef at least 0")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ConfigError(f"sae_train.b_dec_init: {self.b_dec_init!r}; "
                              "choose 'geometric_median', 'mean' or 'zeros'")


@dataclass(frozen=True)
class SaeTrainingReport:
    fvu: float
    """Fraction of variance unexplained on the training data, after training."""
    l0: float
    """Mean active latents per row (k, unless some rows have fewer positive pre-activations)."""
    dead_fraction: float
    """Share of latents that fire on no training row."""
    steps: int
    """Optimiser steps taken."""
    seconds: float
    """Wall-clock training time, metrics excluded, including the time before a resume."""
    resumed_from: int = 0
    """Steps restored from a checkpoint rather than computed in this call."""


@dataclass(frozen=True)
class SaeCheckpointing:
    """Where and how often `train_topk_sae` saves what it needs to resume."""

    folder: Path
    every: int = 50
    """Optimiser steps between checkpoints."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"SAE checkpoint interval: {self.every}; must be at least 1")

    @property
    def path(self) -> Path:
        return Path(self.folder) / CHECKPOINT_FILE


@dataclass
class _State:
    """What changes from step to step besides the weights: all of it goes into a checkpoint."""

    step: int
    last_fired: torch.Tensor
    epoch_rng: torch.Tensor
    """The generator's state when the current epoch's shuffle was drawn."""
    seconds: float = 0.0


def train_topk_sae(
    activations: torch.Tensor, config: TopKTrainingConfig, metadata: Mapping[str, Any] | None = None,
    checkpointing: SaeCheckpointing | None = None,
) -> tuple[SparseAutoencoder, SaeTrainingReport]:
    """Train a TopK SAE on activations [n, d_in] with Adam; seeded and deterministic on a given machine.

    Decoder rows start as random unit vectors with W_enc = W_dec.T, stay unit-norm after every step
    (their gradient's radial part is removed first), and b_dec starts at the data's centre. With
    `checkpointing`, a checkpoint of the same inputs found there is resumed from, and the last one
    (at the final step) is left for the caller to delete once the SAE is saved.
    """
    x = _check_activations(activations).float()
    n, d_in = x.shape
    gen = torch.Generator().manual_seed(config.seed)
    scale = math.sqrt(d_in / x.pow(2).sum(1).mean().item()) if config.normalize_input else 1.0
    x = x * scale
    sae = SparseAutoencoder(SaeConfig(d_in, config.d_sae, "topk", config.k, metadata=dict(metadata or {})),
                            device=x.device)
    total = config.steps or config.epochs * math.ceil(n / config.batch_size)
    key = _run_key(activations, config, metadata) if checkpointing else ""
    opt = torch.optim.Adam(sae.parameters(), lr=config.lr)
    state = _resume(checkpointing, key, sae, opt, gen) if checkpointing else None
    resumed_from = state.step if state else 0
    if state is None:
        _initialise(sae, x, config, gen)
        state = _State(0, torch.zeros(config.d_sae, dtype=torch.long), gen.get_state())
    started = time.perf_counter() - state.seconds
    _fit(sae, opt, x, config, gen, total, state,
         lambda s: _checkpoint(checkpointing, key, sae, opt, s, started, total))
    with torch.no_grad():  # trained on x * scale: the same latents, divided by scale, fit x itself
        sae.b_enc /= scale
        sae.b_dec /= scale
    seconds = time.perf_counter() - started
    metrics = sae_metrics(sae, activations)
    log.info("TopK SAE (d_sae %d, k %d): %d steps in %.1f s, FVU %.4f, L0 %.1f, dead %.1f%%", config.d_sae,
             config.k, total, seconds, metrics.fvu, metrics.l0, 100 * metrics.dead_fraction)
    return sae, SaeTrainingReport(metrics.fvu, metrics.l0, metrics.dead_fraction, total, seconds, resumed_from)


@torch.no_grad()
def _initialise(sae: SparseAutoencoder, x: torch.Tensor, config: TopKTrainingConfig,
                gen: torch.Generator) -> None:
    w = torch.randn(sae.cfg.d_sae, sae.cfg.d_in, generator=gen).to(x.device)
    sae.W_dec.copy_(_unit_rows(w))
    sae.W_enc.copy_(sae.W_dec.T)
    sae.b_enc.zero_()
    if config.b_dec_init == "mean":
        sae.b_dec.copy_(x.mean(0))
    elif config.b_dec_init == "geometric_median":
        sample = x[torch.randperm(len(x), generator=gen)[:8192].to(x.device)]
        sae.b_dec.copy_(geometric_median(sample))


def geometric_median(x: torch.Tensor, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The point minimising the summed distance to the rows of x, by Weiszfeld's iteration."""
    point = x.double().mean(0)
    rows = x.double()
    for _ in range(iterations):
        weights = 1.0 / (rows - point).norm(dim=1).clamp_min(1e-12)
        new = (weights[:, None] * rows).sum(0) / weights.sum()
        moved = (new - point).norm().item()
        point = new
        if moved <= tol * (point.norm().item() + 1e-12):
            break
    return point.to(x.dtype)


def _batches(n: int, batch_size: int, gen: torch.Generator, total: int,
             start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(step, row indices, generator state at the epoch's start) for steps start+1..total.

    Each epoch draws a fresh shuffle from `gen`; resuming mid-epoch redraws that epoch's shuffle
    from the state saved with the checkpoint and skips the steps already taken.
    """
    per_epoch = math.ceil(n / batch_size)
    step = start - start % per_epoch
    while step < total:
        epoch_rng = gen.get_state()
        order = torch.randperm(n, generator=gen)
        for first in range(0, n, batch_size):
            if step == total:
                return
            step += 1
            if step > start:
                yield step, order[first : first + batch_size], epoch_rng


def _fit(sae: SparseAutoencoder, opt: torch.optim.Optimizer, x: torch.Tensor, config: TopKTrainingConfig,
         gen: torch.Generator, total: int, state: _State, save) -> None:
    """Steps state.step+1..total; `save(state)` runs after every step (it decides whether to write)."""
    last_fired = state.last_fired.to(x.device)
    k_aux = config.auxk_k or max(1, sae.cfg.d_in // 2)
    batches = _batches(len(x), config.batch_size, gen, total, state.step)
    for step, idx, epoch_rng in progress(batches, desc="training SAE", total=total - state.step):
        xb = x[idx.to(x.device)]
        pre = sae.pre_activation(xb)
        f = topk_relu(pre, config.k)
        error = xb - sae.decode(f)
        loss = error.pow(2).sum(-1).mean()
        last_fired[(f > 0).any(0)] = step
        dead = step - last_fired >= config.dead_window
        if config.auxk_coef > 0 and dead.any():
            loss = loss + config.auxk_coef * _auxk_loss(sae, pre, dead, error.detach(), k_aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _remove_radial_grad(sae.W_dec)
        opt.step()
        with torch.no_grad():
            sae.W_dec.copy_(_unit_rows(sae.W_dec))
        state.step, state.last_fired = step, last_fired
        # the next step belongs to a new epoch when this one ended it: its shuffle is drawn from now on
        state.epoch_rng = gen.get_state() if step % math.ceil(len(x) / config.batch_size) == 0 else epoch_rng
        save(state)


def _auxk_loss(sae: SparseAutoencoder, pre: torch.Tensor, dead: torch.Tensor, error: torch.Tensor,
               k_aux: int) -> torch.Tensor:
    """How well the top dead latents reconstruct what the live ones missed (SAELens's scaled AuxK)."""
    n_dead = int(dead.sum())
    k = min(k_aux, n_dead)
    masked = pre.masked_fill(~dead, -torch.inf)
    values, indices = masked.topk(k, dim=-1, sorted=False)
    acts = torch.zeros_like(pre).scatter(-1, indices, values)
    scale = min(n_dead / k_aux, 1.0)  # fewer dead latents, smaller pull
    return scale * (acts @ sae.W_dec - error).pow(2).sum(-1).mean()


@torch.no_grad()
def _remove_radial_grad(w: nn.Parameter) -> None:
    """Drop the part of each decoder row's gradient along the row: it would only change its norm."""
    if w.grad is not None:
        unit = _unit_rows(w)
        w.grad -= (w.grad * unit).sum(-1, keepdim=True) * unit


# --- checkpoints ---------------------------------------------------------------------------------


def _run_key(activations: torch.Tensor, config: TopKTrainingConfig, metadata: Mapping[str, Any] | None) -> str:
    """Identity of a run's inputs: a checkpoint of other data or settings is never resumed from."""
    data = activations.detach().cpu().contiguous()
    digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
    return stable_hash({"config": dataclasses.asdict(config), "data": [digest, str(data.dtype), list(data.shape)],
                        "metadata": dict(metadata or {}), "format": _FORMAT})


def _checkpoint(ck: SaeCheckpointing | None, key: str, sae: SparseAutoencoder, opt: torch.optim.Optimizer,
                state: _State, started: float, total: int) -> None:
    """Every `ck.every` steps, and at the last step, the whole training state as tensors."""
    if ck is None or (state.step % ck.every and state.step != total):
        return
    tensors = {f"param.{name}": p.detach().cpu().contiguous().clone() for name, p in sae.named_parameters()}
    for index, entries in opt.state_dict()["state"].items():
        for name, value in entries.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous().clone()
    tensors["last_fired"] = state.last_fired.detach().cpu().contiguous().clone()
    tensors["rng.epoch"] = state.epoch_rng.clone()
    header = {"format": _FORMAT, "key": key, "step": state.step, "seconds": time.perf_counter() - started}
    remove_temp_files(ck.folder)
    atomic_save_tensors(ck.path, tensors, metadata={"state": json.dumps(header)})
    log.info("SAE checkpoint at step %d in %s", state.step, ck.folder)


def _resume(ck: SaeCheckpointing, key: str, sae: SparseAutoencoder, opt: torch.optim.Optimizer,
            gen: torch.Generator) -> _State | None:
    """Put the checkpoint's weights, optimiser and generator back; None when there is none to use."""
    read = read_sae_checkpoint(ck.path)
    if read is None:
        return None
    tensors, header = read
    if header.get("key") != key or header.get("format") != _FORMAT:
        log.warning("%s: a checkpoint of other data or settings; training afresh", ck.path)
        return None
    params = dict(sae.named_parameters())
    if {k.removeprefix("param.") for k in tensors if k.startswith("param.")} != set(params):
        raise InputError(f"{ck.path}: its weights do not match this SAE's; delete it to start over")
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(tensors[f"param.{name}"])
    saved: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, field = name.split(".", 2)
            saved.setdefault(int(index), {})[field] = value
    opt.load_state_dict({**opt.state_dict(), "state": saved})
    gen.set_state(tensors["rng.epoch"])
    log.info("resuming SAE training from the checkpoint at step %d", header["step"])
    return _State(int(header["step"]), tensors["last_fired"], tensors["rng.epoch"], float(header["seconds"]))


def read_sae_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Tensors and header of a checkpoint; None when there is none. Only safetensors is read, so a
    file planted in its place (a pickle that would run code) is refused, never executed."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads(handle.metadata()["state"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - any damage means the same thing to the user
        raise InputError(f"{path}: unreadable SAE checkpoint ({type(exc).__name__}); delete it to start over") from None
    return tensors, header


# --- one SAE folder, resumable -----------------------------------------------------------------


def checkpoint_folder(sae_folder: str | Path) -> Path:
    """Hidden beside the SAE folder: save_sae replaces only folders holding SAE files."""
    folder = Path(sae_folder)
    return folder.with_name(f".{folder.name}.checkpoint")


def train_sae_folder(activations: torch.Tensor, config: TopKTrainingConfig, folder: str | Path,
                     metadata: Mapping[str, Any] | None = None, checkpoint_every: int = 50,
                     extra: Mapping[str, Any] | None = None) -> tuple[SparseAutoencoder, SaeTrainingReport]:
    """Train (or resume) an SAE and save it with training.json into `folder`; the checkpoint goes
    only after the SAE is saved, so a kill at any point loses at most `checkpoint_every` steps."""
    from .sae import save_sae

    folder = Path(folder)
    checkpointing = SaeCheckpointing(checkpoint_folder(folder), checkpoint_every)
    sae, report = train_topk_sae(activations, config, metadata, checkpointing)
    save_sae(sae, folder)
    atomic_write_json(folder / "training.json", {**dataclasses.asdict(report), **dict(extra or {})})
    shutil.rmtree(checkpointing.folder, ignore_errors=True)
    return sae, report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spillover.sae_training",
                                     description="Train a TopK SAE on a model's token activations; resumable.")
    parser.add_argument("--model", required=True, help="a local transformers model folder, or 'organism'")
    parser.add_argument("--data", type=Path, required=True, help="chat JSONL whose tokens the SAE is trained on")
    parser.add_argument("--layer", type=int, required=True, help="block whose output (residual stream) is read")
    parser.add_argument("--out", type=Path, required=True, help="SAE folder (SAELens format) to write")
    parser.add_argument("--tokens", choices=["all", "assistant"], default="all")
    parser.add_argument("--max-tokens", type=int, default=200_000)
    parser.add_argument("--checkpoint-every", type=int, default=50, help="optimiser steps (default 50)")
    parser.add_argument("--cache", type=Path, default=None, help="organism cache folder")
    defaults = TopKTrainingConfig()
    for name in ("d_sae", "k", "steps", "epochs", "batch_size", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Collect the layer's token activations, train, save; a finished folder is reused as it is."""
    args = _parser().parse_args(argv)
    try:
        if (args.out / "training.json").exists():
            print(f"reused finished SAE: {args.out}")
            return 0
        from .activations import collect_tokens
        from .data import read_samples
        from .models import load_model

        loaded = load_model(args.model, args.cache, device="cpu")
        tokens = collect_tokens(loaded.model, loaded.tokenizer, read_samples(args.data), args.layer,
                                tokens=args.tokens, max_tokens=args.max_tokens)
        config = TopKTrainingConfig(**{f: getattr(args, f) for f in
                                       ("d_sae", "k", "steps", "epochs", "batch_size", "seed", "lr")})
        _, report = train_sae_folder(tokens, config, args.out, {"hook_layer": args.layer},
                                     args.checkpoint_every, {"tokens": len(tokens)})
    except SpilloverError as exc:
        print(f"spillover: error: {exc}", file=sys.stderr)
        return 2
    print(f"{report.steps} steps (resumed from {report.resumed_from}), FVU {report.fvu:.4f}: wrote {args.out}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
