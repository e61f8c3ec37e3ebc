"""`bemerc compare` on two real baseline runs, and the bootstrap interval and paired test behind it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bemerc.train.evaluate import bootstrap_interval, bootstrap_intervals, paired_test
from conftest import ngram_store


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, meld_dir):
    """(store, [run ids]) of two baselines (dialogue context 0 and 3) on :func:`ngram_store`."""
    from bemerc.cli import app

    folder = tmp_path_factory.mktemp("compare")
    store = ngram_store(folder, meld_dir)
    runner = CliRunner()
    run_ids = []
    for context in ("0", "3"):
        result = runner.invoke(app, ["baseline", "--store", str(store.path), "--context", context, "--run-dir", str(folder / f"run{context}"), "--json"])
        assert result.exit_code == 0, result.output
        run_ids.append(json.loads(result.output)["run_id"])
    return store, run_ids


def test_report_files_hold_the_runs_and_their_numbers(two_runs, tmp_path):
    from bemerc.cli import app

    store, run_ids = two_runs
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["compare", "--store", str(store.path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out / "report.html") in result.output.replace("\n", "")
    page = (out / "report.html").read_text(encoding="utf-8")
    markdown = (out / "report.md").read_text(encoding="utf-8")
    data = json.loads(CliRunner().invoke(app, ["compare", "--store", str(store.path), "--json"]).output)
    assert sorted(r["run_id"] for r in data["runs"]) == sorted(run_ids)
    for run in data["runs"]:
        assert run["run_id"] in page and run["run_id"] in markdown
        assert f"{run['weighted_f1']:.4f}" in page and f"{run['macro_f1']:.4f}" in page
        assert (out / f"confusion_{run['run_id']}.png").stat().st_size > 5_000
        assert f"confusion_{run['run_id']}.png" in markdown
        assert (out / f"ablation_{run['run_id']}.png").stat().st_size > 5_000
    assert (out / "per_class_f1.png").stat().st_size > 5_000
    assert page.count("data:image/png;base64,") == 1 + 2 + 2  # per-class F1, confusions, ablations
    assert f"p = {data['paired_test']['p_value']:.4f}" in page


def test_json_scores_match_the_runs_own_metrics(two_runs):
    from bemerc.cli import app

    store, run_ids = two_runs
    result = CliRunner().invoke(app, ["compare", *run_ids[::-1], "--store", str(store.path), "--split", "test", "--json"])
    data = json.loads(result.output)
    assert data["split"] == "test" and [r["run_id"] for r in data["runs"]] == run_ids[::-1]
    for run in data["runs"]:
        own = json.loads(store.read("runs", where=f"run_id = '{run['run_id']}'")["metrics_json"][0])["test"]
        assert run["weighted_f1"] == pytest.approx(own["weighted_f1"]) and run["n"] == own["n"]
        assert run["ci"]["weighted_f1"]["low"] <= run["weighted_f1"] <= run["ci"]["weighted_f1"]["high"]
        assert np.allclose(np.sum(run["confusion"], axis=1), [v["support"] for v in own["per_class"].values()])
    test = data["paired_test"]
    assert {test["run_a"], test["run_b"]} == set(run_ids) and 0 < test["p_value"] <= 1
    assert set(data["ablation"][run_ids[0]]["ablation"]) == {"text", "text+lexical"}


def test_compare_names_an_unknown_run(two_runs):
    from bemerc.cli import app

    store, run_ids = two_runs
    result = CliRunner().invoke(app, ["compare", "baseline-nope", "--store", str(store.path)])
    assert result.exit_code == 1 and "no run 'baseline-nope'" in result.output and run_ids[0] in result.output


# -- the statistics ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictions():
    """gold and two predictions of 600 utterances: A right 70% of the time, B 50% (fixed seed)."""
    rng = np.random.default_rng(7)
    gold = rng.integers(0, 7, 600)
    a = np.where(rng.random(600) < 0.7, gold, rng.integers(0, 7, 600))
    b = np.where(rng.random(600) < 0.5, gold, rng.integers(0, 7, 600))
    return gold, a, b


def test_paired_test_is_one_for_identical_predictions(predictions):
    gold, a, _ = predictions
    for method in ("permutation", "bootstrap"):
        result = paired_test(gold, a, a.copy(), 7, method=method, n_resamples=300)
        assert result["p_value"] == 1.0 and result["difference"] == 0.0


def test_paired_test_separates_clearly_different_runs(predictions):
    gold, a, b = predictions
    for method in ("permutation", "bootstrap"):
        result = paired_test(gold, a, b, 7, method=method, n_resamples=500)
        assert result["difference"] > 0.1 and 0 < result["p_value"] < 0.01
    # three changed answers out of 600 are no evidence of a difference
    right = np.flatnonzero(a == gold)[:3]
    slightly_worse = a.copy()
    slightly_worse[right] = (gold[right] + 1) % 7
    assert paired_test(gold, a, slightly_worse, 7, n_resamples=500)["p_value"] > 0.1


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_data(predictions):
    gold, a, _ = predictions
    wide = bootstrap_interval(gold[:100], a[:100], 7, n_resamples=500)
    narrow = bootstrap_interval(gold, a, 7, n_resamples=500)
    for ci in (wide, narrow):
        assert ci["low"] <= ci["estimate"] <= ci["high"]
    assert narrow["high"] - narrow["low"] < wide["high"] - wide["low"]
    dialogues = np.arange(600) // 8
    grouped = bootstrap_intervals(gold, a, 7, n_resamples=500, groups=dialogues)
    assert all(v["low"] <= v["estimate"] <= v["high"] for v in grouped.values())
