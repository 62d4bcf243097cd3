"""`spillover demo`: the whole pipeline on the embedded organism, ending in a report.

world and model (cached) -> SAEs at every layer -> geometry of inducing, control and toxic
features -> per-sample risk scores -> filtering with every strategy and fraction -> LoRA
fine-tuning with three seeds -> evaluation with the exact judge -> report.html.
Every stage saves its outputs in the run folder, so a rerun resumes where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

from .io import atomic_write_json, ensure_dir
from .organism.mitigation import MitigationConfig, run_mitigation, score_auroc
from .organism.model import load_organism
from .organism.study import OrganismStudyConfig, organism_saes, run_organism_geometry
from .report import build_report


def run_demo(out_dir: str | Path, cache_dir: str | Path | None = None,
             mitigation: MitigationConfig = MitigationConfig(), study: OrganismStudyConfig = OrganismStudyConfig()) -> Path:
    """Run the demo into `out_dir`; returns the path of report.html."""
    out = ensure_dir(out_dir)
    geometry = run_organism_geometry(out / "geometry", study, cache_dir=cache_dir)
    organism = load_organism(cache_dir=cache_dir)
    saes = organism_saes(organism, out / "geometry", study)
    summary = run_mitigation(organism, saes, out / "geometry", out / "mitigation", mitigation)
    aurocs = score_auroc(json.loads((out / "mitigation" / "scores.json").read_text()))
    atomic_write_json(out / "summary.json", {
        "strategies": summary["strategies"],
        "none": summary["none"],
        "checks": {**summary["checks"], **{f"geometry_{k}": v for k, v in geometry["checks"].items()}},
        "score_auroc": aurocs,
        "dataset_risk": summary["dataset_risk"],
    })
    html_path, _ = build_report(out)
    return html_path
