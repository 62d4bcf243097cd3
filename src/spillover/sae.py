"""Sparse autoencoders: SAELens-format folders, encode/decode, directions, and a small TopK trainer.

Weights are named and shaped as SAELens stores them (`W_enc [d_in, d_sae]`, `b_enc [d_sae]`,
`W_dec [d_sae, d_in]`, `b_dec [d_in]`, and `threshold [d_sae]` for JumpReLU) in a folder holding
`cfg.json` and `sae_weights.safetensors`, so SAELens folders (Gemma Scope as SAELens converts it,
SAELens 6 `save_model`, pre-6 flat configs) load as they are and ours load in SAELens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ConfigError, InputError, shown
from .io import ensure_dir

log = logging.getLogger(__name__)

ARCHITECTURES = ("standard", "jumprelu", "topk")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT = "6.0.0"
"""Written as `sae_lens_version` so SAELens reads our cfg.json as its 6.x layout (nested metadata)."""

_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
_METADATA_KEYS = (  # flat keys of pre-6 SAELens configs that describe where the SAE reads
    "model_name", "hook_name", "hook_layer", "hook_head_index", "model_class_name",
    "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens", "neuronpedia_id",
    "context_size", "seqpos_slice", "dataset_path",
    "sae_lens_version", "sae_lens_training_version", "hf_hook_name",
)


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(repr(v) for v in values)


@dataclass(frozen=True)
class SaeConfig:
    """The shape and behaviour of an SAE, as SAELens records them in cfg.json."""

    d_in: int
    """Width of the activations read: the model's hidden size for a residual-stream SAE."""
    d_sae: int
    """Number of latents (dictionary size)."""
    architecture: str = "topk"
    """'standard' (ReLU), 'jumprelu' (ReLU gated by a per-latent threshold) or 'topk' (k largest per row)."""
    k: int | None = None
    """Latents kept per row; TopK only."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec before encoding: SAELens's default; Gemma Scope sets it False."""
    rescale_acts_by_decoder_norm: bool = False
    """TopK only (SAELens 6): rank pre-activations times decoder row norms, and divide them out in decode."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """SAELens metadata (model_name, hook_name, ...), kept as read so that folders round-trip."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"sae.architecture: {self.architecture!r}; choose {_choices(ARCHITECTURES)}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ConfigError(f"sae.d_in and sae.d_sae must be at least 1 (got {self.d_in}, {self.d_sae})")
        if self.architecture == "topk" and (self.k is None or not 1 <= self.k <= self.d_sae):
            raise ConfigError(f"sae.k: {self.k!r}; architecture 'topk' needs 1 <= k <= d_sae ({self.d_sae})")
        if self.architecture != "topk" and (self.k is not None or self.rescale_acts_by_decoder_norm):
            raise ConfigError(f"sae.k and sae.rescale_acts_by_decoder_norm apply to 'topk' only, "
                              f"not {self.architecture!r}")

    @property
    def hook_name(self) -> str | None:
        return self.metadata.get("hook_name")


class SparseAutoencoder(nn.Module):
    """An SAE with SAELens's parameter names and maths; weights start at zero (load or train them)."""

    def __init__(
        self, cfg: SaeConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__()
        self.cfg = cfg
        empty = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **empty))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **empty))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, **empty))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **empty))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, **empty))

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def k(self) -> int | None:
        return self.cfg.k

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [..., d_sae]; the input is cast to the weights' dtype, as SAELens does."""
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Latent activations from pre-activations, per architecture."""
        if self.cfg.architecture == "standard":
            return pre.relu()
        if self.cfg.architecture == "jumprelu":  # SAELens: ReLU, then zero what is not above the threshold
            return pre.relu() * (pre > self.threshold).to(pre.dtype)
        return topk_relu(pre, self.cfg.k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae] of activations x [..., d_in]."""
        return self.activate(self.pre_activation(x))

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A TopK SAE's activations as (values, latent indices) [..., k]: what `encode` scatters
        into d_sae columns, for callers that only sum them and need no [..., d_sae] of zeros."""
        if self.cfg.architecture != "topk":
            raise ConfigError(f"encode_topk: the SAE is {self.cfg.architecture!r}, not 'topk'")
        values, indices = self.pre_activation(x).topk(self.cfg.k, dim=-1, sorted=False)
        return values.relu(), indices

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d_in] = f @ W_dec + b_dec."""
        if self.cfg.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def decoder_directions(self, normalize: bool = True) -> torch.Tensor:
        """Rows of W_dec [d_sae, d_in], unit-normalised unless asked otherwise."""
        return _unit_rows(self.W_dec.detach()) if normalize else self.W_dec.detach().clone()

    @torch.no_grad()
    def encoder_directions(self, normalize: bool = True) -> torch.Tensor:
        """Columns of W_enc as rows [d_sae, d_in], unit-normalised unless asked otherwise."""
        rows = self.W_enc.detach().T
        return _unit_rows(rows) if normalize else rows.clone()


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest pre-activations of each row, ReLU'd; zero elsewhere (SAELens's TopK)."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


