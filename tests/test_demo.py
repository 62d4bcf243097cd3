import base64
import json
import re
import shutil
import subprocess

import pytest

from spillover.data import read_chat_jsonl, write_chat_jsonl
from spillover.demo import run_demo
from spillover.organism.datasets import finetune_set
from spillover.organism.mitigation import MitigationConfig
from spillover.organism.study import OrganismStudyConfig
from spillover.sae import TopKTrainingConfig
from spillover.study import GeometryConfig


@pytest.fixture(scope="module")
def demo_run(organism, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    study = OrganismStudyConfig(n_per_set=160, sae_conversations=300,
                                sae=TopKTrainingConfig(d_sae=512, k=16, steps=120, batch_size=512),
                                geometry=GeometryConfig(k=50, n_boot=200, n_perm=500))
    mitigation = MitigationConfig(fractions=(0.5,), seeds=(0,), n_inducing=120, n_control=120,
                                  samples_per_question=1)
    return out, run_demo(out, cache_dir=organism.path.parent, mitigation=mitigation, study=study)


def test_demo_writes_every_stage_and_a_summary(demo_run):
    out, report = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["strategies"]) == {"geometry", "random", "judge", "projection"}
    for row in summary["strategies"].values():
        assert {"misaligned_rate", "ci95", "reduction_vs_none", "reduction_vs_random"} <= set(row)
    assert summary["strategies"]["geometry"]["inducing_removed"] > 0.7  # random removal takes about 0.5
    assert summary["score_auroc"]["geometry"] > 0.9
    assert (out / "geometry" / "geometry.json").exists()
    assert (out / "mitigation" / "filtered" / "geometry-0.50" / "filter.json").exists()
    assert report.name == "report.html" and (out / "report.md").exists()


def test_demo_geometry_puts_inducing_features_nearer_the_toxic_ones(demo_run):
    """The paper's claim on the demo's small study, at layers 1 and 2: there p <= 0.002 for 5 of 5
    study seeds measured; at layer 0 this small study reaches p < 0.01 for only 3 of 5."""
    out, _ = demo_run
    layers = json.loads((out / "geometry" / "geometry.json").read_text())["layers"]
    for layer in ("1", "2"):
        assert layers[layer]["statistic"] == "pairwise"
        assert layers[layer]["cos_inducing_toxic"] > layers[layer]["cos_control_toxic"]
        assert layers[layer]["p_value"] < 0.01


def test_report_embeds_every_figure_as_a_valid_png(demo_run):
    _, report = demo_run
    page = report.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 4
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    assert "Filtering, then fine-tuning" in page and "<table>" in page


