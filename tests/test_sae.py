import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spillover.errors import ConfigError, InputError
from spillover.sae import (
    SaeConfig,
    SparseAutoencoder,
    TopKTrainingConfig,
    load_sae,
    sae_metrics,
    save_sae,
    train_topk_sae,
)


def hand_built(architecture: str, **cfg) -> SparseAutoencoder:
    """d_in 2, d_sae 3: W_enc columns e0, e1, e0 - e1; b_enc (0, -1, 0); b_dec (1, 1)."""
    k = 2 if architecture == "topk" else None
    sae = SparseAutoencoder(SaeConfig(2, 3, architecture, k, **cfg))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0, 0.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([1.0, 1.0]))
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.tensor([0.5, 1.5, -3.0]))
    return sae


def random_sae(architecture: str, d_in: int = 6, d_sae: int = 10, seed: int = 0, **cfg) -> SparseAutoencoder:
    k = 3 if architecture == "topk" else None
    sae = SparseAutoencoder(SaeConfig(d_in, d_sae, architecture, k, **cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return sae


# --- the maths on hand-built weights -----------------------------------------------------------


def test_standard_encode_is_relu_of_the_pre_activation_after_subtracting_b_dec():
    sae = hand_built("standard")
    x = torch.tensor([[3.0, 2.0], [1.0, 3.0]])
    # x - b_dec = (2, 1) and (0, 2); pre = (2, 0, 1) and (0, 1, -2)
    assert torch.equal(sae.pre_activation(x), torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, -2.0]]))
    assert torch.equal(sae.encode(x), torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))


def test_b_dec_is_not_subtracted_when_the_cfg_says_so():
    sae = hand_built("standard", apply_b_dec_to_input=False)
    assert torch.equal(sae.encode(torch.tensor([[1.0, 3.0]])), torch.tensor([[1.0, 2.0, 0.0]]))


def test_jumprelu_applies_relu_then_keeps_what_is_above_the_threshold():
    sae = hand_built("jumprelu")
    x = torch.tensor([[2.0, 3.0]])  # pre = (1, 1, -1): above thresholds (0.5, 1.5, -3) for latents 0 and 2
    assert torch.equal(sae.pre_activation(x), torch.tensor([[1.0, 1.0, -1.0]]))
    # latent 1 is under its threshold; latent 2 is above its threshold but not above zero
    assert torch.equal(sae.encode(x), torch.tensor([[1.0, 0.0, 0.0]]))


def test_topk_keeps_the_k_largest_and_relus_them():
    sae = hand_built("topk")
    x = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    pre = sae.pre_activation(x)
    assert torch.equal(pre, torch.tensor([[3.0, 1.0, 1.0], [-1.0, 0.0, -2.0]]))
    f = sae.encode(torch.tensor([[4.0, 2.0]]))  # pre = (3, 0, 2)
    assert torch.equal(f, torch.tensor([[3.0, 0.0, 2.0]]))
    assert torch.equal(sae.encode(x[1:]), torch.zeros(1, 3))  # nothing positive, nothing active


def test_topk_keeps_exactly_k_per_row():
    sae = random_sae("topk", d_in=8, d_sae=40)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive, so exactly k survive
    f = sae.encode(torch.randn(64, 8))
    assert ((f != 0).sum(-1) == 3).all()
    pre = sae.pre_activation(torch.randn(64, 8))
    kept = sae.activate(pre)
    assert torch.equal(kept.topk(3).values, pre.topk(3).values)


def test_encode_topk_gives_the_values_and_latents_that_encode_scatters():
    sae = random_sae("topk", d_in=8, d_sae=40)
    x = torch.randn(64, 8)
    values, latents = sae.encode_topk(x)
    assert values.shape == latents.shape == (64, 3)
    assert torch.equal(torch.zeros(64, 40).scatter(-1, latents, values), sae.encode(x))
    with pytest.raises(ConfigError, match="not 'topk'"):
        random_sae("standard", d_in=8, d_sae=40).encode_topk(x)


def test_decode_forward_and_directions():
    sae = hand_built("standard")
    f = torch.tensor([[1.0, 2.0, 0.0]])
    assert torch.equal(sae.decode(f), torch.tensor([[2.0, 5.0]]))
    assert torch.equal(sae(torch.tensor([[3.0, 2.0]])), sae.decode(sae.encode(torch.tensor([[3.0, 2.0]]))))
    dec = sae.decoder_directions()
    assert torch.allclose(dec, torch.tensor([[1.0, 0.0], [0.0, 1.0], [2**-0.5, 2**-0.5]]))
    enc = sae.encoder_directions()
    assert torch.allclose(enc, torch.tensor([[1.0, 0.0], [0.0, 1.0], [2**-0.5, -(2**-0.5)]]))
    assert torch.equal(sae.decoder_directions(normalize=False), sae.W_dec.detach())
    assert torch.equal(sae.encoder_directions(normalize=False), sae.W_enc.detach().T)


