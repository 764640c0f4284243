"""The tracking contract: stage runs end FAILED on errors, ``resolve_upstream`` for every kind of
reference and every way it can fail, the experiment rule, config hashes and the cache look-up."""

from __future__ import annotations

import json

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from argse import ArgseError, tracking
from argse.tracking.tags import TAG_LAUNCHED


def _stage(stage="splits", dataset="digits-lt", params=None, upstream=None, fail=False, **kw):
    try:
        with tracking.stage_run(stage, dataset, params or {"seed": 0}, upstream=upstream, **kw) as run:
            if fail:
                raise RuntimeError("boom")
            return run.info.run_id
    except RuntimeError:
        return mlflow.last_active_run().info.run_id


def _status(run_id):
    return MlflowClient().get_run(run_id).info.status


def test_stage_run_tags_and_params(store):
    run_id = _stage(params={"seed": 3, "imb_factor": 20.0}, upstream={"splits_run": "a" * 32})
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["argse.stage"] == "splits" and tags["argse.dataset"] == "digits-lt"
    assert tags["argse.code_version"] == tracking.code_version()
    assert tags["argse.upstream.splits"] == "a" * 32
    assert tags["argse.config_hash"] == tracking.config_hash("splits", {"seed": 3, "imb_factor": 20.0}, {"splits_run": "a" * 32})
    assert run.data.params == {"seed": "3", "imb_factor": "20.0"}
    assert MlflowClient().get_experiment(run.info.experiment_id).name == "ar-gse/digits-lt"


def test_stage_that_raises_is_failed_and_interrupted_is_killed(store):
    assert _status(_stage(fail=True)) == "FAILED"
    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run("splits", "digits-lt", {}) as run:
            raise KeyboardInterrupt
    assert _status(run.info.run_id) == "KILLED"


def test_resolved_params_do_not_clash_with_mlflow_run_raw_params(store):
    run_id = _stage(params={"imb_factor": "preset"})
    with tracking.stage_run("splits", "digits-lt", {"imb_factor": 20.0}, resume_run_id=run_id):
        pass
    params = MlflowClient().get_run(run_id).data.params
    assert params == {"imb_factor": "preset", "imb_factor.resolved": "20.0"}


def test_config_hash_is_about_resolved_inputs():
    a = tracking.config_hash("experts", {"epochs": 5, "splits_run": "latest"}, {"splits_run": "f" * 32})
    b = tracking.config_hash("experts", {"epochs": 5, "splits_run": "f" * 32}, {"splits_run": "f" * 32})
    c = tracking.config_hash("experts", {"epochs": 6, "splits_run": "latest"}, {"splits_run": "f" * 32})
    d = tracking.config_hash("experts", {"epochs": 5, "splits_run": "latest"}, {"splits_run": "e" * 32})
    assert a == b and len({a, c, d}) == 3


def test_latest_is_the_newest_finished_run_with_matching_lineage(store):
    old = _stage(params={"seed": 0})
    new = _stage(params={"seed": 1})
    _stage(params={"seed": 2}, fail=True)  # newest, but FAILED
    _stage(dataset="cifar100-lt")
    assert tracking.resolve_upstream("splits", "latest", dataset="digits-lt").info.run_id == new
    e1 = _stage("experts", tags={"argse.expert": "ce"}, upstream={"splits_run": old})
    _stage("experts", tags={"argse.expert": "ce"}, upstream={"splits_run": new})
    found = tracking.resolve_upstream("experts", "latest", dataset="digits-lt",
                                      lineage={"argse.expert": "ce", "argse.upstream.splits": old})
    assert found.info.run_id == e1


def test_run_id_runs_uri_and_models_uri_resolve(store):
    run_id = _stage("argse")
    assert tracking.resolve_upstream("argse", run_id, dataset="digits-lt").info.run_id == run_id
    assert tracking.resolve_upstream("argse", f"runs:/{run_id}/model", dataset="digits-lt").info.run_id == run_id

    class Identity(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: np.ndarray, params=None):
            return model_input

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=Identity())
    version = mlflow.register_model(info.model_uri, "ar-gse-test")
    MlflowClient().set_registered_model_alias("ar-gse-test", "champion", version.version)
    for ref in ("models:/ar-gse-test@champion", f"models:/ar-gse-test/{version.version}"):
        assert tracking.resolve_upstream("argse", ref, dataset="digits-lt").info.run_id == run_id


