"""The AR-GSE stage: the registered pyfunc reproduces the stage's own decisions, serves over HTTP,
takes the cost at predict time, rejects bad images, and the champion alias moves only on improvement."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from argse.config import ArgseConfig
from argse.data.loaders import load_digits
from argse.selective import PluginRule
from argse.serving import predict_frame
from argse.stages.argse import crown, register
from argse.stages.common import load_experts
from argse.models.gating import gated_mixture
from argse.stages.gating import load_gate
from argse.stages.splits import load_splits
from conftest import free_port, post_json, subprocess_env, wait_for_http

MODEL = "models:/ar-gse-digits-lt@champion"


def _test_images(ids):
    splits = load_splits(ids["splits"])
    return splits.images(load_digits(), "test")[..., 0]


def test_champion_predictions_equal_the_stage_code_on_logged_logits(chain_store):
    _, ids = chain_store
    run = MlflowClient().get_run(ids["argse"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["argse.upstream.gating"] == ids["selective"]
    model = mlflow.pyfunc.load_model(MODEL)
    served = model.predict(_test_images(ids))
    assert list(served.columns) == ["prediction", "accept", "margin", "group", "confidence"]
    # The same decisions from what the runs logged: expert logits -> gate -> rule.
    experts = load_experts({n: ids[n] for n in ("ce", "logitadjust", "balsoftmax")})
    rule = PluginRule.from_dict(mlflow.artifacts.load_dict(f"runs:/{ids['argse']}/rule/rule.json"))
    expected = predict_frame(rule, gated_mixture(load_gate(ids["selective"]), experts.probs["test"]))
    np.testing.assert_array_equal(served["prediction"], expected["prediction"])
    np.testing.assert_allclose(served["margin"], expected["margin"], atol=1e-4)
    near = np.abs(expected["margin"].to_numpy() + rule.cost) < 1e-4  # float32 forward vs logged float32 logits
    np.testing.assert_array_equal(served["accept"][~near], expected["accept"][~near])
    assert run.data.metrics["model_check_prediction_agreement"] == 1.0


def test_cost_is_an_inference_parameter_that_moves_acceptance_as_the_rule_says(chain_store):
    # accept(x) = margin(x) >= -cost: at cost 0 exactly the images with a non-negative margin are
    # accepted (some are rejected on digits' test split), at a cost above every |margin| all of them.
    _, ids = chain_store
    model = mlflow.pyfunc.load_model(MODEL)
    images = _test_images(ids)
    margin = model.predict(images)["margin"].to_numpy()
    strict = model.predict(images, params={"cost": 0.0})["accept"].to_numpy()
    assert 0 < strict.sum() < len(images)
    np.testing.assert_array_equal(strict[np.abs(margin) > 1e-6], (margin >= 0)[np.abs(margin) > 1e-6])
    lenient = model.predict(images, params={"cost": float(np.abs(margin).max()) + 1.0})["accept"].to_numpy()
    assert lenient.all()


def test_wrong_image_shape_or_dtype_names_the_expected_shape(chain_store):
    model = mlflow.pyfunc.load_model(MODEL)
    with pytest.raises(Exception, match=r"8, 8"):
        model.predict(np.zeros((2, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(Exception, match=r"uint8|8, 8"):
        model.predict(np.zeros((2, 8, 8), dtype=np.float64))


def test_mlflow_models_serve_answers_json(chain_store, tmp_path):
    uri, ids = chain_store
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=subprocess_env(uri), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server)
        images = _test_images(ids)[:5]
        status, body = post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": images.tolist()}, timeout=30)
        assert status == 200, body
        rows = body["predictions"]
        assert len(rows) == 5 and set(rows[0]) == {"prediction", "accept", "margin", "group", "confidence"}
        status, body = post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": np.zeros((2, 4, 4), int).tolist()}, timeout=30)
        assert 400 <= status < 500 and "shape" in json.dumps(body)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_champion_moves_only_to_a_better_model(chain_store):
    _, ids = chain_store
    client = MlflowClient()
    cfg = ArgseConfig(dataset="digits-lt", register_name="ar-gse-champion-test").resolve()
    model_uri = client.get_run(ids["argse"]).outputs.model_outputs[0].model_id

    def fit_with_risk(risk):
        with mlflow.start_run(experiment_id=client.get_run(ids["argse"]).info.experiment_id) as run:
            mlflow.log_metric("val_worst_l2r", risk)
            info = type("Info", (), {"model_uri": f"models:/{model_uri}"})
            version = register(cfg, info, run.info.run_id, risk)
        decision = crown(cfg.register_name, version)  # once the run is FINISHED
        return decision, client.get_model_version_by_alias(cfg.register_name, "champion").version

    _, first = fit_with_risk(0.30)
    decision, after_worse = fit_with_risk(0.35)
    assert after_worse == first and "stays" in decision
    decision, after_tie = fit_with_risk(0.30)
    assert after_tie == first and "a tie keeps the earlier version" in decision
    decision, after_better = fit_with_risk(0.20)
    assert after_better != first and "as champion" in decision


def test_champion_is_never_a_version_whose_run_did_not_finish_and_a_rerun_repairs_it(chain_store):
    """The interleavings concurrent fits produce, played in one process: a better model registered
    by a fit still running is not champion until its run FINISHES; a champion left on an unfinished
    run (a kill, older code) moves to the best FINISHED version at the next crown."""
    _, ids = chain_store
    client = MlflowClient()
    name = "ar-gse-crown-test"
    cfg = ArgseConfig(dataset="digits-lt", register_name=name).resolve()
    info = type("Info", (), {"model_uri": f"models:/{client.get_run(ids['argse']).outputs.model_outputs[0].model_id}"})
    experiment_id = client.get_run(ids["argse"]).info.experiment_id

    def register_in_open_run(risk):
        run = mlflow.start_run(experiment_id=experiment_id)
        mlflow.log_metric("val_worst_l2r", risk)
        return register(cfg, info, run.info.run_id, risk)

    worse = register_in_open_run(0.4)
    mlflow.end_run()
    better = register_in_open_run(0.1)  # still RUNNING
    assert "as champion" in crown(name, worse)  # the better one has not finished: it does not count
    assert client.get_model_version_by_alias(name, "champion").version == worse.version
    mlflow.end_run("FAILED")  # the better fit died: never champion
    assert crown(name).startswith(f"{name}@champion is v{worse.version}")
    # A champion left on a run that did not finish (as a kill between alias and end once did):
    client.set_registered_model_alias(name, "champion", better.version)
    assert crown(name).startswith(f"moved {name}@champion to v{worse.version}")
    assert client.get_model_version_by_alias(name, "champion").version == worse.version


def test_fit_latest_gating_run_is_the_newest_selective_one_not_a_later_pretrain(chain_store, cli):
    # A pretrain gating run made after the selective one must not become the fit's gate.
    _, ids = chain_store
    assert cli("gating", "--dataset", "digits-lt", "--mode", "pretrain", "--epochs", "2").code == 0
    newest = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], "tags.`argse.stage` = 'gating'",
        order_by=["attributes.start_time DESC"])[0]
    assert newest.data.tags["argse.gating_mode"] == "pretrain"
    from argse.stages.argse import resolve_inputs

    gating_run, _ = resolve_inputs(ArgseConfig(dataset="digits-lt").resolve(), None)
    assert gating_run.info.run_id == ids["selective"]
    # Naming a pretrain run explicitly is refused in one line that says which command makes a selective one.
    result = cli("fit", "--dataset", "digits-lt", "--gating-run", newest.info.run_id, "--dry-run")
    assert result.code != 0 and len(result.err.strip().splitlines()) == 1 and "selective" in result.err


def test_expert_posteriors_under_another_prior_equal_loading_them_for_that_prior(chain_store):
    _, ids = chain_store
    run_ids = {n: ids[n] for n in ("ce", "logitadjust", "balsoftmax")}
    lt, balanced = load_experts(run_ids, "lt"), load_experts(run_ids, "balanced")
    for split in ("tunev", "val", "test"):
        assert torch.allclose(lt.under("balanced")[split], balanced.probs[split], atol=1e-12)
        assert torch.allclose(lt.own_probs[split], balanced.own_probs[split])
    # LogitAdjust at tau = 1 already gives the balanced posterior: under the balanced prior it is unshifted.
    assert torch.allclose(balanced.probs["val"][:, 1], balanced.own_probs["val"][:, 1], atol=1e-9)
