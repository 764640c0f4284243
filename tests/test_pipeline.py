"""The pipeline: the quickstart through `mlflow run`, reuse, --start-from / --stop-at, the dry run,
resuming a killed expert training, and a real tracking server."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from conftest import PIPELINE_ARGS, REPO, free_port, subprocess_env

STEPS = ("splits", "experts", "gating-pretrain", "gating-selective", "argse", "evaluate")


def _pipeline_runs(client=None):
    client = client or MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, "tags.\"argse.stage\" = 'pipeline'", order_by=["attributes.start_time DESC"])


def _actions(run):
    return {step: run.data.tags.get(f"argse.step.{step}", "").split(" ")[0] for step in STEPS}


def test_quickstart_through_mlflow_run_and_the_rerun_reuses_every_stage(store, tmp_path):
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", "-P", "dataset=digits-lt",
           "-P", "epochs=3", "-P", "gating_epochs=10", "-P", "n_boot=20"]
    first = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(store), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "| method |" in first.stdout and "as champion" in first.stdout and "mlflow ui" in first.stdout, first.stdout[-3000:]
    client = MlflowClient()
    champion = client.get_model_version_by_alias("ar-gse-digits-lt", "champion")
    (run,) = _pipeline_runs()
    assert run.info.status == "FINISHED" and set(_actions(run).values()) == {"ran"}
    evaluate_id = run.data.tags["argse.step.evaluate"].split(" ")[1]
    assert client.get_run(evaluate_id).info.status == "FINISHED"
    assert champion.run_id == run.data.tags["argse.step.argse"].split(" ")[1]

    started = time.perf_counter()
    second = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(store), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    seconds = time.perf_counter() - started
    newest = _pipeline_runs()[0]
    assert set(_actions(newest).values()) == {"reused"}, second.stdout[-3000:]
    assert "| method |" in second.stdout, second.stdout[-3000:]  # the evaluate table, read back
    assert seconds < 60, f"the all-reused rerun took {seconds:.0f} s"


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


def test_killed_during_expert_training_resumes_from_the_checkpoint(store, tmp_path):
    cmd = [sys.executable, "-m", "argse", "pipeline", "--dataset", "digits-lt", "--epochs", "30",
           "--checkpoint-every", "1", "--stop-at", "experts"]
    env = subprocess_env(store)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient()
    killed = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and killed is None:
            exps = [e.experiment_id for e in client.search_experiments()]
            for run in client.search_runs(exps, "tags.\"argse.expert\" = 'logitadjust'"):
                steps = client.get_metric_history(run.info.run_id, "val_acc")
                if len(steps) >= 3 and client.list_artifacts(run.info.run_id, "checkpoints"):
                    killed = run
            time.sleep(0.3)
        assert killed is not None, "expert training never reached its third epoch"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming unfinished run" in done.stdout and "resuming run" in done.stdout
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))
    assert set(steps) == set(range(1, 31))
    ce = client.search_runs([run.info.experiment_id], "tags.\"argse.expert\" = 'ce'")
    assert len(ce) == 1 and ce[0].info.status == "FINISHED"  # finished before the kill: kept, not retrained


def test_against_a_real_tracking_server(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, env=subprocess_env(uri), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    work = tmp_path / "client"
    work.mkdir()
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail("mlflow server did not start: " + server.stderr.read().decode()[-2000:])
                time.sleep(0.5)
        done = subprocess.run([sys.executable, "-m", "argse", *PIPELINE_ARGS], cwd=work, env=subprocess_env(uri),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        other = MlflowClient(tracking_uri=uri)  # a second client, as a teammate would use
        (pipeline,) = _pipeline_runs(other)
        argse_id = pipeline.data.tags["argse.step.argse"].split(" ")[1]
        assert other.get_run(argse_id).data.metrics["val_coverage"] > 0
        assert other.get_model_version_by_alias("ar-gse-digits-lt", "champion").run_id == argse_id
        assert any(a.path == "splits" for a in other.list_artifacts(pipeline.data.tags["argse.step.splits"].split(" ")[1]))
    finally:
        server.terminate()
        server.wait(timeout=30)
    failed = subprocess.run([sys.executable, "-m", "argse", "splits", "--dataset", "digits-lt"], cwd=work,
                            env=subprocess_env(uri), capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    lines = [line for line in failed.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and uri in lines[0]
