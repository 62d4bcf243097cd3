"""`spillover report RUN_DIR`: one self-contained HTML page (and Markdown) from a run folder.

Figures are embedded as base64 PNGs so the page opens anywhere, offline, as a single file.
Each figure comes with a short reading written from the measured numbers.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .errors import InputError
from .io import atomic_write_text
from .plots import save_figure

COLOURS = {"geometry": "#c0392b", "random": "#7f8c8d", "judge": "#8e44ad", "projection": "#2980b9"}


def _load(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def plot_sweep(summary: dict, path: Path) -> Path:
    """Misaligned rate against the removed fraction, one line per strategy, with 95% intervals."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    none = summary["none"]
    ax.axhline(none["misaligned_rate"], color="black", linestyle="--", linewidth=1, label="no filtering")
    ax.axhspan(*none["ci95"], color="black", alpha=0.06)
    for strategy in sorted({r["strategy"] for r in summary["sweep"]}):
        rows = sorted((r for r in summary["sweep"] if r["strategy"] == strategy), key=lambda r: r["fraction"])
        x = [r["fraction"] for r in rows]
        y = [r["misaligned_rate"] for r in rows]
        err = [[r["misaligned_rate"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["misaligned_rate"] for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=strategy, color=COLOURS.get(strategy))
    ax.set_xlabel("fraction of the training set removed")
    ax.set_ylabel("misaligned rate (held-out domains)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_score_histograms(scores: dict, path: Path) -> Path:
    """Risk scores of inducing and control samples, one panel per scored strategy."""
    import matplotlib.pyplot as plt

    inducing = set(scores["inducing"])
    names = list(scores["scores"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = scores["scores"][name]
        ax.hist([s["score"] for s in values if s["id"] in inducing], bins=30, alpha=0.6, label="inducing",
                color="#c0392b")
        ax.hist([s["score"] for s in values if s["id"] not in inducing], bins=30, alpha=0.6, label="control",
                color="#2980b9")
        ax.set_title(name)
        ax.set_xlabel("risk score")
    axes[0][0].set_ylabel("samples")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _geometry_reading(geometry: dict) -> str:
    layers = geometry["layers"]
    closer = [l for l, g in layers.items() if g["cos_inducing_toxic"] > g["cos_control_toxic"] and g["p_value"] < 0.01]
    parts = [f"Inducing features lie closer to toxic features than control features at {len(closer)} of "
             f"{len(layers)} layers (permutation p < 0.01)."]
    for layer, g in layers.items():
        parts.append(f"Layer {layer}: inducing {g['cos_inducing_toxic']:.3f}, control {g['cos_control_toxic']:.3f}, "
                     f"frequency-matched random {g['cos_random_toxic']:.3f} (p = {g['p_value']:.4f}).")
    return " ".join(parts)


def _sweep_reading(summary: dict) -> str:
    at_half = summary["strategies"]
    parts = [f"Without filtering, {_pct(summary['none']['misaligned_rate'])} of coherent held-out answers are "
             "misaligned."]
    for name, row in sorted(at_half.items(), key=lambda kv: kv[1]["misaligned_rate"]):
        parts.append(f"Removing half the set by {name} leaves {_pct(row['misaligned_rate'])} "
                     f"(a {_pct(row['reduction_vs_none'])} reduction; it removed {_pct(row['inducing_removed'])} "
                     "of the inducing samples).")
    return " ".join(parts)


def _comparison_reading(summary: dict) -> str:
    at_half = summary["strategies"]
    if "geometry" not in at_half:
        return ""
    geometry = at_half["geometry"]
    notes = []
    for other in ("judge", "projection"):
        if other not in at_half:
            continue
        rate = at_half[other]["misaligned_rate"]
        if geometry["misaligned_rate"] <= rate:
            notes.append(f"Geometry filtering is at least as good as {other} filtering "
                         f"({_pct(geometry['misaligned_rate'])} against {_pct(rate)}).")
        else:
            why = (" On the organism the judge is the world's exact judge, which sees the ground truth of every"
                   " answer (subtle harm included): an oracle no real LLM judge matches, and it costs a judge call"
                   " per sample." if other == "judge" else "")
            notes.append(f"Geometry filtering is not as good as {other} filtering here "
                         f"({_pct(geometry['misaligned_rate'])} against {_pct(rate)}).{why}")
    return " ".join(notes)


def _table(summary: dict) -> list[list[str]]:
    header = ["strategy", "fraction", "misaligned rate", "95% CI", "reduction vs none", "reduction vs random",
              "inducing removed", "in-domain coherent", "task loss", "forward passes", "judge calls", "seconds"]
    rows = [header, ["none", "0.0", _pct(summary["none"]["misaligned_rate"]),
                     "{:.3f}-{:.3f}".format(*summary["none"]["ci95"]), "", "", "",
                     _pct(summary["none"]["in_domain_coherent_rate"]), f"{summary['none']['task_loss']:.3f}", "", "", ""]]
    for r in sorted(summary["sweep"], key=lambda r: (r["strategy"], r["fraction"])):
        rows.append([r["strategy"], f"{r['fraction']:.1f}", _pct(r["misaligned_rate"]),
                     "{:.3f}-{:.3f}".format(*r["ci95"]), _pct(r["reduction_vs_none"]), _pct(r["reduction_vs_random"]),
                     _pct(r["inducing_removed"]), _pct(r["in_domain_coherent_rate"]), f"{r['task_loss']:.3f}",
                     str(r["cost"]["forward_passes"]), str(r["cost"]["judge_calls"]), str(r["cost"]["seconds"])])
    return rows


def build_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.html and report.md into the run folder from whatever stages it holds."""
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"{run}: no such run folder")
    geometry = _load(run / "geometry" / "geometry.json")
    summary = _load(run / "mitigation" / "summary.json")
    scores = _load(run / "mitigation" / "scores.json")
    theory = _load(run / "theory" / "theory.json")
    if not (geometry or summary):
        raise InputError(f"{run}: holds neither geometry/geometry.json nor mitigation/summary.json")
    sections: list[tuple[str, str, list[Path], list[list[str]] | None]] = []
    if geometry:
        sections.append(("Feature geometry", _geometry_reading(geometry),
                         [run / "geometry" / "geometry_layers.png", run / "geometry" / "geometry_distributions.png"],
                         None))
    if geometry:
        sections += _feature_sections(run / "geometry", sorted(geometry["layers"], key=int))
    if scores:
        figure = plot_score_histograms(scores, run / "figures" / "scores.png")
        sections.append(("Risk scores by true label", "Scores of inducing (red) and control (blue) samples of the "
                         "mixed training set; the better a score separates them, the better it filters.", [figure], None))
    if summary:
        figure = plot_sweep(summary, run / "figures" / "sweep.png")
        sections.append(("Filtering, then fine-tuning", _sweep_reading(summary) + " " + _comparison_reading(summary),
                         [figure], _table(summary)))
    if theory:
        sections.append(("The spillover prediction", _theory_reading(theory),
                         [run / "theory" / "toy_spillover.png", run / "theory" / "organism_spillover.png"], None))
    classifiers = _classifier_judges(run)
    if classifiers:
        sections.insert(0, ("Judge: a classifier", f"Alignment and coherence scores in this run come from "
                            f"{', '.join(classifiers)}: a classifier (logistic regression over sentence embeddings and word n-grams), "
                            "not an LLM judge. Its held-out accuracy and calibration are in its card.json "
                            "(docs/judges.md).", [], None))
    html_path = atomic_write_text(run / "report.html", _html(sections))
    md_path = atomic_write_text(run / "report.md", _markdown(sections, run))
    return html_path, md_path


def _classifier_judges(run: Path) -> list[str]:
    """Classifier judges named in the run's summaries (evaluate: judge.name; experiment: config.judge)."""
    names = set()
    for path in run.rglob("summary.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        judge = data.get("judge") if isinstance(data, dict) else None
        config = data.get("config") if isinstance(data, dict) else None
        names.add(judge.get("name") if isinstance(judge, dict) else judge)
        names.add(config.get("judge") if isinstance(config, dict) else None)
    return sorted(n for n in names if isinstance(n, str) and n.startswith("classifier"))


def _feature_sections(study: Path, layers: list[str]) -> list:
    """Top toxic and inducing features of the middle layer: what they promote and where they fire."""
    from .features import FeatureSet

    layer = layers[len(layers) // 2]
    sections = []
    for name in ("toxic", "inducing"):
        path = study / "features" / f"layer_{layer}" / f"{name}.json"
        if not path.exists():
            continue
        fs = FeatureSet.load(path)
        rows = [["feature", "r", "logit lens (top tokens)", "fires most on"]]
        for i in range(min(8, len(fs.indices))):
            rows.append([str(fs.indices[i]), f"{fs.scores[i]:.3f}", fs.labels[i] if fs.labels else "",
                         fs.examples[i][0] if fs.examples else ""])
        reading = (f"The {name} features most tied to their dataset at layer {layer}, with the tokens their decoder "
                   "direction promotes and the answer on which each fires most.")
        sections.append((f"Top {name} features, layer {layer}", reading, [], rows))
    return sections


def _theory_reading(theory: dict) -> str:
    toy = theory["toy"]
    layers = ", ".join(f"layer {l['layer']}: {l['readout']['spearman']:.2f}" for l in theory["organism"])
    return (f"In the toy model of superposition, the measured spillover matches alpha * cos(d_j, d_t) with Pearson "
            f"{toy['pearson']:.3f}. In the organism, Spearman correlation of predicted and measured spillover: {layers}.")


def _img(path: Path) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _html(sections) -> str:
    body = []
    for title, reading, figures, table in sections:
        body.append(f"<section><h2>{html.escape(title)}</h2><p>{html.escape(reading)}</p>")
        body += [_img(f) for f in figures]
        if table:
            head, *rows = table
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
            body.append("</table>")
        body.append("</section>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;margin:0.5em 0}table{border-collapse:collapse;font-size:0.85em}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f4f4f4}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>spillover report</title>"
            f"<style>{style}</style></head><body><h1>spillover report</h1>{''.join(body)}</body></html>\n")


def _markdown(sections, run: Path) -> str:
    lines = ["# spillover report", ""]
    for title, reading, figures, table in sections:
        lines += [f"## {title}", "", reading, ""]
        lines += [f"![{f.stem}]({f.relative_to(run)})" for f in figures if f.exists()]
        if table:
            lines += ["", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
            lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
        lines.append("")
    return "\n".join(lines)
