"""Atomic file writes and content hashes: outputs are whole or absent, and caches key on content."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, InputError


def ensure_dir(path: str | Path) -> Path:
    """Create an output folder, or raise a one-line error if it cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create output folder ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{path}: output folder is not writable")
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write to a temporary file beside the target, then rename it into place."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (dataclasses go through asdict first)."""
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def read_yaml_mapping(path: str | Path, valid_keys: Sequence[str], what: str) -> dict:
    """A YAML file holding one mapping whose keys are all in `valid_keys`; errors name the file."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what} file") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of {what} settings")
    unknown = sorted(set(raw) - set(valid_keys))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(valid_keys)}")
    return raw


def matching_manifest(path: str | Path, inputs: dict, what: str) -> dict | None:
    """The manifest at `path` when its recorded inputs equal `inputs`; None when there is none.

    A manifest from other inputs is an error naming what differs, so a folder is never reused
    (or overwritten) for a different job.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        previous = manifest["inputs"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path}: unreadable manifest; delete the folder to run the {what} again") from None
    if previous != inputs:
        differ = [k for k in inputs if previous.get(k) != inputs[k]]
        raise ConfigError(f"{path}: {path.parent} holds a {what} with other inputs ({', '.join(differ)} differ); "
                          "choose another output folder or delete it")
    return manifest
