"""The team roles of docs/team-server.md on a real server (PostgreSQL, basic-auth, default READ): the
page's commands from *Roles* on, run as written (the throwaway server's address and admin password put
in, a few epochs appended to the two `mlflow run` commands); a maintainer's work cannot be changed by a
teammate (403 for every write), a teammate trains, fits and registers candidates in their own space,
and a candidate becomes the champion only through a maintainer's `argse team promote`, which refits it
and refuses a forged one; a promoted version is the maintainers'; a squatted name is not granted; a
balanced fit is never compared with worst ones; the loader refuses an edited model. Each statement of
the doc's role table has a line here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from argse import EXPERTS
from argse.models.backbones import build_backbone
from argse.models.experts import ExpertModel
from argse.serving import COMPONENTS, save_expert
from argse.tracking import integrity
from conftest import REPO
from team_server import ADMIN, PostgresCluster, TrackingServer, credentials_in_env, postgres_bin

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    postgres_bin() is None,
    reason="PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (.ci/run installs Debian's "
           "postgresql package; by hand: apt-get install postgresql)")]

ALICE = ("alice", "alice-password-1234")  # the maintainer of digits-lt (the doc's names and passwords)
BOB = ("bob", "bob-password-1234")  # a teammate
TINY = ("--dataset", "digits-lt", "--epochs", "2", "--gating-epochs", "2", "--selective-rounds", "1",
        "--epochs-per-round", "1", "--eg-rounds", "2", "--n-boot", "5", "--coverage-grid", "1,0.5")
#: The same options as `mlflow run` parameters, appended to the doc's two `mlflow run` commands.
TINY_P = " ".join(f"-P {flag.removeprefix('--').replace('-', '_')}={value}" for flag, value in zip(TINY[2::2], TINY[3::2]))
DOC = REPO / "docs" / "team-server.md"


def _doc_blocks() -> list[str]:
    """The page's bash blocks from *Roles* on, and the user-creation block just before it."""
    text = DOC.read_text()
    before, roles = text.split("## Roles\n", 1)
    blocks = re.findall(r"```bash\n(.*?)```", before, re.S)[-1:] + re.findall(r"```bash\n(.*?)```", roles, re.S)
    assert len(blocks) == 4, blocks  # the user, the grants, the maintainer's run, the teammate's run
    return blocks


def _as_written(block: str, server) -> str:
    """A block of the page against the throwaway server: its address and admin password; the training
    options made small."""
    text = block.replace("http://localhost:5000", server.uri).replace("change-this-admin-password", ADMIN[1])
    return text.replace("-P dataset=digits-lt", f"-P dataset=digits-lt {TINY_P}") if "mlflow run" in text else text