@pytest.mark.parametrize("case, message", [
    ("nothing", "no FINISHED experts run for digits-lt.*argse experts --dataset digits-lt"),
    ("wrong_stage", "is a splits run, not a experts run"),
    ("wrong_dataset", "was made for dataset cifar100-lt, not digits-lt"),
    ("failed", "is FAILED, not FINISHED"),
    ("unknown_id", "does not exist"),
    ("garbage", "is not a run reference"),
    ("lineage", "has argse.upstream.splits=.*expected"),
    ("alias", "does not resolve in the model registry"),
])
def test_resolve_upstream_errors_are_one_line(store, case, message):
    ref, stage, lineage = None, "experts", None
    if case == "nothing":
        ref = "latest"
    elif case == "wrong_stage":
        ref = _stage("splits")
    elif case == "wrong_dataset":
        ref = _stage("experts", dataset="cifar100-lt")
    elif case == "failed":
        ref = _stage("experts", fail=True)
    elif case == "unknown_id":
        ref = "0" * 32
    elif case == "garbage":
        ref = "./checkpoints/experts"
    elif case == "lineage":
        ref = _stage("experts", upstream={"splits_run": "a" * 32})
        lineage = {"argse.upstream.splits": "b" * 32}
    else:
        ref = "models:/nope@champion"
    with pytest.raises(ArgseError, match=message) as err:
        tracking.resolve_upstream(stage, ref, dataset="digits-lt", lineage=lineage)
    assert "\n" not in str(err.value)


def test_mlflow_run_without_an_experiment_works_in_the_datasets_experiment_and_leaves_a_launcher(store, monkeypatch):
    """`mlflow run` without --experiment-name makes its run in Default (id 0) and sets MLFLOW_RUN_ID and
    MLFLOW_EXPERIMENT_ID=0: the stage works in ar-gse/<dataset> all the same, names MLflow's run as a
    launcher that points there, and a later standalone stage finds it as `latest`. Stage runs that
    earlier versions left in Default are still found."""
    client = MlflowClient()
    default_run = client.create_run("0")
    monkeypatch.setenv("MLFLOW_RUN_ID", default_run.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    stage_run = _stage()
    assert stage_run != default_run.info.run_id
    assert client.get_experiment(client.get_run(stage_run).info.experiment_id).name == "ar-gse/digits-lt"
    launcher = client.get_run(default_run.info.run_id)
    assert launcher.data.tags[TAG_LAUNCHED] == f"ar-gse/digits-lt/{stage_run}"
    assert launcher.info.run_name == "mlflow run: splits digits-lt in ar-gse/digits-lt"
    assert tracking.TAG_STAGE not in launcher.data.tags  # never picked up as an input
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    assert tracking.resolve_upstream("splits", "latest", dataset="digits-lt").info.run_id == stage_run
    # An earlier version's stage run in Default, newer than the one above: found too.
    with mlflow.start_run(experiment_id="0") as older_layout:
        mlflow.set_tags({tracking.TAG_STAGE: "splits", tracking.TAG_DATASET: "digits-lt",
                         tracking.TAG_CODE: tracking.code_version()})
    assert tracking.resolve_upstream("splits", "latest", dataset="digits-lt").info.run_id == older_layout.info.run_id
    # A named experiment is searched alone.
    with pytest.raises(ArgseError, match="in experiment mine"):
        tracking.resolve_upstream("splits", "latest", dataset="digits-lt", experiment="mine")
    named = _stage(experiment="mine")
    assert tracking.resolve_upstream("splits", "latest", dataset="digits-lt", experiment="mine").info.run_id == named


def test_find_cached_run_needs_same_hash_and_code_and_a_finished_run(store):
    params = {"seed": 0}
    h = tracking.config_hash("splits", params)
    assert tracking.find_cached_run("splits", h, tracking.code_version(), dataset="digits-lt") is None
    _stage(params=params, fail=True)
    assert tracking.find_cached_run("splits", h, tracking.code_version(), dataset="digits-lt") is None
    run_id = _stage(params=params)
    assert tracking.find_cached_run("splits", h, tracking.code_version(), dataset="digits-lt").info.run_id == run_id
    assert tracking.find_cached_run("splits", h, "0.0.0+other", dataset="digits-lt") is None


def test_the_one_use_of_mlflow_internals_still_posts_one_tag_request_without_retrying():
    # post_set_tag relies on mlflow.utils.rest_utils.http_request: one POST to the set-tag endpoint,
    # no retry on an error. A local HTTP server records what arrives; this fails when MLflow changes it.
    import http.server
    import threading

    from argse.tracking.mlflow_internals import post_set_tag

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            status = 200 if len(seen) == 1 else 503
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}"
    try:
        post_set_tag(uri, "a" * 32, "argse.heartbeat", "123", timeout=5)
        assert seen == [("/api/2.0/mlflow/runs/set-tag", {"run_id": "a" * 32, "key": "argse.heartbeat", "value": "123"})]
        with pytest.raises(Exception):
            post_set_tag(uri, "a" * 32, "argse.heartbeat", "124", timeout=5)
        assert len(seen) == 2  # the failing request was sent once: no retry
    finally:
        server.shutdown()
