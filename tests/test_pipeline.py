"""The pipeline: reuse (the quickstart's rerun through `mlflow run`: tests/test_first_hour.py), --start-from / --stop-at, the dry run,
resuming a killed expert training (a real tracking server: tests/test_benchmark.py, tests/test_team_server.py)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from argse.selective.compare import headline
from argse.stages.pipeline import headline_metrics
from conftest import PIPELINE_ARGS, subprocess_env, with_kill_point

STEPS = ("splits", "experts", "gating-pretrain", "gating-selective", "argse", "evaluate")


def _pipeline_runs(client=None):
    client = client or MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, "tags.\"argse.stage\" = 'pipeline'", order_by=["attributes.start_time DESC"])


def _actions(run):
    return {step: run.data.tags.get(f"argse.step.{step}", "").split(" ")[0] for step in STEPS}


def test_start_from_gating_reuses_splits_and_experts_and_reruns_the_rest(pipeline_store, cli):
    before = _actions(_pipeline_runs()[0])
    result = cli(*PIPELINE_ARGS, "--start-from", "gating")
    assert result.code == 0, result.err
    after = _pipeline_runs()[0]
    actions = _actions(after)
    assert actions["splits"] == actions["experts"] == "reused"
    assert actions["gating-pretrain"] == actions["gating-selective"] == actions["argse"] == actions["evaluate"] == "ran"
    assert before["splits"] == "ran"  # the fixture's pipeline ran everything


def test_stop_at_experts_stops_there(pipeline_store, cli):
    result = cli(*PIPELINE_ARGS, "--stop-at", "experts", "--force")
    assert result.code == 0, result.err
    actions = _actions(_pipeline_runs()[0])
    assert actions["splits"] == actions["experts"] == "ran"
    assert actions["gating-pretrain"] == actions["argse"] == actions["evaluate"] == ""


def test_dry_run_prints_the_plan_and_creates_no_run(pipeline_store, cli):
    client = MlflowClient()
    count = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    result = cli(*PIPELINE_ARGS, "--dry-run")
    assert result.code == 0, result.err
    assert result.out.count("would reuse") == 6
    result = cli(*PIPELINE_ARGS, "--epochs", "5", "--dry-run")
    assert "splits            would reuse" in result.out and result.out.count("would run") == 5
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == count


def test_start_from_without_anything_to_reuse_is_one_line(store, cli):
    result = cli(*PIPELINE_ARGS, "--start-from", "argse")
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1
    assert "needs a FINISHED splits run" in result.err


@pytest.mark.slow
def test_killed_during_expert_training_resumes_from_the_checkpoint(store, tmp_path):
    cmd = [sys.executable, "-m", "argse", "pipeline", "--dataset", "digits-lt", "--epochs", "30",
           "--checkpoint-every", "1", "--stop-at", "experts"]
    env = subprocess_env(store)
    stopped = subprocess.run(cmd, cwd=tmp_path, env=with_kill_point(env, "experts:checkpoint:logitadjust:3"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert stopped.returncode == -signal.SIGKILL
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    (killed,) = client.search_runs(exps, "tags.\"argse.expert\" = 'logitadjust'")
    steps = client.get_metric_history(killed.info.run_id, "epoch/val_acc")
    assert len(steps) >= 3 and client.list_artifacts(killed.info.run_id, "checkpoints"), \
        "expert training never reached its third epoch"
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming unfinished run" in done.stdout and "resuming run" in done.stdout
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch/val_acc"))
    assert set(steps) == set(range(1, 31))
    ce = client.search_runs([run.info.experiment_id], "tags.\"argse.expert\" = 'ce'")
    assert len(ce) == 1 and ce[0].info.status == "FINISHED"  # finished before the kill: kept, not retrained


def test_the_headline_metrics_differ_within_the_run_lists_column_width():
    # The rows headline() picks: the registered ar-gse row, the best Chow and single-expert plug-in rows
    # per area (chow[ce] is best in one area, chow[balsoftmax] in the other).
    import pandas as pd

    table = pd.DataFrame([
        {"method": "ar-gse[worst]", "aurc_worst": 0.010, "aurc_balanced": 0.008},
        {"method": "ar-gse[balanced]", "aurc_worst": 0.013, "aurc_balanced": 0.007},
        {"method": "chow[ce]", "aurc_worst": 0.015, "aurc_balanced": 0.020},
        {"method": "chow[balsoftmax]", "aurc_worst": 0.016, "aurc_balanced": 0.011},
        {"method": "plugin-worst[logitadjust]", "aurc_worst": 0.012, "aurc_balanced": 0.009},
        {"method": "plugin-worst[uniform-ensemble]", "aurc_worst": 0.001, "aurc_balanced": 0.001},
    ])
    metrics = headline_metrics(headline(table, "worst", ("ce", "logitadjust", "balsoftmax")))
    assert metrics == {"worst/registered": 0.010, "worst/chow": 0.015, "worst/expert": 0.012,
                       "balanced/registered": 0.008, "balanced/chow": 0.011, "balanced/expert": 0.009}
    assert len({name[:14] for name in metrics}) == len(metrics)

