"""Liveness on a local store: who works on a run (owner, heartbeat), what a dead process left RUNNING
is marked when found, a takeover is granted to one process only, a broken run is never resumed, and
server failures read as one line."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from argse import tracking
from argse.tracking import owners, store, tags


def _dead_owner() -> str:
    """The owner value of a process of this host that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "import os; print(open(f'/proc/{os.getpid()}/stat').read())"],
                            stdout=subprocess.PIPE, text=True)
    stat = proc.communicate()[0]
    return f"{socket.gethostname()}/{proc.pid}/{stat.rsplit(')', 1)[1].split()[19]}"


def _left_running(owner: str, beat_age: float = 0.0, **tags) -> str:
    """A RUNNING experts run as a process that stopped without ending it leaves one."""
    client = MlflowClient()
    exp = store.experiment_id("ar-gse/digits-lt", create=True)
    run = client.create_run(exp, tags={tracking.TAG_STAGE: "experts", tracking.TAG_DATASET: "digits-lt",
                                       tracking.TAG_OWNER: owner,
                                       tracking.TAG_HEARTBEAT: f"{time.time() - beat_age:.0f}", **tags})
    return run.info.run_id


def test_a_run_whose_process_died_is_marked_failed_when_a_stage_starts(store):
    dead = _left_running(_dead_owner())
    live = _left_running(tracking.owner())  # this process: alive, heartbeat fresh
    with tracking.stage_run("splits", "digits-lt", {"seed": 0}):
        pass
    client = MlflowClient()
    assert client.get_run(dead).info.status == "FAILED"
    assert "its process stopped" in client.get_run(dead).data.tags[tracking.TAG_FAILURE]
    assert client.get_run(live).info.status == "RUNNING"


def test_liveness_of_a_run_on_another_host_is_its_heartbeat(store):
    recent = _left_running("elsewhere/123/456", beat_age=10)
    stale = _left_running("elsewhere/123/456", beat_age=tracking.STALE_AFTER_S + 30)
    client = MlflowClient()
    assert tracking.liveness(client.get_run(recent)).alive
    assert not tracking.liveness(client.get_run(stale)).alive
    said = re.fullmatch(r"it is live \(elsewhere/123/456, last sign of life (\d+) s ago\)", tracking.claim(recent))
    assert said and 10 <= int(said.group(1)) < tracking.STALE_AFTER_S  # the heartbeat's age, not the clock's


def test_a_takeover_is_granted_once_and_then_the_run_is_live(store, monkeypatch):
    run_id = _left_running(_dead_owner())
    assert tracking.claim(run_id) is None  # taken over: marked FAILED on the way
    assert MlflowClient().get_run(run_id).info.status == "FAILED"
    monkeypatch.setattr(owners, "owner", lambda: f"{socket.gethostname()}/1/other")  # a second process
    assert tracking.claim(run_id).startswith("it is live")  # the first one's takeover is fresh


def test_of_two_processes_taking_over_at_once_the_store_accepts_one(store, monkeypatch):
    run_id = _left_running(_dead_owner())
    seen = MlflowClient().get_run(run_id)  # both processes read the run before either writes
    monkeypatch.setattr(MlflowClient, "get_run", lambda self, rid: seen)
    assert tracking.claim(run_id) is None
    monkeypatch.setattr(owners, "owner", lambda: f"{socket.gethostname()}/1/other")
    assert tracking.claim(run_id) == "another process took it over first"


def test_a_run_that_failed_for_good_is_never_taken_over(store):
    with pytest.raises(tracking.RunBroken):
        with tracking.stage_run("experts", "digits-lt", {"seed": 0}) as run:
            raise tracking.RunBroken("the checkpoint of run x is corrupt (UnpicklingError)")
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags[tracking.TAG_RESUMABLE] == "false" and "corrupt" in tags[tracking.TAG_FAILURE]
    assert "a resume cannot fix (the checkpoint of run x is corrupt" in tracking.claim(run.info.run_id)


