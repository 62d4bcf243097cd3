"""Atomic file writes and content hashes: outputs are whole or absent, and caches key on content."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, InputError, OtherInputsError, SpilloverError


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
    """Write to a temporary file beside the target, then rename it into place.

    A failed write (full disk, file size limit) removes the temporary file and raises a
    SpilloverError naming `path`, so the file that was there before stays as it was.
    """
    path = Path(path)
    tmp = temp_beside(path)
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """safetensors file written beside `path` and renamed into place: whole or absent, never a pickle.

    Failures are handled as in `atomic_write_text`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    tmp = temp_beside(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_error(path: str | Path, exc: Exception) -> SpilloverError:
    """One line naming the file that could not be written and why (e.g. no space left)."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:  # safetensors: "Error while serializing: I/O error: File too large (os error 27)"
        reason = re.sub(r"\s*\(os error \d+\)$", "", str(exc).rpartition("error: ")[2])
    return SpilloverError(f"{path}: cannot write it ({reason or type(exc).__name__}); "
                          "what was on disk before is unchanged")


TEMP_SUFFIX = ".tmp"


def temp_beside(path: Path) -> Path:
    """An empty, uniquely named hidden file beside `path` (same file system, so rename is atomic)."""
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise write_error(path, exc) from None
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    os.close(fd)
    return Path(tmp)


def remove_temp_files(folder: str | Path) -> int:
    """Delete temporary files the atomic writers leave when a run is killed mid-write.

    Only hidden `.*.tmp` files are removed: they are never results, and a rerun writes them anew.
    Call it on a run folder, not on a folder other processes write to at the same time.
    """
    folder = Path(folder)
    removed = 0
    for tmp in folder.glob(f".*{TEMP_SUFFIX}") if folder.is_dir() else ():
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


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


def read_yaml_mapping(path: str | Path, valid_keys: Sequence[str], what: str,
                      types: dict[str, Any] | None = None) -> dict:
    """A YAML file holding one mapping whose keys are all in `valid_keys`; errors name the file
    and the key's line. `types` (key -> type hint, as a dataclass declares it) checks each value
    here, so a wrong type fails at once, naming the field, rather than hours into a run."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: a folder, not a {what} file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    raw, lines = _yaml_mapping(text, path, what)

    def at(key: Any) -> str:
        return f"{path}:{lines[str(key)]}" if str(key) in lines else str(path)

    unknown = sorted(set(raw) - set(valid_keys), key=str)
    if unknown:
        raise ConfigError(f"{at(unknown[0])}: unknown key {unknown[0]!r}; valid keys: {', '.join(valid_keys)}")
    for key, hint in (types or {}).items():
        if key in raw and not _matches(raw[key], hint):
            from .errors import shown

            raise ConfigError(f"{at(key)}: field {key!r}: expected {_described(hint)}, got {shown(raw[key])}")
    return raw


def _yaml_mapping(text: str, path: Path, what: str) -> tuple[dict, dict[str, int]]:
    """The mapping, and the 1-based line of each top-level key (by its text as written)."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}{line}: invalid YAML ({problem})") from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of {what} settings")
    return raw, {str(k.value): k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a type hint; a list hint also takes one bare value."""
    import math
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (tuple, list):
        items = value if isinstance(value, list) else [value]
        return all(_matches(v, args[0] if args else Any) for v in items)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True  # other hints are left to the config's own checks


def _described(hint: Any, plural: bool = False) -> str:
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_described(a, plural) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {_described(args[0], True) if args else 'values'} (or just one)"
    names = {str: ("text", "texts"), int: ("a whole number", "whole numbers"), float: ("a number", "numbers"),
             bool: ("true or false", "true/false values"), type(None): ("null", "nulls"),
             dict: ("a mapping", "mappings")}
    name = names.get(origin or hint)
    return name[plural] if name else getattr(hint, "__name__", str(hint))


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
        raise OtherInputsError(f"{path}: {path.parent} holds a {what} with other inputs ({', '.join(differ)} "
                               "differ); choose another output folder or delete it", differ)
    return manifest
