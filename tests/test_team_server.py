"""A team on one server, for real: PostgreSQL, `mlflow server` with proxied artifacts and basic-auth
(see team_server.py), and `argse` processes started as teammates start them. Two identical
pipelines at once, concurrent fits, kill -9 at every stage boundary, a corrupt checkpoint, a frozen
server, its database down, strangers refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from argse.registry import CHAMPION_PARAM
from conftest import REPO, with_kill_point
from team_server import ADMIN, USER, PostgresCluster, TrackingServer, credentials_in_env, postgres_bin

pytestmark = pytest.mark.skipif(
    postgres_bin() is None,
    reason="PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (.ci/run installs Debian's "
           "postgresql package; by hand: apt-get install postgresql)")

EXPERTS = ("ce", "logitadjust", "balsoftmax")
# The fewest epochs that still go through every code path: two expert epochs (so a checkpoint comes
# before the last one), one selective round, two EG rounds.
TINY = ("--dataset", "digits-lt", "--epochs", "2", "--checkpoint-every", "1", "--gating-epochs", "2",
        "--selective-rounds", "1", "--epochs-per-round", "1", "--eg-rounds", "2", "--n-boot", "5",
        "--coverage-grid", "1,0.5")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The team server, and this process acting as a teammate (credentials in the environment)."""
    cluster = PostgresCluster().start()
    team = TrackingServer(cluster, tmp_path_factory.mktemp("team-server"))
    try:
        team.start()
        with credentials_in_env(USER):
            yield team
    finally:
        team.stop()
        cluster.stop()


def _env(server, credentials=USER, **extra) -> dict[str, str]:
    env = server.client_env(credentials)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    if "ARGSE_KILL_AT" in extra:
        env = with_kill_point(env, extra.pop("ARGSE_KILL_AT"))
    env.update(extra)
    return env


def _start(server, cwd, *args, credentials=USER, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "argse", *args], cwd=cwd, env=_env(server, credentials, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _argse(server, cwd, *args, credentials=USER, timeout=600, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "argse", *args], cwd=cwd, env=_env(server, credentials, **extra),
                          capture_output=True, text=True, timeout=timeout)


def _finish(proc: subprocess.Popen, timeout=600) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _client(server) -> MlflowClient:
    return MlflowClient(tracking_uri=server.uri)


def _runs(client, experiment, filter_string=""):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string, max_results=1000) if exp else []


def _step(pipeline_run, name):
    return pipeline_run.data.tags[f"argse.step.{name}"].split(" ")[1]


def _best_versions(client, name):
    """The versions the rule may name: the lowest champion criterion (the write-once param of the fit
    run, to 9 decimals) among versions whose run FINISHED, computed here from the runs' own params. Of
    versions that tie, whichever became champion first stays, so any of them may be it."""
    ranked = []
    for version in client.search_model_versions(f"name = '{name}'"):
        run = client.get_run(version.tags["argse.run_id"])
        if run.info.status == "FINISHED":
            ranked.append((round(float(run.data.params[CHAMPION_PARAM]), 9), version.version))
    best = min(value for value, _ in ranked)
    return {version for value, version in ranked if value == best}


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def twins(server, tmp_path_factory):
    """Two identical pipelines started as two teammates would: the second while the first trains its
    experts. Returns ``(first, second)`` completed processes."""  # noqa: D401
    cwd = tmp_path_factory.mktemp("twins")
    args = ("pipeline", *TINY, "--experiment", "team-twins", "--register-name", "team-twins")
    first = _start(server, cwd, *args)
    client, deadline = _client(server), time.time() + 300
    while not _runs(client, "team-twins", "tags.\"argse.expert\" = 'all' and attributes.status = 'RUNNING'"):
        assert first.poll() is None and time.time() < deadline, _finish(first).stderr[-3000:]
        time.sleep(0.5)
    second = _start(server, cwd, *args)
    return _finish(first), _finish(second)