def _shell(server, script: str, cwd) -> subprocess.CompletedProcess:
    env = server.client_env(None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    return subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _argse(server, credentials, *args) -> subprocess.CompletedProcess:
    env = server.client_env(credentials)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    return subprocess.run([sys.executable, "-m", "argse", *args], cwd=server.workdir, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The server, then the page's commands in order: alice made by the admin (bob the same way, through
    the API), the grants, the maintainer's `mlflow run`, the teammate's."""
    cluster = PostgresCluster().start()
    server = TrackingServer(cluster, tmp_path_factory.mktemp("team-roles"))
    try:
        server.start()
        user, grants, maintainer, teammate = [_as_written(b, server) for b in _doc_blocks()]
        made = _shell(server, user, server.workdir)
        assert made.returncode == 0 and '"username":"alice"' in made.stdout.replace(" ", ""), (made.stdout, made.stderr[-2000:])
        server.create_user(*BOB)
        granted = _shell(server, grants, server.workdir)
        exports = "\n".join(line for line in maintainer.splitlines() if line.startswith("export "))
        alice = _shell(server, maintainer, REPO)
        bob = _shell(server, exports + "\n" + teammate, REPO)
        yield server, granted, alice, bob
    finally:
        server.stop()
        cluster.stop()


def _runs(client, experiment: str, stage: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.\"argse.stage\" = '{stage}'",
                              order_by=["attributes.start_time DESC"])


def _one_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def _tracking(server):
    """This process's MLflow pointed at the server (restored after)."""
    class Tracking:
        def __enter__(self):
            self.previous = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(server.uri)

        def __exit__(self, *exc):
            mlflow.set_tracking_uri(self.previous)

    return Tracking()


def test_grant_gives_each_role_what_the_doc_says(team):
    _, granted, _, _ = team
    assert granted.returncode == 0, granted.stderr[-2000:]
    assert granted.stdout.splitlines() == ["alice: MANAGE on experiment ar-gse/digits-lt",
                                           "alice: MANAGE on registered model ar-gse-digits-lt",
                                           "bob: MANAGE on experiment ar-gse/digits-lt/bob",
                                           "bob: MANAGE on registered model ar-gse-digits-lt-bob"]


def test_a_maintainer_runs_the_shared_pipeline_and_a_teammate_their_own(team):
    server, _, alice, bob = team
    assert alice.returncode == 0, alice.stderr[-3000:]
    assert bob.returncode == 0, bob.stderr[-3000:]
    with credentials_in_env(ALICE):
        client = MlflowClient(server.uri)
        assert client.get_model_version_by_alias("ar-gse-digits-lt", "champion").version == "1"
        assert client.get_model_version_by_alias("ar-gse-digits-lt-bob", "champion").version == "1"
        # `mlflow run`'s own run went where the command said, not to Default (where nobody may write).
        assert not client.search_runs(["0"])


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
    path = f"{logged_model.artifact_location.removeprefix('mlflow-artifacts:/')}/MLmodel"
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
    # The page's other commands, as written: the dead-runs pair.
    for command in (("status",), ("status", "--reap")):
        assert _argse(server, ALICE, *command).returncode == 0


def test_a_squatted_name_makes_the_grant_fail_with_one_line_saying_who_holds_it(team):
    server, _, _, _ = team
    with credentials_in_env(BOB):  # taken before the admin hands it out
        MlflowClient(server.uri).create_registered_model("ar-gse-fashion-mnist-lt")
    line = _one_line(_argse(server, ADMIN, "team", "grant", "alice", "maintainer", "--dataset", "fashion-mnist-lt"))
    assert "registered model ar-gse-fashion-mnist-lt exists and user 'bob' holds MANAGE on it" in line, line
    assert "nothing was granted" in line
    with credentials_in_env(ALICE):
        client = MlflowClient(server.uri)
        assert client.get_experiment_by_name("ar-gse/fashion-mnist-lt") is None  # nothing was created either
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
            client.set_registered_model_alias("ar-gse-fashion-mnist-lt", "champion", "1")


def test_the_forged_candidate_is_refused_by_promote_with_one_line(team, tmp_path):
    """../shared/probes/forge_candidate.py's steps, as bob: a new FINISHED run in his experiment that
    copies his genuine fit's tags, params and criterion, with a model whose experts are other weights
    (freshly initialised), its digests computed and sealed by the run itself. `argse verify` cannot
    tell (the run vouches for its own files); promotion refits and names the file that differs."""
    from mlflow.entities import LoggedModelOutput, Param

    server, _, _, _ = team
    with credentials_in_env(BOB), _tracking(server):
        client = MlflowClient(server.uri)
        source = _runs(client, "ar-gse/digits-lt/bob", "argse")[0]
        model = Path(mlflow.artifacts.download_artifacts(f"models:/{source.outputs.model_outputs[0].model_id}",
                                                         dst_path=str(tmp_path / "m")))
        components = model / COMPONENTS
        meta = json.loads((components / "meta.json").read_text())
        for name in EXPERTS:  # valid expert files, not the upstream runs'
            save_expert(ExpertModel(build_backbone("digits-net", 10), [0.5], [0.25]), components / f"expert_{name}.pt")
        tags = {k: v for k, v in source.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.runName"}
        for key in ("argse.registered_model", "argse.champion_decision", integrity.PENDING_TAG):
            tags.pop(key, None)
        forged = client.create_run(source.info.experiment_id, tags=tags).info.run_id
        logged = client.create_logged_model(source.info.experiment_id, source_run_id=forged, name="model")
        meta["run_id"] = forged
        (components / "meta.json").write_text(json.dumps(meta, indent=1))
        mlmodel = (model / "MLmodel").read_text().replace(source.outputs.model_outputs[0].model_id, logged.model_id)
        (model / "MLmodel").write_text(mlmodel.replace(source.info.run_id, forged))
        rule = Path(client.download_artifacts(source.info.run_id, "rule", str(tmp_path)))
        integrity.record(model, "model", run_id=forged)
        integrity.record(rule, "rule", run_id=forged)
        client.log_model_artifacts(logged.model_id, str(model))
        client.finalize_logged_model(logged.model_id, "READY")
        client.log_outputs(forged, [LoggedModelOutput(logged.model_id, 0)])
        params = [Param(k, v) for k, v in source.data.params.items() if k != integrity.SEAL_PARAM]
        for start in range(0, len(params), 90):
            client.log_batch(forged, params=params[start:start + 90])
        client.log_artifacts(forged, str(rule), "rule")
        integrity.seal(forged)
        client.set_terminated(forged, "FINISHED")
    assert _argse(server, ALICE, "verify", forged).returncode == 0  # self-consistent: verify alone cannot tell
    line = _one_line(_argse(server, ALICE, "team", "promote", forged))
    assert f"run {forged}: its model's expert_balsoftmax.pt is not the expert/weights.pt expert run" in line, line
    assert line.endswith("not promoted")
    with credentials_in_env(ALICE):
        client = MlflowClient(server.uri)
        assert [v.version for v in client.search_model_versions("name = 'ar-gse-digits-lt'")] == ["1"]
        refit = _runs(client, "ar-gse/digits-lt", "argse")[0]
        assert refit.data.tags["argse.promoted_from"] == forged and refit.info.status == "FAILED"


def test_a_candidate_becomes_champion_only_through_a_maintainer_and_by_the_criterion(team):
    server, _, _, _ = team
    with credentials_in_env(BOB):
        candidate = _runs(MlflowClient(server.uri), "ar-gse/digits-lt/bob", "argse")
        candidate = next(r for r in candidate if r.info.status == "FINISHED" and "argse.registered_model" in r.data.tags)
        candidate = candidate.info.run_id
    refused = _argse(server, BOB, "team", "promote", candidate)
    assert "403" in _one_line(refused)
    promoted = _argse(server, ALICE, "team", "promote", candidate)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    # Same data, seed and options as alice's: the same criterion, and a tie keeps the champion.
    assert f"promoted run {candidate} as ar-gse-digits-lt v2 (refit run " in promoted.stdout
    assert "champion stays v1" in promoted.stdout and "a tie keeps the champion" in promoted.stdout


def test_a_promoted_version_is_the_maintainers_and_a_teammate_can_neither_change_nor_delete_it(team):
    server, _, _, _ = team
    with credentials_in_env(ALICE):
        client = MlflowClient(server.uri)
        version = client.get_model_version("ar-gse-digits-lt", "2")
        refit = client.get_run(version.run_id)
        assert refit.data.tags.get("argse.promoted_from") and refit.info.experiment_id == \
            client.get_experiment_by_name("ar-gse/digits-lt").experiment_id
        logged = client.get_logged_model(version.source.removeprefix("models:/"))
    path = logged.artifact_location.removeprefix("mlflow-artifacts:/")
    url = f"{server.uri}/api/2.0/mlflow-artifacts/artifacts/{path}"
    for method, name in (("put", f"{COMPONENTS}/meta.json"), ("delete", "MLmodel"), ("delete", f"{COMPONENTS}/gate.pt")):
        answer = requests.request(method, f"{url}/{name}", data=b"{}" if method == "put" else None, auth=BOB, timeout=30)
        assert answer.status_code == 403, (method, name, answer.status_code, answer.text[:300])
    with credentials_in_env(BOB):
        (tmp := Path(server.workdir) / "bob-files").mkdir(exist_ok=True)
        (tmp / "MLmodel").write_text("loader_module: os\n")
        with pytest.raises((MlflowException, requests.HTTPError), match="PERMISSION_DENIED|403"):
            MlflowClient(server.uri).log_model_artifacts(logged.model_id, str(tmp))
    with credentials_in_env(ALICE), _tracking(server):
        answer = mlflow.pyfunc.load_model("models:/ar-gse-digits-lt/2").predict(np.full((2, 8, 8), 128, np.uint8))
    assert len(answer) == 2


def test_a_balanced_fit_is_never_compared_with_worst_fits(team):
    server, _, _, _ = team
    with credentials_in_env(BOB):
        gating = _runs(MlflowClient(server.uri), "ar-gse/digits-lt/bob", "gating")
        gating = next(r for r in gating if r.data.tags.get("argse.gating_mode") == "selective").info.run_id
    fitted = _argse(server, BOB, "fit", "--dataset", "digits-lt", "--objective", "balanced", "--gating-run", gating,
                    "--rounds", "2", "--experiment", "ar-gse/digits-lt/bob", "--register-name", "ar-gse-digits-lt-bob")
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    # In bob's own model: registered, not compared with his worst-group champion.
    assert "registered ar-gse-digits-lt-bob v2; champion stays v1: v2 is not compared with it (objective " \
           "balanced vs objective worst)" in fitted.stdout, fitted.stdout[-2000:]
    with credentials_in_env(BOB):
        balanced = _runs(MlflowClient(server.uri), "ar-gse/digits-lt/bob", "argse")[0].info.run_id
    promoted = _argse(server, ALICE, "team", "promote", balanced)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    found = re.search(r"as ar-gse-digits-lt v(\d+) .*champion stays v1: v\1 is not compared with it \(objective "
                      r"balanced vs objective worst\).*argse crown models:/ar-gse-digits-lt/\1", promoted.stdout)
    assert found, promoted.stdout[-2000:]
    with credentials_in_env(ALICE):
        assert MlflowClient(server.uri).get_model_version_by_alias("ar-gse-digits-lt", "champion").version == "1"
    # The command the line names: a maintainer's choice, not a teammate's.
    ref = f"models:/ar-gse-digits-lt/{found.group(1)}"
    assert "403" in _one_line(_argse(server, BOB, "crown", ref))
    crowned = _argse(server, ALICE, "crown", ref)
    assert crowned.returncode == 0, crowned.stderr[-2000:]
    assert crowned.stdout.startswith(f"ar-gse-digits-lt@champion is v{found.group(1)} by hand (it was v1)"), crowned.stdout


def test_the_loader_refuses_a_model_whose_provenance_or_weights_were_edited(team, tmp_path):
    """The report's edit: meta.json's run_id removed and other valid weights swapped in; and the
    weights alone swapped. Each load fails with one line; the folder untouched loads."""
    server, _, _, _ = team
    with credentials_in_env(ALICE), _tracking(server):
        original = Path(mlflow.artifacts.download_artifacts("models:/ar-gse-digits-lt@champion",
                                                            dst_path=str(tmp_path / "original")))
        assert len(mlflow.pyfunc.load_model(str(original)).predict(np.full((1, 8, 8), 9, np.uint8))) == 1
        other = ExpertModel(build_backbone("digits-net", 10), [0.5], [0.25])
        for case in ("no run_id, other weights", "other weights"):
            edited = tmp_path / case.replace(" ", "-").replace(",", "")
            shutil.copytree(original, edited)
            save_expert(other, edited / COMPONENTS / "expert_ce.pt")
            if "no run_id" in case:
                meta = json.loads((edited / COMPONENTS / "meta.json").read_text())
                del meta["run_id"]
                (edited / COMPONENTS / "meta.json").write_text(json.dumps(meta))
            with pytest.raises(MlflowException) as refused:
                mlflow.pyfunc.load_model(str(edited))
            message = str(refused.value.message)
            assert "\n" not in message, message
            if "no run_id" in case:
                assert "meta.json has no run_id (its provenance)" in message, message
            else:
                assert f"{COMPONENTS}/expert_ce.pt is not what the run logged" in message, message
