"""Benchmark: per-sample risk scoring, spillover's path against the usual ways, same model and samples.

Not a test. Every variant computes the same `spillover` score (pooled mean SAE features of the
assistant tokens, weighted by each feature's cosine to the nearest toxic feature, over the sum of
the pooled features) for the same samples, at one layer:

- spillover: `spillover.score_stream.ScoreStream`: tokenised chunk by chunk in a background thread,
  length-batched under a token budget, forward stopped after the layer, only assistant tokens
  SAE-encoded, pooled and scored per batch.
- saelens_tl: the notebook way: a TransformerLens `HookedTransformer` holding the same weights,
  fixed-size batches in input order padded to their longest sample, `run_with_cache` at
  `blocks.L.hook_resid_post` (a full forward, logits included), an SAELens `SAE.encode` of the whole
  [batch, seq, d] cache, then mask, mean-pool and score.
- saelens_tl_stop: the same with `stop_at_layer=L + 1`, a fairer extra row.
- transformers: a plain `transformers` forward with `output_hidden_states=True`, fixed batches,
  spillover's SAE encode of every position, mask, pool, score.

CPU mode (the default without CUDA) runs the organism and SmolLM2-135M-Instruct at 1x and 10x the
base sample count; each variant and size runs in a fresh worker subprocess whose RSS high-water
mark is reset after setup (see bench/_measure.py and bench/README.md). It reports samples/s,
tokens/s (real, non-pad tokens), peak RSS above setup, the ratios spillover / other, the memory
growth from 1x to 10x, the residual check of the HookedTransformer against the HF model, and the
largest score difference between variants.

GPU mode (`--device cuda`, the default with CUDA) runs the spillover path on random-weight bf16
models built from the configs of Gemma 2 2B and Llama 3.1 8B, with random TopK SAEs of width 16k
and 65k at a middle layer, on synthetic token sequences of 256 to 512 tokens, and reports tokens/s,
peak device memory and the achieved share of the device's bf16 dense peak for the forward pass up to
the layer. `--tiny` runs that code path on CPU with tiny versions of the configs.

`--project` prints the internet-scale cost projection of docs/performance.md from the FLOPs formula.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

from _measure import ROOT, machine_info, page_in, peak_kb, reset_peak, run_worker, status_kb

VARIANTS = ("spillover", "saelens_tl", "saelens_tl_stop", "transformers")
SCALE = 10
WARMUP = 8
"""Samples scored once before measuring, so lazy initialisation is outside the figures."""
MAX_LENGTH = 1024
"""Tokens kept per sample, in every variant (StreamConfig's default)."""
TOP_K = 32
"""Active latents per token of the benchmark SAEs."""
N_TOXIC = 100


@dataclass(frozen=True)
class CpuModel:
    """A model of the CPU run and its defaults."""

    n: int
    layer: int
    d_sae: int
    token_budget: int
    batch_size: int
    chunk_size: int


CPU_MODELS = {
    "organism": CpuModel(n=256, layer=1, d_sae=1024, token_budget=8192, batch_size=64, chunk_size=256),
    "smollm2-135m-instruct": CpuModel(n=32, layer=14, d_sae=16384, token_budget=2048, batch_size=16,
                                      chunk_size=32),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="folder for bench.json")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cpu: the organism and SmolLM2 against the usual ways; cuda: the large configs")
    p.add_argument("--models", default=",".join(CPU_MODELS), help="CPU mode: comma-separated models")
    p.add_argument("--n", type=int, help="CPU mode: base samples per model (runs at 1x and 10x)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="CPU mode: comma-separated variants")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per variant and size; the fastest counts")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples, the SAE and the toxic set")
    p.add_argument("--data", type=Path, default=default_data(),
                   help="folder of model-organisms/{bad,good}_medical_advice.jsonl.gz (SmolLM2's samples)")
    p.add_argument("--tiny", action="store_true", help="GPU mode's code path on CPU with tiny configs")
    p.add_argument("--gpu-n", type=int, default=2048, help="GPU mode: samples per measurement")
    p.add_argument("--gpu-token-budget", type=int, default=32768, help="GPU mode: padded tokens per batch")
    p.add_argument("--project", action="store_true", help="print the internet-scale projection and exit")
    p.add_argument("--mfu", type=float, default=0.4, help="--project: assumed share of the bf16 peak")
    p.add_argument("--batch-size", help="CPU mode: the usual ways' batch size (default per model)")
    p.add_argument("--token-budget", help="CPU mode: spillover's padded tokens per batch (default per model)")
    p.add_argument("--chunk-size", help="CPU mode: spillover's samples per chunk (default per model)")
    for hidden in ("--worker", "--model", "--layer", "--sae", "--toxic", "--save"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1 or (args.n is not None and args.n < WARMUP):
        p.error(f"--repeat must be at least 1 and --n at least {WARMUP}")
    return args


def default_data() -> Path:
    """$SPILLOVER_SHARED_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("SPILLOVER_SHARED_DATA") or ROOT.parent / "shared" / "data")


# --- samples, SAE and reference -----------------------------------------------------------------


def load_samples(model: str, n: int, seed: int, data: Path) -> list:
    """n samples, half inducing (bad) and half aligned (good), interleaved."""
    if model == "organism":
        from spillover.organism.datasets import finetune_set
        from spillover.organism.model import load_organism

        world = load_organism().world
        halves = [finetune_set(world, name, (n + 1) // 2, seed) for name in ("inducing", "aligned")]
    else:
        from spillover.data import read_samples

        folder = data / "model-organisms"
        halves = [read_samples(folder / f"{kind}_medical_advice.jsonl.gz") for kind in ("bad", "good")]
    mixed = [s for pair in zip(*halves) for s in pair]
    if len(mixed) < n:
        sys.exit(f"{model}: only {len(mixed)} samples available, asked for {n}")
    return mixed[:n]


def random_sae(d_in: int, d_sae: int, seed: int, hook_name: str):
    """A random TopK SAE (unit decoder rows, encoder their transpose): for speed, weights don't matter."""
    import torch

    from spillover.sae import SaeConfig, SparseAutoencoder

    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in, d_sae, "topk", TOP_K, metadata={"hook_name": hook_name}))
    with torch.no_grad():
        directions = torch.randn(d_sae, d_in, generator=gen)
        sae.W_dec.copy_(directions / directions.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


def toxic_set(d_sae: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(d_sae), min(N_TOXIC, d_sae)))