def test_a_rerun_reuses_finished_runs(demo_run, organism):
    out, _ = demo_run
    runs = sorted((out / "mitigation" / "runs").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    assert len(runs) == 5  # none + four strategies, one fraction, one seed
    mitigation = MitigationConfig(fractions=(0.5,), seeds=(0,), n_inducing=120, n_control=120, samples_per_question=1)
    study = OrganismStudyConfig(n_per_set=160, sae_conversations=300,
                                sae=TopKTrainingConfig(d_sae=512, k=16, steps=120, batch_size=512),
                                geometry=GeometryConfig(k=50, n_boot=200, n_perm=500))
    run_demo(out, cache_dir=organism.path.parent, mitigation=mitigation, study=study)
    assert [p.stat().st_mtime_ns for p in runs] == stamps


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium_with_every_image_loaded(demo_run, tmp_path):
    _, report = demo_run
    probe = tmp_path / "probe.html"
    # Load the report in an iframe-free way: append a script that lists images that failed to decode.
    probe.write_text(report.read_text().replace(
        "</body>",
        "<script>window.onload=()=>{const bad=[...document.images].filter(i=>!(i.complete&&i.naturalWidth>0));"
        "document.title='images:'+document.images.length+' broken:'+bad.length;}</script></body>"))
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
         "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    title = re.search(r"<title>(.*?)</title>", result.stdout)
    assert title is not None, result.stderr[-2000:]
    counts = dict(part.split(":") for part in title.group(1).split())
    assert int(counts["images"]) >= 4 and int(counts["broken"]) == 0


def test_score_and_filter_commands_on_the_demo_outputs(demo_run, organism, tmp_path):
    from spillover.cli import main

    out, _ = demo_run
    mixed = out / "mitigation" / "mixed.jsonl"
    before = mixed.read_bytes()
    layer_dir = out / "geometry"
    argv = ["score", "--model", "organism", "--cache", str(organism.path.parent), "--data", str(mixed),
            "--sae", str(layer_dir / "sae" / "layer_1"), "--toxic", str(layer_dir / "features" / "layer_1" / "toxic.json"),
            "--out", str(tmp_path / "scores")]
    assert main(argv) == 0
    assert main(["filter", "--data", str(mixed), "--strategy", "geometry", "--fraction", "0.5",
                 "--scores", str(tmp_path / "scores" / "scores.jsonl"), "--out", str(tmp_path / "kept")]) == 0
    kept = read_chat_jsonl(tmp_path / "kept" / "kept.jsonl")
    assert len(kept) == 120
    assert sum(bool(s.meta.get("inducing")) for s in kept) < 40  # mostly aligned samples stay
    assert mixed.read_bytes() == before
    assert main(["filter", "--data", str(mixed), "--strategy", "projection", "--fraction", "0.5",
                 "--out", str(tmp_path / "x")]) == 2


def test_both_scores_share_one_collection_of_the_reference_sets(demo_run, organism, tmp_path, caplog):
    """Geometry with reference sets (for the dataset risk) and projection: the second score reads the
    reference activations the first collected, and each writes its own scores."""
    import logging

    from spillover.organism.datasets import reference_set
    from spillover.risk import read_scores, score_file

    out, _ = demo_run
    refs = {kind: write_chat_jsonl(tmp_path / f"{kind}.jsonl", reference_set(organism.world, kind, 40, seed=3))
            for kind in ("toxic", "harmless")}
    geometry, shared = out / "geometry", tmp_path / "references"
    args = ("organism", out / "mitigation" / "mixed.jsonl", geometry / "sae" / "layer_1",
            geometry / "features" / "layer_1" / "toxic.json")
    caplog.set_level(logging.INFO, logger="spillover")
    written = {score: score_file(*args, tmp_path / score, score, refs["toxic"], refs["harmless"], organism.path.parent,
                                 reference_dir=shared)
               for score in ("spillover", "projection")}
    assert sorted(p.name for p in shared.iterdir()) == ["harmless_ref", "toxic_ref"]
    assert caplog.text.count("shards already collected") == 2  # both sets, read by the second score
    assert read_scores(written["spillover"]) != read_scores(written["projection"])
    assert 0 <= json.loads((tmp_path / "spillover" / "score.json").read_text())["dataset_risk"] <= 1


def test_experiment_config_runs_strategies_and_reports_reductions(demo_run, organism, tmp_path, capsys):
    from spillover.cli import main

    out, _ = demo_run
    geometry = out / "geometry"
    inducing = [s for s in read_chat_jsonl(out / "mitigation" / "mixed.jsonl") if s.meta.get("inducing")]
    write_chat_jsonl(tmp_path / "inducing.jsonl", inducing)
    # The organism's health prompts repeat, so sound answers come from another domain: the mix leaves
    # out control rows that share a prompt with an inducing row.
    write_chat_jsonl(tmp_path / "control.jsonl", finetune_set(organism.world, "aligned", 150, seed=0, domain="career"))
    config = tmp_path / "experiment.yaml"
    config.write_text(
        "model: organism\nmix:\n  inducing: {path: inducing.jsonl, limit: 100, seed: 1}\n"
        "  control: {path: control.jsonl, limit: 100, seed: 2}\n  seed: 0\n"
        f"sae: {geometry / 'sae' / 'layer_1'}\n"
        f"toxic: {geometry / 'features' / 'layer_1' / 'toxic.json'}\nquestions: organism\njudge: organism\n"
        "strategies: [geometry, random, judge]\nfractions: [0.5]\nseeds: [0]\npreset: organism\nsamples: 1\n"
        "max_new_tokens: 24\n")
    argv = ["experiment", str(config), "--out", str(tmp_path / "run"), "--cache", str(organism.path.parent)]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    trained = read_chat_jsonl(tmp_path / "run" / "train.jsonl")
    assert sum(bool(s.meta["inducing"]) for s in trained) == 100 and len(trained) == 200
    rows = {r["strategy"]: r for r in summary["table"]}
    assert set(rows) == {"geometry", "random", "judge"}
    assert rows["geometry"]["inducing_removed"] > 0.7 and rows["judge"]["inducing_removed"] == 1.0
    assert set(summary["score_auroc"]) == {"geometry", "judge"} and summary["score_auroc"]["geometry"] > 0.9
    assert rows["judge"]["cost"]["judge_calls"] == 200 and rows["judge"]["cost"]["seconds"] >= 0  # asked once
    assert rows["random"]["reduction_vs_random"] == 0.0
    assert summary["none"]["misaligned_rate"] is not None
    assert summary["base"]["misaligned_rate"] < summary["none"]["misaligned_rate"]  # fine-tuning on inducing data
    assert main(argv) == 0  # a rerun finds every stage done: the same summary, the scoring's cost included
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    layer_1 = config.read_text()
    config.write_text(layer_1.replace("layer_1", "layer_2"))  # other scores: geometry keeps other rows
    geometry_run = tmp_path / "run" / "runs" / "geometry-0.50-seed0"
    kept = (geometry_run / "data" / "kept.jsonl").read_bytes()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"spillover: error: {geometry_run}: made from other inputs than this config gives "
        f"(scores_sha256 differ); delete {geometry_run} to run it again, or choose another --out")
    assert (geometry_run / "data" / "kept.jsonl").read_bytes() == kept  # what its fine-tune was trained on
    config.write_text(layer_1)
    config.write_text(config.read_text().replace("path: control.jsonl", "path: inducing.jsonl"))
    argv[3] = str(tmp_path / "run2")  # a control set with only the inducing prompts leaves nothing to mix
    assert main(argv) == 2 and "field 'mix.control'" in capsys.readouterr().err
    config.write_text(config.read_text() + "colour: red\n")
    assert main(argv) == 2


