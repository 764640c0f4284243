"""The splits stage through the CLI and through `mlflow run`: runs, artifacts, inputs, errors."""

from __future__ import annotations

import pytest

import subprocess
import sys

import numpy as np
from mlflow.tracking import MlflowClient

from argse.artifacts import load_splits
from conftest import REPO, subprocess_env


def _runs(stage="splits"):
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, filter_string=f"tags.\"argse.stage\" = '{stage}'")


def test_digits_splits_run_logs_artifacts_metrics_inputs_and_figure(store, cli):
    result = cli("splits", "--dataset", "digits-lt", "--verbose")
    assert result.code == 0, result.err
    assert "head" in result.out and "tail" in result.out  # the distribution table
    (run,) = _runs()
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"splits", "class_distribution.png"} <= artifacts
    files = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "splits")}
    assert {"splits/indices.npz", "splits/weights.npz", "splits/class_to_group.csv", "splits/splits.json",
            "splits/class_counts.json", "splits/labels.npz"} <= files
    assert run.data.metrics["classes_head"] + run.data.metrics["classes_tail"] == 10
    assert run.data.metrics["imb_factor_achieved"] > 15
    assert run.data.params["imb_factor"] == "20.0" and run.data.params["group_thresholds"] == "20"
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"train", "tunev", "val", "test"}
    splits = load_splits(run.info.run_id)
    assert {i.dataset.digest for i in run.inputs.dataset_inputs} == {f"{splits.fingerprint[:12]}-{c}" for c in contexts}


def test_same_seed_twice_gives_identical_indices(store, cli):
    assert cli("splits", "--dataset", "digits-lt", "--seed", "5").code == 0
    again = cli("splits", "--dataset", "digits-lt", "--seed", "5")  # by default it would reuse the first run
    assert again.code == 0 and "reused" in again.out
    assert cli("splits", "--dataset", "digits-lt", "--seed", "5", "--rerun").code == 0
    a, b = (load_splits(r.info.run_id) for r in _runs())
    for name in ("train", "tunev", "val", "test"):
        np.testing.assert_array_equal(a.indices[name], b.indices[name])


def test_cifar_format_folder_works_offline(store, cli, cifar_dir, offline):
    result = cli("splits", "--dataset", "cifar100-lt", "--data-dir", cifar_dir)
    assert result.code == 0, result.err
    (run,) = _runs()
    assert run.info.status == "FINISHED" and run.data.metrics["n_test"] == 500


def test_empty_data_dir_is_one_line_nonzero_and_no_finished_run(store, cli, tmp_path, offline):
    empty = tmp_path / "nothing-here"
    result = cli("splits", "--dataset", "cifar100-lt", "--data-dir", empty)
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and str(empty) in lines[0] and "cifar-100-python" in lines[0]
    assert [r.info.status for r in _runs()] == ["FAILED"]


def test_dry_run_creates_no_run(store, cli):
    result = cli("splits", "--dataset", "digits-lt", "--dry-run")
    assert result.code == 0 and "dry run" in result.out
    assert _runs() == []


def test_bad_option_is_usage_error(store, cli):
    result = cli("splits", "--dataset", "digits-lt", "--group-thresholds", "20,100")
    assert result.code == 2 and "strictly decreasing" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert cli("splits", "--dataset", "imagenet").code == 2


@pytest.mark.slow
def test_mlflow_run_entry_point(store, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "splits", "--env-manager", "local",
         "-P", "dataset=digits-lt"],
        cwd=tmp_path, env=subprocess_env(store), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The stage run in ar-gse/digits-lt with the resolved params; MLflow's own run (in Default, with the
    # raw -P values) is left as the launcher that points at it.
    runs = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    (run,) = [r for r in runs if r.info.experiment_id != "0"]
    (launcher,) = [r for r in runs if r.info.experiment_id == "0"]
    assert run.info.status == "FINISHED" and launcher.data.tags["argse.launched"] == f"ar-gse/digits-lt/{run.info.run_id}"
    assert run.data.params["imb_factor"] == "20.0" and launcher.data.params["imb_factor"] == "preset"
    assert {"splits", "class_distribution.png"} <= {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