# --- folders on disk ------------------------------------------------------------------------


def load_sae(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> SparseAutoencoder:
    """Load an SAELens-format folder (cfg.json + sae_weights.safetensors); dtype defaults to cfg.json's.

    `sae_lens:RELEASE/SAE_ID` names an SAE of SAELens's registry instead (e.g.
    `sae_lens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical`); it needs sae-lens and
    the weights already in the local Hugging Face cache, since nothing is downloaded.
    """
    if str(folder).startswith(REGISTRY_PREFIX):
        return _load_from_registry(str(folder), device, dtype)
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg, stored_dtype = _parse_cfg(_read_json(cfg_path), cfg_path)
    if not weights_path.is_file():
        raise InputError(f"{folder}: no {WEIGHTS_FILE} beside {CFG_FILE}")
    tensors = _read_weights(weights_path, cfg)
    sae = SparseAutoencoder(cfg, dtype=dtype or stored_dtype, device=device)
    with torch.no_grad():
        for name, tensor in tensors.items():
            getattr(sae, name).copy_(tensor)
    sae.source = str(cfg_path)
    log.info("%s: loaded %s SAE, d_in %d, d_sae %d", folder, cfg.architecture, cfg.d_in, cfg.d_sae)
    return sae


REGISTRY_PREFIX = "sae_lens:"


def _load_from_registry(spec: str, device, dtype) -> SparseAutoencoder:
    """Let SAELens resolve a registry id offline, save it in its own format, and load that folder."""
    release, _, sae_id = spec.removeprefix(REGISTRY_PREFIX).partition("/")
    if not release or not sae_id:
        raise ConfigError(f"{spec}: expected sae_lens:RELEASE/SAE_ID")
    try:
        from sae_lens import SAE
    except ImportError:
        raise ConfigError(f"{spec}: SAELens registry ids need sae-lens (pip install sae-lens)") from None
    try:
        loaded = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as exc:  # SAELens raises many kinds; all mean "not available offline"
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"{spec}: SAELens could not load it from the local cache ({reason})") from None
    sae = loaded[0] if isinstance(loaded, tuple) else loaded
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_model(tmp)
        ours = load_sae(tmp, device, dtype)
    ours.source = spec
    return ours


def check_fits(sae: Any, model: Any, layer: int) -> None:
    """An SAE reads the residual stream, so its d_in must be the model's hidden size. Checked before
    any forward pass: otherwise the mismatch surfaces as a matrix shape error deep inside collection.
    Objects without a `cfg.d_in`, and models without input embeddings, are not checked."""
    d_in = getattr(getattr(sae, "cfg", None), "d_in", None)
    width = _hidden_size(model)
    if d_in is None or width is None or d_in == width:
        return
    where = getattr(sae, "source", None) or f"the SAE for layer {layer}"
    raise ConfigError(f"{where}: field d_in: {d_in} does not match the hidden size {width} of the model "
                      f"it is attached to at layer {layer} (was this SAE trained on another model?)")