def test_two_identical_pipelines_at_once_train_once_the_second_waits_and_reuses(server, twins):
    first, second = twins
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    # The second found the first live (same configuration, started first), said so in one line, waited,
    # and then reused every stage the first made: nothing is trained twice.
    notes = [line for line in second.stdout.splitlines() if line.startswith("pipeline: run ")]
    assert len(notes) == 1 and "waiting for it, then reusing its stages" in notes[0], second.stdout[-3000:]
    client = _client(server)
    runs = _runs(client, "team-twins")
    assert {r.info.status for r in runs} == {"FINISHED"}
    pipelines = sorted((r for r in runs if r.data.tags.get("argse.stage") == "pipeline"), key=lambda r: r.info.start_time)
    assert len(pipelines) == 2
    steps = ("splits", "experts", "gating-pretrain", "gating-selective", "argse", "evaluate")
    assert {pipelines[1].data.tags[f"argse.step.{s}"].split()[0] for s in steps} == {"reused"}
    assert [_step(pipelines[0], s) for s in steps] == [_step(pipelines[1], s) for s in steps]
    parent = _step(pipelines[0], "experts")
    assert len([r for r in runs if r.data.tags.get("argse.expert") == "all"]) == 1  # one experts run
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.data.tags["argse.expert"] for r in children) == sorted(EXPERTS)
    for child in children:
        assert len(child.outputs.model_outputs) == 1  # one logged model per expert run
    champion = client.get_model_version_by_alias("team-twins", "champion")
    assert champion.version in _best_versions(client, "team-twins")


def test_concurrent_fits_leave_champion_on_the_best_finished_version(server, twins, tmp_path):
    client = _client(server)
    pipeline = next(r for r in _runs(client, "team-twins") if r.data.tags.get("argse.stage") == "pipeline")
    gating = _step(pipeline, "gating-selective")
    # Fits with different rounds have different champion criteria (the cost does not enter it).
    for fits in ((("0.05", "1"), ("0.4", "2")), (("0.3", "3"), ("0.1", "4"))):
        procs = [_start(server, tmp_path, "fit", "--dataset", "digits-lt", "--gating-run", gating, "--cost", cost,
                        "--rounds", rounds, "--experiment", "team-fits", "--register-name", "team-fits")
                 for cost, rounds in fits]
        for done in map(_finish, procs):
            assert done.returncode == 0, done.stderr[-3000:]
            assert "registered team-fits v" in done.stdout
        champion = client.get_model_version_by_alias("team-fits", "champion")
        assert champion.version in _best_versions(client, "team-fits")
    fits = _runs(client, "team-fits")
    assert len(fits) == 4 and {r.info.status for r in fits} == {"FINISHED"}
    decisions = [r.data.tags["argse.champion_decision"] for r in fits]
    assert sum("as champion" in d for d in decisions) >= 1


# The boundaries of the pipeline's steps (data | experts | gating | argse | eval), two inside the fit,
# and one inside expert training (to leave a checkpoint behind): tests/killpoints/sitecustomize.py.
KILL_POINTS = ("pipeline:splits", "experts:checkpoint", "pipeline:experts", "pipeline:gating-selective",
              "argse:registered", "argse:finished", "pipeline:evaluate")