def test_rescale_acts_by_decoder_norm_ranks_and_decodes_with_the_decoder_norms():
    plain = random_sae("topk")
    scaled = random_sae("topk", rescale_acts_by_decoder_norm=True)
    x = torch.randn(5, 6)
    norms = plain.W_dec.norm(dim=-1)
    expected = plain.activate(plain.pre_activation(x) * norms)
    assert torch.allclose(scaled.encode(x), expected)
    assert torch.allclose(scaled.decode(expected), plain.decode(expected / norms))


def test_config_rejects_what_it_cannot_run():
    with pytest.raises(ConfigError, match="'standard', 'jumprelu', 'topk'"):
        SaeConfig(4, 8, "gated")
    with pytest.raises(ConfigError, match="sae.k"):
        SaeConfig(4, 8, "topk", k=9)
    with pytest.raises(ConfigError, match="sae_train.k"):
        TopKTrainingConfig(d_sae=8, k=0)


def test_metrics_known_answer():
    sae = SparseAutoencoder(SaeConfig(2, 2, "standard"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    m = sae_metrics(sae, x, batch_size=2)
    assert m.fvu == 0.0 and m.l0 == 1.0 and m.dead_fraction == 0.5
    with torch.no_grad():
        sae.W_dec.zero_()  # reconstruction is b_dec = 0: all variance unexplained, and then some
    assert sae_metrics(sae, x).fvu == pytest.approx((1 + 4 + 9) / 2)


# --- folders ----------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_save_load_round_trip_is_exact(tmp_path, architecture):
    metadata = {"hook_name": "blocks.3.hook_resid_post", "model_name": "organism"}
    sae = random_sae(architecture, apply_b_dec_to_input=architecture != "jumprelu", metadata=metadata)
    save_sae(sae, tmp_path / "sae")
    back = load_sae(tmp_path / "sae")
    assert back.cfg == sae.cfg
    assert back.state_dict().keys() == sae.state_dict().keys()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary folder left behind


def test_save_keeps_dtype_and_replaces_an_older_save(tmp_path):
    folder = save_sae(random_sae("topk", seed=1), tmp_path / "sae")
    newer = random_sae("topk", seed=2).to(torch.bfloat16)
    save_sae(newer, folder)
    back = load_sae(folder)
    assert back.W_enc.dtype == torch.bfloat16 and torch.equal(back.W_enc, newer.W_enc)
    assert load_sae(folder, dtype=torch.float32).W_enc.dtype == torch.float32


def test_save_refuses_to_replace_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an SAE folder"):
        save_sae(random_sae("standard"), tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_cfg_json_is_in_saelens_6_layout(tmp_path):
    folder = save_sae(random_sae("topk"), tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3 and cfg["d_in"] == 6 and cfg["d_sae"] == 10
    assert cfg["normalize_activations"] == "none" and cfg["dtype"] == "float32"
    assert isinstance(cfg["metadata"], dict) and cfg["sae_lens_version"].startswith("6.")
    shapes = {k: list(v.shape) for k, v in load_file(folder / "sae_weights.safetensors").items()}
    assert shapes == {"W_enc": [6, 10], "b_enc": [10], "W_dec": [10, 6], "b_dec": [6]}


def test_loads_a_gemma_scope_style_flat_config(tmp_path):
    """As SAELens's Gemma Scope loader writes it: flat keys, no b_dec subtraction, normalize None."""
    sae = hand_built("jumprelu", apply_b_dec_to_input=False)
    folder = tmp_path / "layer_3"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": 2, "d_sae": 3, "dtype": "float32", "model_name": "gemma-2-2b",
        "hook_name": "blocks.3.hook_resid_post", "hook_head_index": None, "activation_fn": "relu",
        "finetuning_scaling_factor": False, "sae_lens_training_version": None, "prepend_bos": True,
        "dataset_path": "monology/pile-uncopyrighted", "context_size": 1024,
        "dataset_trust_remote_code": True, "apply_b_dec_to_input": False, "normalize_activations": None,
    }))
    back = load_sae(folder)
    assert back.cfg.architecture == "jumprelu" and not back.cfg.apply_b_dec_to_input
    assert back.cfg.hook_name == "blocks.3.hook_resid_post"
    x = torch.tensor([[2.0, 3.0], [0.5, 2.0]])
    assert torch.equal(back.encode(x), sae.encode(x))


def test_loads_a_pre_6_topk_config(tmp_path):
    sae = random_sae("topk")
    folder = tmp_path / "old"
    folder.mkdir()
    tensors = {k: v.contiguous() for k, v in sae.state_dict().items()} | {"scaling_factor": torch.ones(10)}
    save_file(tensors, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
        "d_in": 6, "d_sae": 10, "dtype": "torch.float32", "hook_point": "blocks.1.hook_resid_pre",
        "normalize_activations": False, "sae_lens_version": "3.13.0",
    }))
    back = load_sae(folder)
    assert back.cfg.architecture == "topk" and back.cfg.k == 3
    assert back.cfg.hook_name == "blocks.1.hook_resid_pre"
    x = torch.randn(4, 6)
    assert torch.equal(back.encode(x), sae.encode(x))


