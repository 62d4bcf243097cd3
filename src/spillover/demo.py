"""`spillover demo`: the main job on the embedded organism, ending in a report.

Today it builds (or loads) the organism and measures emergent misalignment for every
fine-tuning set; the geometry, scoring and filtering stages join it as they land.
"""

from __future__ import annotations

from pathlib import Path

from .organism.em import EmConfig, run_em, write_em_markdown


def run_demo(out_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Run the demo into `out_dir`; returns the path of the report."""
    report = run_em(out_dir, EmConfig(), cache_dir=cache_dir)
    return write_em_markdown(out_dir, report)