def reference_of(sae, toxic: Sequence[int]):
    from spillover.scoring import ToxicReference

    return ToxicReference(sae.W_dec.detach().float().cpu(), tuple(toxic))


# --- the variants (CPU mode, inside a worker) ---------------------------------------------------


Runner = Callable[[Sequence], list]
"""Scores a list of samples: the timed call of a variant."""


def spillover_runner(loaded, sae_folder: Path, reference, args) -> Runner:
    from spillover.sae import load_sae
    from spillover.score_stream import ScoreStream, StreamConfig

    config = StreamConfig(token_budget=int(args.token_budget), chunk_size=int(args.chunk_size),
                          max_length=MAX_LENGTH)
    stream = ScoreStream(loaded.model, loaded.tokenizer, load_sae(sae_folder), int(args.layer), reference,
                         "spillover", config)

    def run(samples: Sequence) -> list:
        indices = range(-(-len(samples) // config.chunk_size))
        return [s for chunk in stream.chunks(samples, indices) for s in stream.score_chunk(chunk)]

    return run


def fixed_batches(tokenizer, samples: Sequence, batch_size: int):
    """The usual loop: tokenise everything up front, then batches in input order padded to their longest."""
    from spillover.data import encode_samples

    encoded = encode_samples(tokenizer, samples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(encoded), batch_size):
        yield [s.id for s in samples[start : start + batch_size]], padded(encoded[start : start + batch_size], pad)


def padded(chunk, pad_id: int):
    """Right-padded ids, attention mask and assistant-token mask, truncated to MAX_LENGTH."""
    import torch

    width = min(max(len(e.input_ids) for e in chunk), MAX_LENGTH)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    select = torch.zeros((len(chunk), width), dtype=torch.bool)
    for row, e in enumerate(chunk):
        n = min(len(e.input_ids), width)
        ids[row, :n] = torch.tensor(e.input_ids[:n])
        attention[row, :n] = 1
        select[row, :n] = torch.tensor(e.assistant_mask[:n], dtype=torch.bool)
    return ids, attention, select


def pool_and_score(features, select, ids: list[str], reference) -> list:
    """Mean features over the assistant tokens of each sample, then the spillover score."""
    from spillover.scoring import score_samples

    keep = select.unsqueeze(-1)
    pooled = (features.float() * keep).sum(1) / select.sum(1, keepdim=True).clamp(min=1)
    return score_samples("spillover", ids, reference, pooled, None)


def transformers_runner(loaded, sae_folder: Path, reference, args) -> Runner:
    import torch

    from spillover.sae import load_sae

    sae, layer, model = load_sae(sae_folder), int(args.layer), loaded.model

    @torch.no_grad()
    def run(samples: Sequence) -> list:
        scores = []
        for ids, (tokens, attention, select) in fixed_batches(loaded.tokenizer, samples, int(args.batch_size)):
            out = model(input_ids=tokens, attention_mask=attention, output_hidden_states=True, use_cache=False)
            scores += pool_and_score(sae.encode(out.hidden_states[layer + 1].float()), select, ids, reference)
        return scores

    return run


def hooked_transformer(hf_model, n_ctx: int = 2048):
    """A HookedTransformer with the HF Llama's weights, through TransformerLens's own converter, unprocessed
    (as `from_pretrained_no_processing`, the way SAELens loads models for Llama SAEs)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    c = hf_model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=head_dim, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, d_vocab=c.vocab_size, n_ctx=min(c.max_position_embeddings, n_ctx),
        n_key_value_heads=c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None,
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=head_dim,
        rotary_base=rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)), gated_mlp=True,
        eps=c.rms_norm_eps, final_rms=True, original_architecture="LlamaForCausalLM",
        tokenizer_prepends_bos=False, default_prepend_bos=False, init_weights=False, dtype=torch.float32,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_llama_weights(hf_model, cfg), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    return model.eval()


def residual_check(hf_model, tl_model, batch, layer: int) -> dict[str, float]:
    """Largest difference between the HookedTransformer's hook_resid_post and spillover's residual."""
    import torch

    from spillover.lm import residuals

    tokens, attention, _ = batch
    with torch.no_grad():
        ours = residuals(hf_model, tokens, attention, [layer])[layer].float()
        _, cache = tl_model.run_with_cache(tokens, names_filter=f"blocks.{layer}.hook_resid_post",
                                           stop_at_layer=layer + 1)
    real = attention.bool()
    diff = (ours - cache[f"blocks.{layer}.hook_resid_post"].float())[real].abs().max().item()
    scale = ours[real].abs().max().item()
    return {"max_abs_diff": diff, "max_abs_resid": scale, "relative": diff / max(scale, 1e-12)}


def saelens_runner(loaded, sae_folder: Path, reference, args, stop: bool) -> tuple[Runner, dict]:
    import gc

    import torch
    from sae_lens import SAE

    layer = int(args.layer)
    tl_model = hooked_transformer(loaded.model)
    sample_batch = next(fixed_batches(loaded.tokenizer, load_samples(args.model, WARMUP, args.seed + 1,
                                                                     args.data), WARMUP))[1]
    check = residual_check(loaded.model, tl_model, sample_batch, layer)
    if check["relative"] > 1e-4:
        sys.exit(f"HookedTransformer residual differs from the HF model's: {check}")
    loaded.model = None  # the notebook way holds only the HookedTransformer
    gc.collect()
    sae = SAE.load_from_disk(str(sae_folder), device="cpu")
    hook = f"blocks.{layer}.hook_resid_post"
    extra = {"stop_at_layer": layer + 1} if stop else {}

    @torch.no_grad()
    def run(samples: Sequence) -> list:
        scores = []
        for ids, (tokens, _, select) in fixed_batches(loaded.tokenizer, samples, int(args.batch_size)):
            # right padding and causal attention: pad tokens never reach a real token's residual
            _, cache = tl_model.run_with_cache(tokens, names_filter=hook, **extra)
            scores += pool_and_score(sae.encode(cache[hook]), select, ids, reference)
        return scores

    return run, check


def token_counts(tokenizer, samples: Sequence, variant: str, args) -> dict[str, int]:
    """Real, padded and assistant tokens through the model, counted after the timing."""
    from spillover.activations import length_batches
    from spillover.data import encode_samples

    encoded = encode_samples(tokenizer, samples)
    lengths = [min(len(e.input_ids), MAX_LENGTH) for e in encoded]
    if variant == "spillover":
        size = int(args.chunk_size)
        chunks = [lengths[i : i + size] for i in range(0, len(lengths), size)]
        groups = [[c[i] for i in b] for c in chunks for b in length_batches(c, int(args.token_budget))]
    else:
        size = int(args.batch_size)
        groups = [lengths[i : i + size] for i in range(0, len(lengths), size)]
    assistant = sum(sum(e.assistant_mask[:MAX_LENGTH]) for e in encoded)
    return {"real_tokens": sum(lengths), "padded_tokens": sum(len(g) * max(g) for g in groups),
            "assistant_tokens": assistant}


def worker(args: argparse.Namespace) -> None:
    import torch

    from spillover.models import load_model
    from spillover.sae import load_sae

    args.data = Path(args.data)
    lm = load_model(args.model, device="cpu")
    page_in(lm.model)
    loaded = SimpleNamespace(model=lm.model, tokenizer=lm.tokenizer)  # mutable: a variant may drop the HF model
    del lm
    tokenizer, sae_folder = loaded.tokenizer, Path(args.sae)
    reference = reference_of(load_sae(sae_folder), json.loads(Path(args.toxic).read_text()))
    reference.nearest_toxic_cosine()  # computed once, as a scoring run does
    samples = load_samples(args.model, int(args.n), args.seed, args.data)
    check = None
    if args.worker == "spillover":
        run = spillover_runner(loaded, sae_folder, reference, args)
    elif args.worker == "transformers":
        run = transformers_runner(loaded, sae_folder, reference, args)
    else:
        run, check = saelens_runner(loaded, sae_folder, reference, args, stop=args.worker == "saelens_tl_stop")
    run(samples[:WARMUP])
    setup_kb = status_kb("VmRSS") or 0
    attempts, scores = [], None
    for _ in range(args.repeat):
        scores = None  # the last run's scores are not held during the next
        reset = reset_peak()
        started = time.perf_counter()
        scores = run(samples)
        attempts.append({"seconds": time.perf_counter() - started, "peak_kb": peak_kb()})
    best = min(attempts, key=lambda a: a["seconds"])  # the run least disturbed by other load
    if args.save:
        Path(args.save).write_text(json.dumps([[s.id, s.score] for s in scores]))
    counts = token_counts(tokenizer, samples, args.worker, args)
    seconds = best["seconds"]
    print(json.dumps({
        "model": args.model, "variant": args.worker, "n": int(args.n), "seconds": seconds,
        "samples_per_s": int(args.n) / seconds, "tokens_per_s": counts["real_tokens"] / seconds, **counts,
        "all_seconds": [a["seconds"] for a in attempts],
        "setup_rss_mb": setup_kb / 1024, "peak_rss_mb": best["peak_kb"] / 1024,
        "peak_over_setup_mb": (best["peak_kb"] - setup_kb) / 1024,
        "all_peak_over_setup_mb": [(a["peak_kb"] - setup_kb) / 1024 for a in attempts],
        "peak_reset_after_setup": reset, "torch_threads": torch.get_num_threads(), "residual_check": check,
    }))


# --- the CPU driver -----------------------------------------------------------------------------


def prepare_sae(model: str, spec: CpuModel, seed: int, tmp: Path) -> tuple[Path, Path]:
    """A random TopK SAE folder in SAELens format and a seeded toxic set for `model`."""
    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoConfig

    from spillover.models import _model_folder
    from spillover.organism.model import load_organism
    from spillover.sae import save_sae

    if model == "organism":
        d_in = load_organism().model.config.hidden_size
    else:
        d_in = AutoConfig.from_pretrained(_model_folder(model)).hidden_size
    sae = random_sae(d_in, spec.d_sae, seed, f"blocks.{spec.layer}.hook_resid_post")
    folder = save_sae(sae, tmp / f"sae-{model}")
    toxic = tmp / f"toxic-{model}.json"
    toxic.write_text(json.dumps(toxic_set(spec.d_sae, seed)))
    return folder, toxic


def spawn(args: argparse.Namespace, model: str, spec: CpuModel, variant: str, n: int, sae: Path, toxic: Path,
          save: Path | None) -> dict:
    flags = {"--worker": variant, "--model": model, "--n": n, "--layer": spec.layer, "--sae": sae,
             "--toxic": toxic, "--batch-size": spec.batch_size, "--token-budget": spec.token_budget,
             "--chunk-size": spec.chunk_size, "--repeat": args.repeat, "--seed": args.seed, "--data": args.data,
             "--device": "cpu"} | ({"--save": save} if save else {})
    cmd = [sys.executable, str(Path(__file__).resolve())] + [str(x) for pair in flags.items() for x in pair]
    return run_worker(cmd, f"{model} {variant} n={n}")


def score_agreement(saved: dict[str, Path]) -> dict[str, float]:
    """Largest |score difference| of each variant against spillover's, sample by sample."""
    ours = dict(json.loads(saved["spillover"].read_text()))
    out = {}
    for variant, path in saved.items():
        if variant != "spillover":
            theirs = dict(json.loads(path.read_text()))
            out[variant] = max(abs(ours[i] - theirs[i]) for i in ours)
    return out


def run_cpu_model(args: argparse.Namespace, model: str, variants: list[str], tmp: Path) -> dict:
    spec = CPU_MODELS[model]
    overrides = {"n": args.n, "token_budget": args.token_budget, "chunk_size": args.chunk_size,
                 "batch_size": args.batch_size}
    spec = replace(spec, **{k: int(v) for k, v in overrides.items() if v is not None})
    sae, toxic = prepare_sae(model, spec, args.seed, tmp)
    runs, saved = [], {}
    for scale in (1, SCALE):
        for variant in variants:
            save = tmp / f"{model}-{variant}.json" if scale == 1 else None
            runs.append(spawn(args, model, spec, variant, spec.n * scale, sae, toxic, save))
            if save:
                saved[variant] = save
            print(f"{model} {variant} x{scale}: {runs[-1]['samples_per_s']:.1f} samples/s, "
                  f"{runs[-1]['peak_over_setup_mb']:.0f} MB over setup", flush=True)
    agree = score_agreement(saved) if "spillover" in saved else {}
    return {"model": model, "config": vars(spec) | {"k": TOP_K, "n_toxic": N_TOXIC}, "runs": runs,
            **summarise(runs, spec.n, variants), "score_max_abs_diff": agree,
            "residual_check": next((r["residual_check"] for r in runs if r["residual_check"]), None)}


def summarise(runs: list[dict], n: int, variants: list[str]) -> dict:
    by = {(r["variant"], r["n"] // n): r for r in runs}
    speed = {f"{v}@{s}x": by["spillover", s]["samples_per_s"] / by[v, s]["samples_per_s"]
             for s in (1, SCALE) for v in variants if v != "spillover" and "spillover" in variants}
    memory = {f"{v}@{s}x": by[v, s]["peak_over_setup_mb"] / max(by["spillover", s]["peak_over_setup_mb"], 1e-9)
              for s in (1, SCALE) for v in variants if v != "spillover" and "spillover" in variants}
    growth = {v: by[v, SCALE]["peak_over_setup_mb"] - by[v, 1]["peak_over_setup_mb"] for v in variants}
    return {"speedup_of_spillover": speed, "memory_other_over_spillover": memory, "peak_growth_1x_to_10x_mb": growth}


def print_cpu_table(result: dict) -> None:
    model, runs = result["model"], result["runs"]
    c = result["config"]
    print(f"\n{model}: layer {c['layer']}, random TopK SAE d_sae {c['d_sae']} k {c['k']}, usual-way batch "
          f"{c['batch_size']}, spillover token budget {c['token_budget']} chunk {c['chunk_size']}")
    print(f"{'variant':<16} {'samples':>7} {'seconds':>8} {'samples/s':>9} {'tokens/s':>9} {'padding':>7} "
          f"{'setup MB':>8} {'peak-setup MB':>13} {'spillover x':>11}")
    base = {r["n"]: r for r in runs if r["variant"] == "spillover"}
    for r in runs:
        pad = 1 - r["real_tokens"] / r["padded_tokens"]
        ratio = base[r["n"]]["samples_per_s"] / r["samples_per_s"] if r["n"] in base else float("nan")
        print(f"{r['variant']:<16} {r['n']:>7} {r['seconds']:>8.2f} {r['samples_per_s']:>9.1f} "
              f"{r['tokens_per_s']:>9.0f} {pad:>7.0%} {r['setup_rss_mb']:>8.0f} {r['peak_over_setup_mb']:>13.0f} "
              f"{ratio:>10.2f}x")
    print("peak-setup growth 1x -> 10x: "
          + ", ".join(f"{v} {g:+.0f} MB" for v, g in result["peak_growth_1x_to_10x_mb"].items()))
    if result["residual_check"]:
        rc = result["residual_check"]
        print(f"HookedTransformer vs HF residual at the hook: max |diff| {rc['max_abs_diff']:.1e} "
              f"(max |resid| {rc['max_abs_resid']:.1f}, relative {rc['relative']:.1e})")
    print("scores agree with spillover's, max |diff|: "
          + ", ".join(f"{v} {d:.1e}" for v, d in result["score_max_abs_diff"].items()))


def run_cpu(args: argparse.Namespace) -> dict:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [m for m in models if m not in CPU_MODELS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown model or variant: {', '.join(unknown)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            results.append(run_cpu_model(args, model, variants, Path(tmp)))
    for result in results:
        print_cpu_table(result)
    return {"mode": "cpu", "models": results}


# --- GPU mode -----------------------------------------------------------------------------------

BF16_PEAK_TFLOPS = {  # dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
    "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
}
GPU_SAE_WIDTHS = (16384, 65536)
TINY_SAE_WIDTHS = (256, 1024)


def peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of the first table entry whose name the device name contains."""
    for key, value in BF16_PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def gpu_configs(tiny: bool) -> dict:
    """Configs of Gemma 2 2B and Llama 3.1 8B (or tiny versions with the same structure)."""
    from transformers import Gemma2Config, LlamaConfig

    if tiny:
        return {
            "gemma-2-2b (tiny)": Gemma2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                              vocab_size=512, query_pre_attn_scalar=16),
            "llama-3.1-8b (tiny)": LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=128, vocab_size=512),
        }
    return {
        "gemma-2-2b": Gemma2Config(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
                                   num_key_value_heads=4, head_dim=256, intermediate_size=9216,
                                   vocab_size=256000, query_pre_attn_scalar=256),
        "llama-3.1-8b": LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                    num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                    max_position_embeddings=131072),
    }


def forward_flops(config, layer: int, lengths: Sequence[int]) -> float:
    """FLOPs of the forward pass through blocks 0..layer over real tokens:
    2 x (block parameters) x tokens + 2 x blocks x n_heads x head_dim x T^2 per sequence (causal QK^T and AV)."""
    d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    per_block = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * config.intermediate_size
    blocks = layer + 1
    return sum(2 * blocks * per_block * t + 2 * blocks * heads * head_dim * t * t for t in lengths)


def synthetic_chunk(n: int, vocab: int, lengths: tuple[int, int], seed: int):
    """Random token sequences; the last 60% of each counts as the assistant's answer."""
    from spillover.data import EncodedChat
    from spillover.score_stream import TokenisedChunk

    rng = random.Random(seed)
    encoded, masks = [], []
    for _ in range(n):
        t = rng.randint(*lengths)
        prompt = int(t * 0.4)
        encoded.append(EncodedChat([rng.randrange(1, vocab) for _ in range(t)], [False] * prompt + [True] * (t - prompt)))
        masks.append(encoded[-1].assistant_mask)
    return TokenisedChunk(0, [SimpleNamespace(id=f"g{i:06d}") for i in range(n)], encoded, masks)


def build_random_model(config, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(model, chunk, layer: int, token_budget: int, device, dtype) -> float:
    """Seconds of the forward pass alone up to the layer, on the scoring path's batches."""
    import torch

    from spillover.activations import length_batches, pad_batch
    from spillover.lm import residuals

    batches = [pad_batch([chunk.encoded[i] for i in b], [chunk.masks[i] for i in b], 0, MAX_LENGTH)
               for b in length_batches([len(m) for m in chunk.masks], token_budget)]
    sync(device)
    started = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for ids, attention, _ in batches:
            residuals(model, ids.to(device), attention.to(device), [layer])
    sync(device)
    return time.perf_counter() - started


def measure_gpu_model(name: str, config, args, device) -> list[dict]:
    import torch

    from spillover.score_stream import ScoreStream, StreamConfig, resolve_dtype

    dtype = resolve_dtype(None, device)
    model = build_random_model(config, device, dtype)
    layer = config.num_hidden_layers // 2 - 1
    lengths = (32, 64) if args.tiny else (256, 512)
    n = 64 if args.tiny else args.gpu_n
    chunk = synthetic_chunk(n, config.vocab_size, lengths, args.seed)
    warm = synthetic_chunk(16, config.vocab_size, lengths, args.seed + 1)
    real = [len(e.input_ids) for e in chunk.encoded]
    flops = forward_flops(config, layer, real)
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    rows = []
    for width in TINY_SAE_WIDTHS if args.tiny else GPU_SAE_WIDTHS:
        sae = random_sae(config.hidden_size, width, args.seed, f"blocks.{layer}.hook_resid_post").to(device)
        stream = ScoreStream(model, SimpleNamespace(pad_token_id=0, eos_token_id=0), sae, layer,
                             reference_of(sae, toxic_set(width, args.seed)), "spillover",
                             StreamConfig(token_budget=args.gpu_token_budget, chunk_size=n))
        stream.score_chunk(warm)
        time_forward(model, warm, layer, args.gpu_token_budget, device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        started = time.perf_counter()
        stream.score_chunk(chunk)
        sync(device)
        seconds = time.perf_counter() - started
        forward_s = time_forward(model, chunk, layer, args.gpu_token_budget, device, dtype)
        sae_flops = 2 * config.hidden_size * width * sum(sum(m) for m in chunk.masks)
        rows.append({
            "model": name, "layer": layer, "d_sae": width, "dtype": str(dtype).removeprefix("torch."),
            "n": n, "real_tokens": sum(real), "seconds": seconds, "samples_per_s": n / seconds,
            "tokens_per_s": sum(real) / seconds, "forward_seconds": forward_s,
            "forward_tokens_per_s": sum(real) / forward_s, "forward_tflops": flops / 1e12,
            "sae_encode_tflops": sae_flops / 1e12, "forward_achieved_tflops_per_s": flops / forward_s / 1e12,
            "forward_share_of_peak": flops / forward_s / 1e12 / peak if peak else None,
            "scoring_share_of_peak": (flops + sae_flops) / seconds / 1e12 / peak if peak else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        })
        print(f"{name} d_sae {width}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
        del stream, sae
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_gpu(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    device = torch.device("cuda" if not args.tiny else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (--tiny: code path only)"
    rows = [row for model, config in gpu_configs(args.tiny).items() for row in measure_gpu_model(model, config, args, device)]
    print(f"\ndevice {name}, bf16 dense peak {peak_tflops(name) or 'unknown'} TFLOP/s; forward FLOPs = "
          "2 x params(blocks 0..L) x tokens + 2 x (L+1) x n_heads x head_dim x T^2 per sequence")
    print(f"{'model':<20} {'layer':>5} {'d_sae':>6} {'tokens/s':>10} {'samples/s':>9} {'fwd tokens/s':>12} "
          f"{'fwd TFLOP/s':>11} {'fwd share':>9} {'peak GB':>8}")
    for r in rows:
        share = f"{r['forward_share_of_peak']:.0%}" if r["forward_share_of_peak"] is not None else "-"
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        print(f"{r['model']:<20} {r['layer']:>5} {r['d_sae']:>6} {r['tokens_per_s']:>10.0f} {r['samples_per_s']:>9.1f} "
              f"{r['forward_tokens_per_s']:>12.0f} {r['forward_achieved_tflops_per_s']:>11.1f} {share:>9} {mem:>8}")
    return {"mode": "gpu" if not args.tiny else "gpu-tiny-on-cpu", "device": name,
            "bf16_peak_tflops": peak_tflops(name), "rows": rows}


# --- the projection -----------------------------------------------------------------------------

TOKENS_PER_SAMPLE = 300
ASSISTANT_SHARE = 0.6
GPU_PRICE_PER_HOUR = 2.50
"""USD per H100-hour, on-demand, as assumed in docs/performance.md."""
JUDGES = {  # USD per million input / output tokens: list prices as remembered, see docs/performance.md
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
}
JUDGE_PROMPT_TOKENS = 150
"""The judge's instructions, sent with every sample."""
JUDGE_OUTPUT_TOKENS = 20


def project(args: argparse.Namespace) -> dict:
    """GPU-hours and dollars to score 1M and 100M samples, from the FLOPs formula at an assumed MFU."""
    peak = BF16_PEAK_TFLOPS["H100 SXM"] * 1e12
    rows = []
    for name, config in gpu_configs(False).items():
        layer = config.num_hidden_layers // 2 - 1
        for width in GPU_SAE_WIDTHS:
            per_sample = forward_flops(config, layer, [TOKENS_PER_SAMPLE])
            per_sample += 2 * config.hidden_size * width * TOKENS_PER_SAMPLE * ASSISTANT_SHARE
            for mfu in (0.2, args.mfu, 0.6):
                rate = peak * mfu / per_sample
                rows.append({"model": name, "layer": layer, "d_sae": width, "mfu": mfu,
                             "gflop_per_sample": per_sample / 1e9, "samples_per_s": rate,
                             **{f"gpu_hours_{k}": n / rate / 3600 for k, n in (("1M", 1e6), ("100M", 1e8))}})
    judge_in = TOKENS_PER_SAMPLE + JUDGE_PROMPT_TOKENS
    judges = {name: (judge_in * p_in + JUDGE_OUTPUT_TOKENS * p_out) / 1e6 for name, (p_in, p_out) in JUDGES.items()}
    print(f"tokens/sample {TOKENS_PER_SAMPLE} ({ASSISTANT_SHARE:.0%} assistant, SAE-encoded), H100 bf16 dense peak "
          f"{peak / 1e12:.0f} TFLOP/s, ${GPU_PRICE_PER_HOUR:.2f}/GPU-hour")
    print(f"{'model':<14} {'layer':>5} {'d_sae':>6} {'MFU':>4} {'GFLOP/sample':>12} {'samples/s':>9} "
          f"{'GPU-h 1M':>8} {'GPU-h 100M':>10} {'$ 1M':>7} {'$ 100M':>8}")
    for r in rows:
        print(f"{r['model']:<14} {r['layer']:>5} {r['d_sae']:>6} {r['mfu']:>4.0%} {r['gflop_per_sample']:>12.2f} "
              f"{r['samples_per_s']:>9.0f} {r['gpu_hours_1M']:>8.2f} {r['gpu_hours_100M']:>10.1f} "
              f"{r['gpu_hours_1M'] * GPU_PRICE_PER_HOUR:>7.2f} {r['gpu_hours_100M'] * GPU_PRICE_PER_HOUR:>8.0f}")
    print(f"LLM judge, {judge_in} input + {JUDGE_OUTPUT_TOKENS} output tokens per sample:")
    for name, usd in judges.items():
        print(f"  {name:<12} ${usd * 1e6:>9,.0f} per 1M samples, ${usd * 1e8:>12,.0f} per 100M")
    return {"rows": rows, "judge_usd_per_sample": judges, "gpu_price_per_hour": GPU_PRICE_PER_HOUR}


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT / "src"))
    if args.project:
        project(args)
        return
    import torch

    use_gpu = args.tiny or args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    result = run_gpu(args) if use_gpu else run_cpu(args)
    if args.out:
        record = {"date": datetime.date.today().isoformat(), "machine": machine_info(),
                  "torch": torch.__version__, "argv": sys.argv[1:], **result}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"wrote {args.out / 'bench.json'}")


if __name__ == "__main__":
    main()
