"""Does the scoring path's memory level off? The RSS high-water mark after every chunk of one long run.

bench/score.py compares peaks at 1x and 10x samples; a peak that grows between the two could be
growth without bound or a working set that takes a few chunks to reach its size. This script
scores many chunks in one process (spillover's path only, random TopK SAE as in score.py) and
prints, after each chunk, the peak and the current RSS above setup, so the curve shows which, and
the longest sample scored so far (attention's working set grows with its square).

    .venv/bin/python bench/score_memory.py --model smollm2-135m-instruct --n 320 --chunk-size 16 --out DIR

Run it with and without MALLOC_ARENA_MAX=1 or MALLOC_MMAP_THRESHOLD_=1048576 to see the allocator's share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _measure import ROOT, machine_info, page_in, peak_kb, reset_peak, status_kb
from score import CPU_MODELS, MAX_LENGTH, WARMUP, default_data, load_samples, prepare_sae, reference_of

sys.path.insert(0, str(ROOT / "src"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", choices=sorted(CPU_MODELS))
    p.add_argument("--n", type=int, default=320, help="samples in the measured run")
    p.add_argument("--chunk-size", type=int, default=16, help="samples per chunk (one line of output each)")
    p.add_argument("--token-budget", type=int, help="padded tokens per batch (default: score.py's per model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="folder for memory.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from spillover.models import load_model
    from spillover.sae import load_sae
    from spillover.score_stream import ScoreStream, StreamConfig

    args = parse_args(argv)
    spec = CPU_MODELS[args.model]
    budget = args.token_budget or spec.token_budget
    with tempfile.TemporaryDirectory() as tmp:
        sae_folder, toxic = prepare_sae(args.model, spec, args.seed, Path(tmp))
        sae, toxic_features = load_sae(sae_folder), json.loads(toxic.read_text())
    lm = load_model(args.model, device="cpu")
    page_in(lm.model)
    reference = reference_of(sae, toxic_features)
    reference.nearest_toxic_cosine()
    config = StreamConfig(token_budget=budget, chunk_size=args.chunk_size, max_length=MAX_LENGTH)
    stream = ScoreStream(lm.model, lm.tokenizer, sae, spec.layer, reference, "spillover", config)
    samples = load_samples(args.model, args.n + WARMUP, args.seed, default_data())
    warmup, samples = samples[:WARMUP], samples[WARMUP:]
    for chunk in stream.chunks(warmup, [0]):
        stream.score_chunk(chunk)
    setup_mb = (status_kb("VmRSS") or 0) / 1024
    reset_peak()
    rows, started, longest = [], time.perf_counter(), 0
    for chunk in stream.chunks(samples, range(-(-len(samples) // args.chunk_size))):
        stream.score_chunk(chunk)
        longest = max([longest] + [min(len(e.input_ids), MAX_LENGTH) for e in chunk.encoded])
        rows.append({"chunk": chunk.index, "samples_done": min((chunk.index + 1) * args.chunk_size, len(samples)),
                     "seconds": round(time.perf_counter() - started, 2), "longest_sample_so_far": longest,
                     "peak_over_setup_mb": round(peak_kb() / 1024 - setup_mb, 1),
                     "rss_over_setup_mb": round((status_kb("VmRSS") or 0) / 1024 - setup_mb, 1)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"model": args.model, "n": args.n, "chunk_size": args.chunk_size, "token_budget": budget,
              "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
              "setup_rss_mb": round(setup_mb, 1), "chunks": rows, "machine": machine_info()}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