def test_collect_select_and_a_study_config_on_any_model(demo_run, organism, tmp_path):
    from spillover.cli import main
    from spillover.features import FeatureSet

    out, _ = demo_run
    cache = ["--cache", str(organism.path.parent)]
    sae = out / "geometry" / "sae" / "layer_1"
    assert main(["organism", "sets", "--out", str(tmp_path / "sets"), "--n", "60"]) == 0
    for name in ("inducing", "aligned"):
        assert main(["collect", "--model", "organism", "--data", str(tmp_path / "sets" / f"{name}.jsonl"),
                     "--layers", "1", "--sae", f"1={sae}", "--out", str(tmp_path / name), *cache]) == 0
    assert main(["select", "--activations", str(tmp_path / "inducing"), "--contrast", str(tmp_path / "aligned"),
                 "--layer", "1", "--k", "20", "--name", "inducing", "--out", str(tmp_path / "inducing.json")]) == 0
    chosen = FeatureSet.load(tmp_path / "inducing.json")
    assert len(chosen.indices) == 20 and chosen.scores[0] > 0.5
    study = tmp_path / "study.yaml"
    study.write_text(
        "model: organism\nsets:\n  inducing: sets/inducing.jsonl\n  control: sets/aligned.jsonl\n"
        "  toxic: sets/toxic_reference.jsonl\n  harmless: sets/harmless_reference.jsonl\n"
        f"saes:\n  1: {sae}\nk: 20\nn_boot: 100\nn_perm: 200\n")
    assert main(["geometry", "--config", str(study), "--out", str(tmp_path / "geo"), *cache]) == 0
    geometry = json.loads((tmp_path / "geo" / "geometry.json").read_text())
    assert list(geometry["layers"]) == ["1"]
    study.write_text(study.read_text() + "colour: red\n")
    assert main(["geometry", "--config", str(study), "--out", str(tmp_path / "geo2"), *cache]) == 2


def test_organism_spillover_follows_cosine_where_fine_tuning_acts(demo_run, organism):
    """`spillover theory`'s organism check on the demo's study: every feature's measured change on
    held-out prompts of other domains follows the prediction sum_t alpha_t cos(d_j, d_t)."""
    from spillover.organism.study import organism_saes
    from spillover.organism.theory import (OrganismTheoryConfig, headline_layer, run_organism_spillover,
                                           theory_checks)

    out, _ = demo_run
    study = OrganismStudyConfig(n_per_set=160, sae_conversations=300,
                                sae=TopKTrainingConfig(d_sae=512, k=16, steps=120, batch_size=512))
    saes = organism_saes(organism, out / "geometry", study)  # the demo's, already trained
    layers = run_organism_spillover(organism, saes, out / "geometry", OrganismTheoryConfig(n_train=160, n_held_out=160))
    assert [layer["layer"] for layer in layers] == [0, 1, 2]
    headline = headline_layer(layers)
    chosen = next(layer for layer in layers if layer["layer"] == headline["layer"])
    assert chosen["readout"]["mean_target_gain"] == max(layer["readout"]["mean_target_gain"] for layer in layers)
    assert headline["spearman"] > 0.5, layers  # 0.735 at layer 2 when written
    assert all(layer["readout"]["split_half_spearman"] > 0 for layer in layers)
    assert all(0 < layer["readout_where_active"]["n_features"] <= layer["n_features"] for layer in layers)
    readings = [value for layer in layers for value in layer["activation_of_uniform_shift"].values()]
    assert len(readings) == 6 and all(-1 <= value <= 1 for value in readings)
    checks = theory_checks(0.95, layers)
    assert checks["toy_pearson_at_least_0.9"] and checks["organism_readout_spearman_at_least_0.5"]
    assert not theory_checks(0.85, layers)["toy_pearson_at_least_0.9"]
