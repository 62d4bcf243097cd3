"""Benchmark: activation collection with SAE encoding, spillover's path against a plain baseline.

Not a test. Both variants pool the same SAE features (and residuals) over the assistant tokens of
the same organism conversations, at one layer:

- spillover: `activations.collect` with the SAE and an out_dir: samples batched by length under a
  token budget, the forward pass stopped after the layer, only selected tokens encoded, shards
  streamed to disk.
- baseline: every sample tokenized up front, fixed-size batches in input order padded to their
  longest sample, a full forward with output_hidden_states=True, every position SAE-encoded, then
  masked and pooled.

Each variant runs in a fresh subprocess at 1x and 10x --n samples, so its peak RSS is its own;
the peak is read as the kernel's RSS high-water mark, reset after setup (model, SAE and samples
loaded, one warm-up batch run). Usage: see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from _measure import ROOT, ShardWatch, page_in, run_worker
from _measure import peak_kb as _peak_kb
from _measure import reset_peak as _reset_peak
from _measure import status_kb as _status_kb

VARIANTS = ("spillover", "baseline")
POOLED = ("feat_mean", "feat_max", "resid_mean", "resid_max")
SCALES = (1, 10)
WARMUP = 16
"""Samples run once before measuring, so lazy initialisation is outside the figures."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256, help="base number of samples (runs at 1x and 10x)")
    p.add_argument("--layer", type=int, default=1, help="block whose output is read (below the last block)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampled conversations")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument(
        "--sae",
        type=Path,
        help="SAELens-format SAE folder; default runs/geo/sae/layer_L, else one trained here",
    )
    p.add_argument("--batch-size", type=int, default=64, help="baseline: samples per forward batch")
    p.add_argument("--token-budget", type=int, default=16384, help="spillover: padded tokens per batch")
    p.add_argument("--shard-size", type=int, default=256, help="spillover: samples per shard on disk")
    p.add_argument(
        "--repeat", type=int, default=2, help="timed runs per variant and size; the fastest counts"
    )
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("n", "batch_size", "token_budget", "shard_size", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# --- measuring inside a worker ------------------------------------------------------------------


def make_samples(world, n: int, seed: int):
    """Organism conversations of 1 to 4 turns: lengths from about 15 to 140 tokens."""
    from spillover.data import ChatSample

    rng = random.Random(seed)
    return [ChatSample(f"s{i:06d}", tuple(world.sample_conversation(rng).messages())) for i in range(n)]


def run_spillover(model, tokenizer, samples, layer, sae, args, out_dir):
    from spillover.activations import CollectConfig, collect

    config = CollectConfig(layers=(layer,), token_budget=args.token_budget, shard_size=args.shard_size)
    collect(model, tokenizer, samples, config, saes={layer: sae}, out_dir=out_dir, keep=False)
    return out_dir  # streamed: the shards on disk are the result, read back after the peak is taken


def _read_back(result, layer: int) -> dict:
    """The pooled tensors of either variant (spillover's are read from its shards)."""
    if not isinstance(result, Path):
        return result
    from spillover.activations import load_pooled

    pooled = load_pooled(result)
    return {name: pooled.tensors[f"{name}.{layer}"] for name in POOLED} | {"n_tokens": pooled.tensors["n_tokens"]}


def run_baseline(model, tokenizer, samples, layer, sae, args, out_dir=None):
    import torch

    from spillover.data import encode_chats

    encoded = encode_chats(tokenizer, [s.messages for s in samples])
    parts: dict[str, list] = {name: [] for name in (*POOLED, "n_tokens")}
    with torch.no_grad():
        for start in range(0, len(encoded), args.batch_size):
            batch = _padded(encoded[start : start + args.batch_size], tokenizer.pad_token_id)
            out = model(
                input_ids=batch[0], attention_mask=batch[1], output_hidden_states=True, use_cache=False
            )
            resid = out.hidden_states[layer + 1].float()
            for name, value in _pool(resid, sae.encode(resid), batch[2]).items():
                parts[name].append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def _padded(chunk, pad_id):
    import torch

    width = max(len(e.input_ids) for e in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    select = torch.zeros((len(chunk), width), dtype=torch.bool)
    for row, e in enumerate(chunk):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention[row, : len(e.input_ids)] = 1
        select[row, : len(e.input_ids)] = torch.tensor(e.assistant_mask)
    return ids, attention, select


def _pool(resid, feats, select):
    keep = select.unsqueeze(-1)
    count = select.sum(1, keepdim=True).clamp(min=1)
    out = {"n_tokens": select.sum(1)}
    for name, x in (("resid", resid), ("feat", feats)):
        out[f"{name}_mean"] = (x * keep).sum(1) / count
        peak = x.masked_fill(~keep, float("-inf")).amax(1)
        out[f"{name}_max"] = peak.where(peak.isfinite(), 0.0)
    return out


def padded_tokens(tokenizer, samples, variant: str, args) -> tuple[int, int]:
    """Real and padded tokens through the model, counted after the timing (it re-tokenizes)."""
    from spillover.activations import length_batches
    from spillover.data import encode_chats

    lengths = [len(e.input_ids) for e in encode_chats(tokenizer, [s.messages for s in samples])]
    if variant == "baseline":
        groups = [lengths[i : i + args.batch_size] for i in range(0, len(lengths), args.batch_size)]
    else:
        shards = [lengths[i : i + args.shard_size] for i in range(0, len(lengths), args.shard_size)]
        groups = [[s[i] for i in b] for s in shards for b in length_batches(s, args.token_budget)]
    return sum(lengths), sum(len(g) * max(g) for g in groups)


def worker(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    from spillover.organism.model import load_organism
    from spillover.sae import load_sae

    organism = load_organism()
    model, tokenizer = organism.model, organism.tokenizer
    page_in(model)
    sae = load_sae(args.sae)
    samples = make_samples(organism.world, args.n, args.seed)
    run = run_spillover if args.worker == "spillover" else run_baseline
    with tempfile.TemporaryDirectory() as tmp:
        run(model, tokenizer, samples[:WARMUP], args.layer, sae, args, Path(tmp) / "warmup")
        setup_kb = _status_kb("VmRSS") or 0
        attempts = []
        for attempt in range(args.repeat):  # each into a fresh folder, so no shard is reused
            folder, pooled = Path(tmp) / f"run{attempt}", None  # the last run's result is not held
            reset = _reset_peak()
            with ShardWatch(folder) as watch:
                started = time.perf_counter()
                pooled = run(model, tokenizer, samples, args.layer, sae, args, folder)
                seconds = time.perf_counter() - started
            attempts.append({"seconds": seconds, "peak_kb": _peak_kb(), "shard_peaks_mb": watch.peaks_mb})
            pooled = _read_back(pooled, args.layer)
    best = min(attempts, key=lambda a: a["seconds"])  # the run least disturbed by other load
    seconds, peak_kb, shard_peaks = best["seconds"], best["peak_kb"], best["shard_peaks_mb"]
    if args.save:
        save_file({k: v.contiguous() for k, v in pooled.items()}, str(args.save))
    real, padded = padded_tokens(tokenizer, samples, args.worker, args)
    result_mb = sum(v.numel() * v.element_size() for v in pooled.values()) / 2**20
    print(
        json.dumps(
            {
                "variant": args.worker,
                "n": args.n,
                "seconds": seconds,
                "samples_per_s": args.n / seconds,
                "all_seconds": [a["seconds"] for a in attempts],
                "all_peak_over_setup_mb": [(a["peak_kb"] - setup_kb) / 1024 for a in attempts],
                "assistant_tokens": int(pooled["n_tokens"].sum()),
                "real_tokens": real,
                "padded_tokens": padded,
                "setup_rss_mb": setup_kb / 1024,
                "peak_rss_mb": peak_kb / 1024,
                "peak_over_setup_mb": (peak_kb - setup_kb) / 1024,
                "peak_reset_after_setup": reset,
                "result_mb": result_mb,
                "torch_threads": torch.get_num_threads(),
                "peak_over_setup_by_shard_mb": [p - setup_kb / 1024 for p in shard_peaks],
            }
        )
    )


# --- the driver ---------------------------------------------------------------------------------


def spawn(args: argparse.Namespace, variant: str, n: int, sae: Path, save: Path | None) -> dict:
    flags = {
        "--worker": variant,
        "--n": n,
        "--layer": args.layer,
        "--seed": args.seed,
        "--sae": sae,
        "--batch-size": args.batch_size,
        "--token-budget": args.token_budget,
        "--shard-size": args.shard_size,
        "--repeat": args.repeat,
    } | ({"--save": save} if save else {})
    cmd = [sys.executable, str(Path(__file__).resolve())] + [str(x) for pair in flags.items() for x in pair]
    return run_worker(cmd, variant)


def sae_folder(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The SAE to encode with: --sae, else the geometry run's, else a TopK SAE trained here (~20 s)."""
    if args.sae:
        return args.sae, str(args.sae)
    existing = ROOT / "runs" / "geo" / "sae" / f"layer_{args.layer}"
    if (existing / "cfg.json").is_file():
        return existing, str(existing.relative_to(ROOT))
    sys.path.insert(0, str(ROOT / "src"))
    from spillover.activations import collect_tokens
    from spillover.organism.model import load_organism
    from spillover.sae import TopKTrainingConfig, save_sae, train_topk_sae

    organism = load_organism()
    samples = make_samples(organism.world, 2000, args.seed + 1)
    x = collect_tokens(organism.model, organism.tokenizer, samples, args.layer, max_tokens=100_000)
    sae, report = train_topk_sae(x, TopKTrainingConfig(d_sae=1024, k=16, steps=300, batch_size=2048))
    return save_sae(sae, tmp / "sae"), f"trained here: TopK d_sae 1024, k 16, 300 steps, FVU {report.fvu:.3f}"


def agreement(a: Path, b: Path) -> dict[str, float]:
    """Largest absolute difference between the two variants' pooled tensors, per tensor."""
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return {
        k: float(abs(x[k].astype("float64") - y[k].astype("float64")).max()) for k in (*POOLED, "n_tokens")
    }


def check_layer(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from spillover.organism.model import ModelConfig

    last = ModelConfig().num_hidden_layers - 1
    if not 0 <= args.layer < last:
        sys.exit(
            f"--layer {args.layer}: choose 0..{last - 1}; HF's last hidden state is after the final norm, "
            "so the baseline would read a different stream"
        )


def report(runs: list[dict], agree: dict[str, float], sae_source: str, args: argparse.Namespace) -> dict:
    by = {(r["variant"], r["n"] // args.n): r for r in runs}
    speed = {
        f"{s}x": by["spillover", s]["samples_per_s"] / by["baseline", s]["samples_per_s"] for s in SCALES
    }
    growth = {v: by[v, SCALES[-1]]["peak_over_setup_mb"] - by[v, 1]["peak_over_setup_mb"] for v in VARIANTS}
    print(
        f"\nlayer {args.layer}, SAE {sae_source}; baseline batch {args.batch_size}, "
        f"spillover token budget {args.token_budget}, shard {args.shard_size}\n"
    )
    print(
        f"{'variant':<10} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'padding':>8} "
        f"{'setup MB':>9} {'peak MB':>8} {'peak-setup':>11} {'result MB':>10}"
    )
    for r in runs:
        pad = 1 - r["real_tokens"] / r["padded_tokens"]
        print(
            f"{r['variant']:<10} {r['n']:>8} {r['seconds']:>8.2f} {r['samples_per_s']:>10.0f} {pad:>8.0%} "
            f"{r['setup_rss_mb']:>9.0f} {r['peak_rss_mb']:>8.0f} {r['peak_over_setup_mb']:>11.0f} "
            f"{r['result_mb']:>10.1f}"
        )
    print("\nspeed, spillover / baseline: " + ", ".join(f"{k} {v:.2f}x" for k, v in speed.items()))
    print(
        f"peak-setup growth from 1x to {SCALES[-1]}x: "
        + ", ".join(f"{v} {growth[v]:+.0f} MB" for v in VARIANTS)
    )
    shards = by["spillover", SCALES[-1]]["peak_over_setup_by_shard_mb"]
    marks = sorted({1, 2, len(shards) // 2, len(shards)} - {0})
    print(
        f"spillover {SCALES[-1]}x, peak-setup once shard k is on disk: "
        + ", ".join(f"k={k} {shards[k - 1]:.0f} MB" for k in marks if k <= len(shards))
    )
    print("outputs agree, max |diff|: " + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()))
    return {"speed_ratio": speed, "peak_growth_mb": growth, "max_abs_diff": agree}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    check_layer(args)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sae, sae_source = sae_folder(args, tmp)
        runs = []
        for scale in SCALES:
            for variant in VARIANTS:
                save = tmp / f"{variant}.safetensors" if scale == 1 else None
                runs.append(spawn(args, variant, args.n * scale, sae, save))
                print(f"{variant} x{scale}: {runs[-1]['samples_per_s']:.0f} samples/s", flush=True)
        agree = agreement(tmp / "spillover.safetensors", tmp / "baseline.safetensors")
    summary = report(runs, agree, sae_source, args)
    if args.out:
        record = {
            "date": datetime.date.today().isoformat(),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "config": {
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
                if k not in ("worker", "save")
            }
            | {"sae_source": sae_source},
            "runs": runs,
            **summary,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