def test_find_resumable_run_passes_over_a_live_run_and_says_why(store):
    params = {"seed": 0}
    h = tracking.config_hash("experts", params)
    live = _left_running(tracking.owner(), **{tracking.TAG_HASH: h, tracking.TAG_CODE: tracking.code_version()})
    run, passed_over = tracking.find_resumable_run("experts", h, tracking.code_version(), dataset="digits-lt")
    assert run is None and passed_over.startswith(f"run {live} it is live")


def test_the_heartbeat_stamps_open_runs(store, monkeypatch):
    monkeypatch.setattr(tags, "HEARTBEAT_S", 0.2)
    with tracking.stage_run("splits", "digits-lt", {"seed": 0}) as run:
        first = float(MlflowClient().get_run(run.info.run_id).data.tags[tracking.TAG_HEARTBEAT])
        deadline = time.time() + 30
        while float(MlflowClient().get_run(run.info.run_id).data.tags[tracking.TAG_HEARTBEAT]) <= first:
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.2)
        assert MlflowClient().get_run(run.info.run_id).data.tags[tracking.TAG_OWNER] == tracking.owner()


@pytest.mark.parametrize("message, expected", [
    ("API request to endpoint /api/2.0/mlflow/runs/get failed with error code 401 != 200. Response body: 'no'",
     "refused a request without credentials (HTTP 401)"),
    ("API request to http://h/x failed with exception HTTPConnectionPool(host='h', port=1): Max retries exceeded "
     "with url: /x (Caused by ResponseError('too many 503 error responses'))", "its database does not (HTTP 503)"),
    ("API request to http://h/x failed with exception HTTPConnectionPool(host='h', port=1): Read timed out.",
     "stopped answering"),
    ("API request to http://h/x failed with exception HTTPConnectionPool(host='h', port=1): Max retries exceeded "
     "with url: /x (Caused by NewConnectionError('Failed to establish a new connection'))", "cannot reach"),
])
def test_server_failures_read_as_one_line_naming_the_uri(monkeypatch, message, expected):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    line = tracking.server_problem(MlflowException(message), "http://user:secret@team.example:5000")
    assert expected in line and "http://user:***@team.example:5000" in line and "secret" not in line
    assert tracking.server_problem(ValueError("a stage's own error")) is None


@pytest.mark.slow
def test_status_reap_marks_a_killed_stage_failed_within_one_heartbeat_timeout(store, tmp_path):
    """A real `argse experts` killed with SIGKILL: `argse status` shows it dead at once (its process is
    gone from this host), `--reap` marks it FAILED, and a live run beside it is left alone."""
    import os
    import signal

    from conftest import REPO, subprocess_env, with_kill_point

    env = subprocess_env(os.environ["MLFLOW_TRACKING_URI"])
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    argse = [sys.executable, "-m", "argse"]
    assert subprocess.run([*argse, "splits", "--dataset", "digits-lt"], cwd=tmp_path, env=env).returncode == 0
    killed = subprocess.run([*argse, "experts", "--dataset", "digits-lt", "--expert", "ce", "--epochs", "100000",
                             "--checkpoint-every", "1"], cwd=tmp_path, env=with_kill_point(env, "experts:checkpoint"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    killed_at = time.time()
    client = MlflowClient()
    running = [r for r in owners.running_runs("digits-lt") if r.data.tags.get("argse.expert") == "ce"
               and client.get_metric_history(r.info.run_id, "epoch/loss")]
    assert running, "the expert never logged an epoch"
    live = _left_running(tracking.owner())
    (run,) = running
    shown = subprocess.run([*argse, "status", "--dataset", "digits-lt"], cwd=tmp_path, env=env, capture_output=True,
                           text=True)
    line = next(l for l in shown.stdout.splitlines() if l.startswith(run.info.run_id))
    assert " dead " in f" {line} " and client.get_run(run.info.run_id).info.status == "RUNNING", shown.stdout
    reaped = subprocess.run([*argse, "status", "--dataset", "digits-lt", "--reap"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert reaped.returncode == 0, reaped.stderr
    assert "dead, marked FAILED" in next(l for l in reaped.stdout.splitlines() if l.startswith(run.info.run_id))
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert time.time() - killed_at < tracking.STALE_AFTER_S
    assert client.get_run(live).info.status == "RUNNING"
    assert " live " in next(l for l in reaped.stdout.splitlines() if l.startswith(live)) + " "
