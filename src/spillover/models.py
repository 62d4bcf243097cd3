"""Which model a stage runs on: a local `transformers` folder or the word `organism`.

Every stage names its model the same way, and records a cheap fingerprint of it in its
manifest, so a rerun can tell whether the model under a name has changed without loading it.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError
from .io import stable_hash

log = logging.getLogger(__name__)

ORGANISM = "organism"
_SMALL_FILE = 1 << 20
"""Files up to this size (configs, tokenizers) are hashed whole; larger ones by name and size."""


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for a stage, with the tokenizer that goes with it."""

    model: torch.nn.Module
    tokenizer: object
    spec: str
    """What the user named: a folder, or `organism`."""
    fingerprint: str
    """sha256 identifying the weights (and adapter, if any) without reading every byte."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks so large files need no memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(folder: str | Path) -> str:
    """Small files by content, large ones (weights) by name and size: cheap, and enough to notice
    a different model or an edited config under the same path."""
    folder = Path(folder)
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        content = sha256_file(path) if size <= _SMALL_FILE else None
        entries.append((path.relative_to(folder).as_posix(), size, content))
    return stable_hash(entries)


def model_fingerprint(spec: str, cache_dir: str | Path | None = None) -> str:
    """The fingerprint of the model `spec` names, without loading it."""
    if spec == ORGANISM:
        from .organism.model import OrganismConfig

        return stable_hash({"organism": OrganismConfig().cache_key()})
    return folder_fingerprint(_model_folder(spec))


def load_model(
    spec: str,
    cache_dir: str | Path | None = None,
    adapter: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> LoadedModel:
    """Load `spec` (a local HF folder or `organism`), with a LoRA adapter merged in if given.

    `cache_dir` is the organism's cache folder; `device` defaults to CUDA when there is one; `dtype`
    (a torch dtype name) casts the weights, which otherwise keep the checkpoint's precision.
    """
    if spec == ORGANISM:
        from .organism.model import load_organism

        organism = load_organism(cache_dir=cache_dir)
        model, tokenizer = organism.model, organism.tokenizer
    else:
        model, tokenizer = _load_folder(_model_folder(spec))
    fingerprint = model_fingerprint(spec, cache_dir)
    if adapter is not None:
        from .finetune import adapter_folder, apply_adapter

        folder = adapter_folder(adapter)
        model = apply_adapter(model, folder)
        fingerprint = stable_hash({"base": fingerprint, "adapter": folder_fingerprint(folder)})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    if dtype is not None:  # e.g. bfloat16 for scoring on a GPU
        model.to(getattr(torch, dtype))
    return LoadedModel(model, tokenizer, spec, fingerprint)


def _model_folder(spec: str) -> Path:
    """A local transformers folder for `spec`: itself, or a GGUF / packaged model converted once."""
    from .gguf import PACKAGED, converted_folder, resolve_gguf

    gguf = resolve_gguf(spec)
    if gguf is not None:
        return converted_folder(gguf)
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--model {spec}: not a folder with a config.json; give a local transformers model "
                          f"folder, a .gguf file, '{ORGANISM}' or one of: {', '.join(PACKAGED)}")
    return folder


def _load_folder(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("loading %s", folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    except pickle.UnpicklingError:  # transformers reads .bin weights with weights_only=True
        raise ConfigError(f"--model {folder}: refused its pickled weights (loading them could run code); "
                          "convert them to safetensors") from None
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"--model {folder}: cannot load it with transformers ({reason})") from None
    return model, tokenizer