def _edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _edit_weights(folder: Path, change) -> None:
    tensors = load_file(folder / "sae_weights.safetensors")
    change(tensors)
    save_file(tensors, folder / "sae_weights.safetensors")


BAD_FOLDERS = {
    "no cfg.json": (lambda f: (f / "cfg.json").unlink(), InputError, "no cfg.json"),
    "no weights": (lambda f: (f / "sae_weights.safetensors").unlink(), InputError,
                   "no sae_weights.safetensors"),
    "cfg not JSON": (lambda f: (f / "cfg.json").write_text("{oops"), InputError, "cfg.json: not valid JSON"),
    "weights not safetensors": (lambda f: (f / "sae_weights.safetensors").write_text("x"), InputError,
                                "sae_weights.safetensors: not a readable safetensors file"),
    "unknown architecture": (lambda f: _edit_cfg(f, architecture="gated"), ConfigError,
                             "cfg.json: architecture 'gated' is not supported; "
                             "choose 'standard', 'jumprelu', 'topk'"),
    "normalisation": (lambda f: _edit_cfg(f, normalize_activations="layer_norm"), ConfigError,
                      "cfg.json: normalize_activations 'layer_norm' is not supported"),
    "hook_z": (lambda f: _edit_cfg(f, reshape_activations="hook_z"), ConfigError, "reshape_activations"),
    "no d_in": (lambda f: _edit_cfg(f, d_in=None), InputError, "cfg.json: field d_in"),
    "no k": (lambda f: _strip_k(f), InputError, "needs field k"),
    "k too large": (lambda f: _edit_cfg(f, k=99), ConfigError, "cfg.json: sae.k: 99"),
    "d_sae wrong": (lambda f: _edit_cfg(f, d_sae=11), InputError,
                    "sae_weights.safetensors: W_enc has shape [6, 10] but cfg.json"),
    "missing tensor": (lambda f: _edit_weights(f, lambda t: t.pop("b_dec")), InputError,
                       "missing tensor(s) b_dec"),
    "extra tensor": (lambda f: _edit_weights(f, lambda t: t.update(threshold=torch.zeros(10))), InputError,
                     "unexpected tensor(s) threshold"),
    "NaN": (lambda f: _edit_weights(f, lambda t: t["W_dec"].__setitem__((0, 0), float("nan"))), InputError,
            "W_dec holds NaN or infinite values"),
    "inf": (lambda f: _edit_weights(f, lambda t: t["b_enc"].__setitem__(0, float("inf"))), InputError,
            "b_enc holds NaN or infinite values"),
}