def _hidden_size(model: Any) -> int | None:
    """Residual-stream width: the width of the input embeddings, for every decoder-only model supported."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[-1]) if weight is not None and weight.ndim == 2 else None


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write cfg.json and sae_weights.safetensors into a temporary folder beside `folder`, then swap it in."""
    folder = Path(folder)
    if folder.exists() and not _is_replaceable(folder):
        raise ConfigError(f"{folder}: exists and is not an SAE folder; refusing to overwrite it")
    ensure_dir(folder.parent)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        tensors = {name: p.detach().cpu().contiguous() for name, p in sae.named_parameters()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CFG_FILE).write_text(json.dumps(_cfg_dict(sae), indent=2) + "\n", encoding="utf-8")
        for path in (tmp / WEIGHTS_FILE, tmp / CFG_FILE):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _is_replaceable(folder: Path) -> bool:
    """Only a folder of SAE files may be replaced, so a wrong path never deletes other work."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else {None}
    return names <= {CFG_FILE, WEIGHTS_FILE, "sparsity.safetensors"}


def _swap_in(tmp: Path, folder: Path) -> None:
    """os.replace cannot replace a non-empty folder, so the old one is renamed aside first."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
        os.replace(folder, old / folder.name)
    try:
        os.replace(tmp, folder)
    except OSError:
        if old is not None:  # put the previous save back rather than leave nothing
            os.replace(old / folder.name, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _cfg_dict(sae: SparseAutoencoder) -> dict[str, Any]:
    """cfg.json in SAELens 6's layout (SAEConfig.to_dict): shape and flags at top level, metadata nested."""
    cfg = sae.cfg
    dtype = {v: k for k, v in _DTYPES.items()}.get(sae.W_enc.dtype)
    if dtype is None:
        raise ConfigError(f"sae dtype {sae.W_enc.dtype} cannot be saved; choose {_choices(tuple(_DTYPES))}")
    out: dict[str, Any] = {
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if cfg.architecture == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm)
    out["metadata"] = dict(cfg.metadata)
    out["sae_lens_version"] = SAELENS_FORMAT
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: no such SAE folder")
    if not path.is_file():
        raise InputError(f"{path.parent}: no {CFG_FILE}; an SAE folder holds {CFG_FILE} and {WEIGHTS_FILE}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # nesting or numbers Python will not parse
        raise InputError(f"{path}: not valid JSON ({str(exc)[:80] or 'nested too deeply'})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object")
    return raw


def _parse_cfg(raw: dict[str, Any], path: Path) -> tuple[SaeConfig, torch.dtype]:
    """SaeConfig and stored dtype from any SAELens cfg.json layout (flat pre-6, nested 6.x)."""
    _check_supported(raw, path)
    arch = raw.get("architecture", "standard")
    activation = raw.get("activation_fn", raw.get("activation_fn_str"))
    for name, value in (("architecture", arch), ("activation_fn", activation)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{path}: field {name} must be text, got {shown(value)}")
    if arch == "standard" and activation == "topk":  # pre-6 SAELens wrote TopK SAEs this way
        arch = "topk"
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{path}: architecture {arch!r} is not supported; choose {_choices(ARCHITECTURES)}")
    if activation not in (None, "relu", "topk"):
        raise ConfigError(f"{path}: activation_fn {activation!r} is not supported; choose 'relu' or 'topk'")
    dtype_name = str(raw.get("dtype", "float32")).removeprefix("torch.")
    if dtype_name not in _DTYPES:
        choices = _choices(tuple(_DTYPES))
        raise ConfigError(f"{path}: dtype {shown(raw.get('dtype'))} is not supported; choose {choices}")
    topk = arch == "topk"
    rescale = topk and _bool_field(raw, "rescale_acts_by_decoder_norm", False, path)
    try:
        cfg = SaeConfig(
            d_in=_int_field(raw, "d_in", path),
            d_sae=_int_field(raw, "d_sae", path),
            architecture=arch,
            k=_topk_k(raw, path) if topk else None,
            apply_b_dec_to_input=_bool_field(raw, "apply_b_dec_to_input", True, path),
            rescale_acts_by_decoder_norm=rescale,
            metadata=_metadata(raw),
        )
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg, _DTYPES[dtype_name]


def _check_supported(raw: dict[str, Any], path: Path) -> None:
    """Settings SAELens knows but this module does not implement are refused, never ignored."""
    norm = raw.get("normalize_activations", "none")
    if norm is None or norm is False:  # older SAELens wrote a flag; True meant this scaling
        norm = "none"
    elif norm is True:
        norm = "expected_average_only_in"
    if norm != "none":
        raise ConfigError(f"{path}: normalize_activations {shown(norm)} is not supported; only 'none' "
                          "(fold an input scaling into the weights first)")
    reshape = raw.get("reshape_activations", "none")
    if reshape != "none":
        raise ConfigError(f"{path}: reshape_activations {shown(reshape)} is not supported; only 'none'")
    if raw.get("finetuning_scaling_factor"):
        raise ConfigError(f"{path}: finetuning_scaling_factor is not supported; only false")


def _int_field(raw: dict[str, Any], name: str, path: Path) -> int:
    """Whole numbers, also as SAELens sometimes writes them (64.0); never NaN, infinity or text."""
    value = raw.get(name)
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise InputError(f"{path}: field {name} must be a whole number, got {shown(value)}")
    return int(value)


def _bool_field(raw: dict[str, Any], name: str, default: bool, path: Path) -> bool:
    """A flag is true or false: the text "false" would otherwise read as true."""
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise InputError(f"{path}: field {name} must be true or false, got {shown(value)}")
    return value


def _topk_k(raw: dict[str, Any], path: Path) -> int:
    """k sits at top level in SAELens 6, under activation_fn_kwargs before."""
    if "k" in raw:
        return _int_field(raw, "k", path)
    kwargs = raw.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise InputError(f"{path}: field activation_fn_kwargs must be an object, got {shown(kwargs)}")
    if "k" not in kwargs:
        raise InputError(f"{path}: architecture 'topk' needs field k (or activation_fn_kwargs.k)")
    return _int_field(kwargs, "k", path)


def _metadata(raw: dict[str, Any]) -> dict[str, Any]:
    nested = raw.get("metadata", raw.get("meta"))
    if isinstance(nested, dict):
        return dict(nested)
    flat = {"hook_name": raw["hook_point"]} if "hook_point" in raw else {}
    flat.update({key: raw[key] for key in _METADATA_KEYS if key in raw})
    return flat


def _read_weights(path: Path, cfg: SaeConfig) -> dict[str, torch.Tensor]:
    """Tensors by name, checked against cfg.json for names, shapes and finite values."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from None
    scaling = tensors.pop("scaling_factor", None)  # older SAELens saved an all-ones one
    if scaling is not None and not torch.all(scaling == 1):
        raise ConfigError(f"{path}: scaling_factor other than 1 is not supported (finetuning_scaling_factor)")
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (cfg.d_sae,)
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    arch = cfg.architecture
    if missing:
        raise InputError(f"{path}: missing tensor(s) {', '.join(missing)} for architecture {arch!r}")
    if extra:
        raise InputError(f"{path}: unexpected tensor(s) {', '.join(extra)} for architecture {arch!r}")
    for name, shape in shapes.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise InputError(f"{path}: {name} has shape {list(got)} but cfg.json (d_in {cfg.d_in}, "
                             f"d_sae {cfg.d_sae}) implies {list(shape)}")
        if not torch.isfinite(tensors[name]).all():
            raise InputError(f"{path}: {name} holds NaN or infinite values")
    return tensors


# --- quality on data ------------------------------------------------------------------------


@dataclass(frozen=True)
class SaeMetrics:
    fvu: float
    """Fraction of variance unexplained: sum |x - x_hat|^2 / sum |x - mean(x)|^2."""
    l0: float
    """Mean number of active latents per row."""
    dead_fraction: float
    """Share of latents that fire on no row."""


@torch.no_grad()
def sae_metrics(sae: SparseAutoencoder, activations: torch.Tensor, batch_size: int = 8192) -> SaeMetrics:
    """Reconstruction quality and sparsity of `sae` on activations [n, d_in], in batches."""
    x_all = _check_activations(activations, sae.cfg.d_in)
    chunks = range(0, len(x_all), batch_size)
    mean = sum(x_all[s : s + batch_size].double().sum(0) for s in chunks) / len(x_all)
    sse = sst = active = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x_all.device)
    for start in chunks:
        x = x_all[start : start + batch_size]
        f = sae.encode(x)
        sse += (x.double() - sae.decode(f).double()).pow(2).sum().item()
        sst += (x.double() - mean).pow(2).sum().item()
        nonzero = f != 0
        active += nonzero.sum().item()
        fired |= nonzero.any(0).to(fired.device)
    return SaeMetrics(
        fvu=sse / sst if sst > 0 else float("nan"),
        l0=active / len(x_all),
        dead_fraction=1.0 - fired.float().mean().item(),
    )


def _check_activations(activations: torch.Tensor, d_in: int | None = None) -> torch.Tensor:
    if not isinstance(activations, torch.Tensor) or activations.ndim != 2 or len(activations) == 0:
        raise ConfigError("activations must be a non-empty 2-D tensor [n, d_in]")
    if d_in is not None and activations.shape[1] != d_in:
        raise ConfigError(f"activations have width {activations.shape[1]} but the SAE reads d_in {d_in}")
    if not torch.isfinite(activations).all():
        raise InputError("activations hold NaN or infinite values")
    return activations


# --- training lives in spillover.sae_training; its names stay importable from here -------------

_TRAINING_NAMES = ("TopKTrainingConfig", "SaeTrainingReport", "train_topk_sae", "geometric_median")


def __getattr__(name: str):
    """Lazy, because sae_training imports this module: `from spillover.sae import train_topk_sae`
    keeps working without an import cycle."""
    if name in _TRAINING_NAMES:
        from . import sae_training

        return getattr(sae_training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
