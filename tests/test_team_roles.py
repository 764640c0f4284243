"""The team roles of docs/team-server.md on a real server (PostgreSQL, basic-auth, default READ): a
maintainer's work cannot be changed by a teammate (403 for every write), a teammate trains, fits and
registers candidates in their own space, and a candidate becomes the champion only through a
maintainer's `argse team promote`, by the champion criterion. Each statement of the doc's role table
has a line here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conftest import REPO
from team_server import ADMIN, PostgresCluster, TrackingServer, credentials_in_env, postgres_bin

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    postgres_bin() is None,
    reason="PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (.ci/run installs Debian's "
           "postgresql package; by hand: apt-get install postgresql)")]

ALICE = ("alice", "alice-password-1234")  # the maintainer of digits-lt
BOB = ("bob", "bob-password-1234")  # a teammate
TINY = ("--dataset", "digits-lt", "--epochs", "2", "--gating-epochs", "2", "--selective-rounds", "1",
        "--epochs-per-round", "1", "--eg-rounds", "2", "--n-boot", "5", "--coverage-grid", "1,0.5")


def _argse(server, credentials, *args) -> subprocess.CompletedProcess:
    env = server.client_env(credentials)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    return subprocess.run([sys.executable, "-m", "argse", *args], cwd=server.workdir, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    cluster = PostgresCluster().start()
    server = TrackingServer(cluster, tmp_path_factory.mktemp("team-roles"))
    try:
        server.start()
        for user in (ALICE, BOB):
            server.create_user(*user)
        grants = {name: _argse(server, ADMIN, "team", "grant", name, role, "--dataset", "digits-lt")
                  for name, role in (("alice", "maintainer"), ("bob", "teammate"))}
        alice = _argse(server, ALICE, "pipeline", *TINY, "--experiment", "ar-gse/digits-lt")
        bob = _argse(server, BOB, "pipeline", *TINY, "--experiment", "ar-gse/digits-lt/bob",
                     "--register-name", "ar-gse-digits-lt-bob")
        yield server, grants, alice, bob
    finally:
        server.stop()
        cluster.stop()


def _runs(client, experiment: str, stage: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.\"argse.stage\" = '{stage}'",
                              order_by=["attributes.start_time DESC"])


def test_grant_gives_each_role_what_the_doc_says(team):
    _, grants, _, _ = team
    assert grants["alice"].returncode == 0, grants["alice"].stderr[-2000:]
    assert grants["alice"].stdout.splitlines() == ["alice: MANAGE on experiment ar-gse/digits-lt",
                                                   "alice: MANAGE on registered model ar-gse-digits-lt"]
    assert grants["bob"].stdout.splitlines() == ["bob: MANAGE on experiment ar-gse/digits-lt/bob",
                                                 "bob: MANAGE on registered model ar-gse-digits-lt-bob"]


def test_a_maintainer_runs_the_shared_pipeline_and_a_teammate_their_own(team):
    server, _, alice, bob = team
    assert alice.returncode == 0, alice.stderr[-3000:]
    assert bob.returncode == 0, bob.stderr[-3000:]
    with credentials_in_env(ALICE):
        client = MlflowClient(server.uri)
        assert client.get_model_version_by_alias("ar-gse-digits-lt", "champion").version == "1"
        assert client.get_model_version_by_alias("ar-gse-digits-lt-bob", "champion").version == "1"


def test_a_teammate_cannot_change_a_maintainers_runs_artifacts_experiment_or_model(team):
    server, _, _, _ = team
    with credentials_in_env(ALICE):
        admin_view = MlflowClient(server.uri)
        fit = _runs(admin_view, "ar-gse/digits-lt", "argse")[0]
        champion = admin_view.get_model_version_by_alias("ar-gse-digits-lt", "champion")
        logged_model = admin_view.get_logged_model(champion.source.removeprefix("models:/"))
    experiment_id = fit.info.experiment_id
    attempts = {
        "tag a run": lambda c: c.set_tag(fit.info.run_id, "argse.stage", "nothing"),
        "delete a run's tag": lambda c: c.delete_tag(fit.info.run_id, "argse.stage"),
        "log a metric into a run": lambda c: c.log_metric(fit.info.run_id, "val_matched_aurc", 0.0),
        "mark a run FAILED": lambda c: c.set_terminated(fit.info.run_id, "FAILED"),
        "log an artifact into a run": lambda c: c.log_text(fit.info.run_id, "x", "rule/rule.json"),
        "rename the shared experiment": lambda c: c.rename_experiment(experiment_id, "mine"),
        "rename the shared model": lambda c: c.rename_registered_model("ar-gse-digits-lt", "mine"),
        "move champion": lambda c: c.set_registered_model_alias("ar-gse-digits-lt", "champion", "1"),
        "register a version": lambda c: c.create_model_version("ar-gse-digits-lt", champion.source, fit.info.run_id),
    }
    with credentials_in_env(BOB):
        client = MlflowClient(server.uri)
        for what, attempt in attempts.items():
            # MLflow raises MlflowException for the tracking API and requests' HTTPError for artifacts.
            with pytest.raises((MlflowException, requests.HTTPError)) as refused:
                attempt(client)
            assert "PERMISSION_DENIED" in str(refused.value) or "403" in str(refused.value), what
    # A file of the champion model, overwritten over HTTP as bob did in the report: refused too.
    path = f"{logged_model.artifact_location.removeprefix('mlflow-artifacts:/')}/served_model.py"
    answer = requests.put(f"{server.uri}/api/2.0/mlflow-artifacts/artifacts/{path}", data=b"print('bob')",
                          auth=BOB, timeout=30)
    assert answer.status_code == 403, (answer.status_code, answer.text[:300])
    # And everything of alice's is as she left it.
    with credentials_in_env(ALICE):
        client = MlflowClient(server.uri)
        after = client.get_run(fit.info.run_id)
        assert after.info.status == "FINISHED" and after.data.tags["argse.stage"] == "argse"
        assert client.get_model_version_by_alias("ar-gse-digits-lt", "champion").version == champion.version
    verified = _argse(server, ALICE, "verify", "models:/ar-gse-digits-lt@champion")
    assert verified.returncode == 0, verified.stderr[-2000:]


def test_a_candidate_becomes_champion_only_through_a_maintainer_and_by_the_criterion(team):
    server, _, _, _ = team
    with credentials_in_env(BOB):
        candidate = _runs(MlflowClient(server.uri), "ar-gse/digits-lt/bob", "argse")[0].info.run_id
    refused = _argse(server, BOB, "team", "promote", candidate)
    assert refused.returncode == 1
    lines = [line for line in refused.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "403" in lines[0], refused.stderr[-2000:]
    promoted = _argse(server, ALICE, "team", "promote", candidate)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    # Same data, seed and options as alice's: the same criterion, and a tie keeps the champion.
    assert f"promoted run {candidate} as ar-gse-digits-lt v2;" in promoted.stdout
    assert "champion stays v1" in promoted.stdout and "a tie keeps the champion" in promoted.stdout