def _strip_k(folder: Path) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["k"]
    (folder / "cfg.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    return save_sae(random_sae("topk"), tmp_path_factory.mktemp("good") / "sae")


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folders_fail_with_one_line_naming_the_file_and_field(tmp_path, good_folder, case):
    breaks, error, message = BAD_FOLDERS[case]
    folder = tmp_path / "sae"
    shutil.copytree(good_folder, folder)
    breaks(folder)
    with pytest.raises(error) as info:
        load_sae(folder)
    text = str(info.value)
    assert message in text and "\n" not in text and str(folder) in text


def test_jumprelu_without_threshold_is_refused(tmp_path):
    folder = save_sae(random_sae("jumprelu"), tmp_path / "sae")
    _edit_weights(folder, lambda t: t.pop("threshold"))
    with pytest.raises(InputError, match="missing tensor\\(s\\) threshold for architecture 'jumprelu'"):
        load_sae(folder)


# --- training ---------------------------------------------------------------------------------


def planted(n: int = 8000, d: int = 32, m: int = 64, active: int = 3, seed: int = 0):
    """Rows summing `active` of m unit directions in d dims, magnitudes in [0.5, 1.5], plus an offset."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(m, d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    which = torch.rand(n, m, generator=gen).argsort(1)[:, :active]
    codes = torch.zeros(n, m).scatter(1, which, torch.rand(n, active, generator=gen) + 0.5)
    return codes @ directions + 0.5, directions


@pytest.fixture(scope="module")
def planted_run():
    x, directions = planted()
    config = TopKTrainingConfig(d_sae=128, k=3, epochs=10, batch_size=256, seed=0)
    sae, report = train_topk_sae(x, config, metadata={"hook_name": "synthetic"})
    return x, directions, sae, report


def test_training_on_a_planted_dictionary_recovers_it(planted_run):
    x, directions, sae, report = planted_run
    assert report.fvu < 0.1
    assert report.l0 == pytest.approx(3.0)
    assert report.steps == 10 * (8000 // 256 + 1) and report.seconds > 0
    best = (directions @ sae.decoder_directions().T).max(dim=1).values
    assert best.mean() > 0.9
    norms = sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    m = sae_metrics(sae, x)
    assert (m.fvu, m.l0, m.dead_fraction) == (report.fvu, report.l0, report.dead_fraction)
    assert sae.cfg.hook_name == "synthetic" and sae.cfg.architecture == "topk" and sae.cfg.k == 3


def test_training_is_deterministic_for_a_seed():
    x, _ = planted(n=2000)
    config = TopKTrainingConfig(d_sae=64, k=3, steps=40, batch_size=128, dead_window=10, seed=7)
    first, report = train_topk_sae(x, config)
    second, _ = train_topk_sae(x, config)
    other, _ = train_topk_sae(x, dataclasses.replace(config, seed=8))
    assert report.steps == 40
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name
    assert not torch.equal(other.W_dec, first.W_dec)


def test_training_does_not_depend_on_the_scale_of_the_data():
    x, _ = planted(n=2000)
    config = TopKTrainingConfig(d_sae=64, k=3, steps=60, batch_size=128)
    _, small = train_topk_sae(x, config)
    _, large = train_topk_sae(x * 1000, config)
    assert large.fvu == pytest.approx(small.fvu, abs=1e-3)


def test_training_rejects_bad_activations():
    with pytest.raises(ConfigError, match="2-D"):
        train_topk_sae(torch.zeros(10), TopKTrainingConfig(d_sae=8, k=2))
    with pytest.raises(InputError, match="NaN"):
        train_topk_sae(torch.full((4, 3), float("nan")), TopKTrainingConfig(d_sae=8, k=2))


# --- agreement with SAELens itself, where it is installed ------------------------------------


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_saelens_reads_our_folders_and_we_read_its_folders(tmp_path, architecture):
    sae_lens = pytest.importorskip("sae_lens")
    ours = random_sae(architecture, d_in=16, d_sae=48, apply_b_dec_to_input=architecture != "jumprelu",
                      **({"rescale_acts_by_decoder_norm": True} if architecture == "topk" else {}))
    x = torch.randn(32, 16)
    theirs = sae_lens.SAE.load_from_disk(str(save_sae(ours, tmp_path / "ours")))
    assert theirs.cfg.architecture() == architecture
    assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-6)
    assert torch.allclose(theirs.decode(ours.encode(x)), ours.decode(ours.encode(x)), atol=1e-6)

    theirs.save_model(str(tmp_path / "theirs"))
    back = load_sae(tmp_path / "theirs")
    assert back.cfg.architecture == architecture
    assert back.cfg.apply_b_dec_to_input == ours.cfg.apply_b_dec_to_input
    assert torch.allclose(back.encode(x), theirs.encode(x), atol=1e-6)
    assert torch.allclose(back(x), theirs(x), atol=1e-6)


def test_registry_ids_fail_cleanly_when_not_in_the_local_cache(monkeypatch, tmp_path):
    from spillover.errors import ConfigError, InputError
    from spillover.sae import load_sae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="RELEASE/SAE_ID"):
        load_sae("sae_lens:no-sae-id")
    pytest.importorskip("sae_lens")
    with pytest.raises(InputError, match="gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical"):
        load_sae("sae_lens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
