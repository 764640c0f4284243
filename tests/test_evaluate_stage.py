"""The evaluate stage on a digits-lt AR-GSE run: table, metrics, figures, splits, bad model URIs."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from argse import tracking
from argse.stages.evaluate import METRIC_COLUMNS
from argse.tracking.metric_names import metric_key

METHODS = {"chow[ce]", "chow[logitadjust]", "chow[balsoftmax]", "chow[uniform-ensemble]", "ar-gse[balanced]",
           "ar-gse[worst]", "plugin-balanced[uniform-ensemble]", "plugin-worst[uniform-ensemble]"}


def _evaluate_runs():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.\"argse.stage\" = 'evaluate'", order_by=["attributes.start_time DESC"])


@pytest.mark.parametrize("split", ["test", "val", "tunev"])
def test_table_equals_the_logged_metrics_on_every_split(chain_store, cli, split):
    _, ids = chain_store
    result = cli("evaluate", "--dataset", "digits-lt", "--split", split, "--n-boot", "20", "--coverage-grid", "1,0.8,0.6,0.4,0.2")
    assert result.code == 0, result.err
    assert "| method |" in result.out  # the summary table is printed without --verbose
    run = _evaluate_runs()[0]
    assert run.info.status == "FINISHED" and run.data.tags["argse.upstream.argse"] == ids["argse"]
    assert run.data.metrics["model_check_agreement"] == 1.0
    table = pd.read_csv(tracking.download(run.info.run_id, "results/table.csv"))
    assert table.columns[0] == "method" and METHODS <= set(table["method"])
    assert any(m.startswith("plugin-worst[") for m in table["method"])
    logged = {k: v for k, v in run.data.metrics.items() if "/" in k}
    expected = {metric_key(row["method"], column): row[column] for _, row in table.iterrows() for column in METRIC_COLUMNS}
    assert set(logged) == set(expected)  # the headline columns of every method, and nothing else per method
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-9, abs=1e-12)
    for column in ("aurc_balanced", "aurc_worst", "aurc_worst_threshold", "worst_error_at0.8"):
        assert table[column].between(0, 1).all()
    assert table[["aurc_balanced", "aurc_worst"]].le(0.8).all().all()  # the grid spans [0.2, 1]
    assert (table["aurc_worst_lo"] <= table["aurc_worst"]).all() and (table["aurc_worst"] <= table["aurc_worst_hi"]).all()
    # Ranked by the coverage-matched worst-group AURC; no cost-sweep column is left.
    assert table["aurc_worst"].is_monotonic_increasing
    assert not any("costsweep" in c for c in table.columns)
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "figures")}
    assert artifacts == {"figures/rc_balanced.png", "figures/rc_worst.png", "figures/group_coverage.png"}
    points = pd.read_csv(tracking.download(run.info.run_id, "results/coverage_points.csv"))
    assert list(points.columns) == ["method", "target_coverage", "coverage", "balanced_error", "worst_error",
                                    "thin_group"]
    assert len(points) == 5 * len(table) and points["coverage"].between(0, 1).all()
    assert sorted(points["target_coverage"].unique()) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert {"results/table.csv", "results/table.md", "results/coverage_points.csv",
            "results/coverage_points_by_group.csv"} == {
        a.path for a in MlflowClient().list_artifacts(run.info.run_id, "results")}


def test_model_uri_forms_and_save_results(chain_store, cli, tmp_path):
    _, ids = chain_store
    for uri in (f"runs:/{ids['argse']}/model", "models:/ar-gse-digits-lt@champion"):
        result = cli("evaluate", "--dataset", "digits-lt", "--model-uri", uri, "--n-boot", "10", "--coverage-grid", "1,0.6,0.2",
                     "--save-results", "--output-dir", tmp_path / "out")
        assert result.code == 0, result.err
        assert _evaluate_runs()[0].data.tags["argse.model_uri"] == uri
    assert (tmp_path / "out" / "table.csv").is_file() and (tmp_path / "out" / "coverage_points.csv").is_file()


@pytest.mark.parametrize("uri, message", [
    ("models:/no-such-model@champion", "does not resolve in the model registry"),
    ("runs:/" + "0" * 32 + "/model", "does not exist"),
    ("s3://bucket/model", "is not a run reference"),
])
def test_unknown_model_uri_is_one_line_and_nonzero(chain_store, cli, uri, message):
    result = cli("evaluate", "--dataset", "digits-lt", "--model-uri", uri)
    assert result.code == 1 and message in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert _evaluate_runs()[0].info.status == "FAILED"


@pytest.mark.parametrize("grid, message", [
    ("1.5,0.5", "must lie in (0, 1]"),
    ("0.8,0,0.2", "must lie in (0, 1]"),
    (",", "at least two"),
    ("0.5", "at least two"),
])
def test_bad_coverage_grid_is_one_line_and_nonzero(chain_store, cli, grid, message):
    result = cli("evaluate", "--dataset", "digits-lt", "--coverage-grid", grid)
    assert result.code != 0 and message in result.err and "--coverage-grid" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert all(r.info.status != "FINISHED" for r in _evaluate_runs()
               if r.data.params.get("coverage_grid") == grid)