def test_kill_at_every_stage_boundary_then_rerun(server, tmp_path):
    """kill -9 at each boundary (and inside the fit: after registering, after the run FINISHED), each
    time followed by a plain rerun; on the way a corrupt checkpoint and a champion left on a run that
    never finished. In the end nothing is RUNNING and champion is on a FINISHED run."""
    client = _client(server)
    args = ("pipeline", *TINY, "--experiment", "team-kills", "--register-name", "team-kills")
    outputs = {}
    for point in KILL_POINTS:
        done = _argse(server, tmp_path, *args, ARGSE_KILL_AT=point)
        assert done.returncode == -signal.SIGKILL, f"{point}: {done.stderr[-3000:]}"
        outputs[point] = done.stdout
        if point == "experts:checkpoint":  # the first expert's checkpoint is damaged while it is down
            (killed,) = _runs(client, "team-kills", "tags.\"argse.expert\" = 'ce' and attributes.status = 'RUNNING'")
            (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
            client.log_artifact(killed.info.run_id, str(tmp_path / "last.pt"), "checkpoints")
        if point == "argse:registered":  # what older code left: champion on a version whose run died
            (orphan,) = client.search_model_versions("name = 'team-kills'")
            client.set_registered_model_alias("team-kills", "champion", orphan.version)
    final = _argse(server, tmp_path, *args)
    assert final.returncode == 0, final.stderr[-3000:]

    # The rerun after the corrupt checkpoint replaced the broken experts run in one go.
    resumed = outputs["pipeline:experts"]
    assert "experts: resuming unfinished run" in resumed and "is corrupt" in resumed, resumed[-3000:]
    assert "starting a fresh run" in resumed, resumed[-3000:]
    # The reused fit moved champion off the version whose run never finished.
    assert "argse: moved team-kills@champion to v2" in outputs["pipeline:evaluate"], outputs["pipeline:evaluate"]
    runs = _runs(client, "team-kills")
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    broken = [r for r in runs if r.data.tags.get("argse.resumable") == "false"]
    assert {r.data.tags.get("argse.expert") for r in broken} == {"all", "ce"}
    champion = client.get_model_version_by_alias("team-kills", "champion")
    assert client.get_run(champion.tags["argse.run_id"]).info.status == "FINISHED"
    assert _best_versions(client, "team-kills") == {champion.version} == {"2"}
    newest = max((r for r in runs if r.data.tags.get("argse.stage") == "pipeline"), key=lambda r: r.info.start_time)
    assert newest.info.status == "FINISHED"
    assert {newest.data.tags[f"argse.step.{s}"].split(" ")[0] for s in
            ("splits", "experts", "gating-pretrain", "gating-selective", "argse", "evaluate")} == {"reused"}


def test_frozen_server_stops_a_training_stage_within_30_s_with_one_line(server, twins, tmp_path):
    client = _client(server)
    pipeline = next(r for r in _runs(client, "team-twins") if r.data.tags.get("argse.stage") == "pipeline")
    proc = _start(server, tmp_path, "experts", "--dataset", "digits-lt", "--expert", "ce", "--epochs", "1000",
                  "--splits-run", _step(pipeline, "splits"), "--experiment", "team-freeze")
    deadline = time.time() + 120
    while not _runs(client, "team-freeze", "attributes.status = 'RUNNING'"):
        assert proc.poll() is None and time.time() < deadline, _finish(proc).stderr[-3000:]
        time.sleep(0.2)
    server.signal(signal.SIGSTOP)
    frozen = time.perf_counter()
    try:
        done = _finish(proc, timeout=120)
        seconds = time.perf_counter() - frozen
    finally:
        server.signal(signal.SIGCONT)
    assert done.returncode == 1
    line = _one_line(done.stderr)
    assert server.uri in line and "stopped answering" in line, line
    assert seconds < 30, f"the stage took {seconds:.1f} s to stop"
    # The run it could not end (unless the server, thawed, still ran its last short try to end it) is
    # marked when the next stage looks.
    (left,) = _runs(client, "team-freeze")
    later = _argse(server, tmp_path, "splits", "--dataset", "digits-lt", "--experiment", "team-freeze")
    assert later.returncode == 0, later.stderr[-3000:]
    after = client.get_run(left.info.run_id)
    assert after.info.status == "FAILED"
    if left.info.status == "RUNNING":
        assert "its process stopped" in after.data.tags["argse.failure"]


def test_strangers_are_refused_and_a_dead_database_is_named(server, twins, tmp_path):
    first, _ = twins
    assert first.returncode == 0  # an authenticated teammate ran the whole pipeline
    args = ("splits", "--dataset", "digits-lt", "--experiment", "team-strangers")
    anonymous = _argse(server, tmp_path, *args, credentials=None)
    assert anonymous.returncode == 1
    line = _one_line(anonymous.stderr)
    assert "refused a request without credentials (HTTP 401)" in line and server.uri in line
    wrong = _argse(server, tmp_path, *args, credentials=(USER[0], "not-the-password"))
    assert wrong.returncode == 1
    line = _one_line(wrong.stderr)
    assert f"refused the credentials of user '{USER[0]}' (HTTP 401)" in line
    assert _client(server).get_experiment_by_name("team-strangers") is None  # they created nothing
    server.cluster.stop(remove=False)
    try:
        down = _argse(server, tmp_path, *args, credentials=ADMIN)
    finally:
        server.cluster.restart()
    assert down.returncode == 1
    line = _one_line(down.stderr)
    assert "answers, but its database does not (HTTP 503)" in line and server.uri in line
