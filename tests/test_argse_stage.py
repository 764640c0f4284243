"""The AR-GSE stage: the registered pyfunc reproduces the stage's own decisions, serves over HTTP,
takes the cost at predict time, rejects bad images, and the champion alias moves only on improvement."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
import pytest
import torch
from mlflow.tracking import MlflowClient

from argse.config import ArgseConfig
from argse.data.loaders import load_digits
from argse.selective import PluginRule
from argse.serving import predict_frame
from argse import ArgseError
from argse.artifacts import load_experts, load_gate, load_splits
from argse.registry import CHAMPION_PARAM, COMPARED_PARAM, crown, crown_by_hand
from argse.stages.argse import PROMOTE_MARGIN_TOLERANCE, margin_gap
from argse.tracking import integrity
from argse.models.gating import gated_mixture
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
    assert set(served["group"]) <= {"head", "tail"}  # the group by name
    # The same decisions from what the runs logged: expert logits -> gate -> rule.
    experts = load_experts({n: ids[n] for n in ("ce", "logitadjust", "balsoftmax")})
    rule = PluginRule.from_dict(mlflow.artifacts.load_dict(f"runs:/{ids['argse']}/rule/rule.json"))
    expected = predict_frame(rule, gated_mixture(load_gate(ids["selective"]), experts.probs["test"]))
    np.testing.assert_array_equal(served["prediction"], expected["prediction"])
    groups = load_splits(ids["splits"]).group_names
    np.testing.assert_array_equal(served["group"], [groups[int(g)] for g in expected["group"]])
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


def _version_with_criterion(client, name, experiment_id, source, value, *, finish=True, compared=None):
    """A version of ``name`` whose run recorded ``value`` as its champion criterion (and what it is
    about, ``compared``), one file and its sealed digest (the run left open when not ``finish``)."""
    run = mlflow.start_run(experiment_id=experiment_id)
    mlflow.log_params({CHAMPION_PARAM: repr(float(value)), **({COMPARED_PARAM: compared} if compared else {})})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "rule.json").write_text("{}")
        integrity.log_artifact(Path(tmp) / "rule.json", "rule")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, source, run_id=run.info.run_id)
    if finish:
        integrity.seal(run.info.run_id)
        mlflow.end_run()
    return version


def test_champion_moves_only_to_a_better_criterion_and_a_tie_keeps_it(chain_store):
    _, ids = chain_store
    client = MlflowClient()
    name = "ar-gse-champion-test"
    fit = client.get_run(ids["argse"])
    source = f"models:/{fit.outputs.model_outputs[0].model_id}"

    def fit_with(value):
        version = _version_with_criterion(client, name, fit.info.experiment_id, source, value)
        return crown(name, version), client.get_model_version_by_alias(name, "champion").version

    _, first = fit_with(0.30)
    decision, after_worse = fit_with(0.35)
    assert after_worse == first and "stays" in decision and "0.35 (param argse.champion_val_matched_aurc" in decision
    decision, after_tie = fit_with(0.30)
    assert after_tie == first and "a tie keeps the champion" in decision
    decision, after_better = fit_with(0.20)
    assert after_better != first and "as champion" in decision and "0.2 (param" in decision and "< v1: 0.3" in decision
    # A forged version tag changes nothing: the tags are not read.
    client.set_model_version_tag(name, first, "argse.val_worst_l2r", "-1")
    decision, after_forged = fit_with(0.25)
    assert after_forged == after_better and "stays" in decision


def test_only_comparable_versions_compete_and_a_person_crowns_another_kind(chain_store):
    """Versions about other splits (or another objective, or prior) are registered and never crowned by
    the criterion, however low it is; the line says so and names the command; after `argse crown` the
    versions comparable with the new champion compete."""
    _, ids = chain_store
    client = MlflowClient()
    name = "ar-gse-comparable-test"
    fit = client.get_run(ids["argse"])
    source = f"models:/{fit.outputs.model_outputs[0].model_id}"
    seed0, seed1 = "objective worst, prior lt, splits 0000000000000000", "objective worst, prior lt, splits 1111111111111111"

    def fit_with(value, compared):
        version = _version_with_criterion(client, name, fit.info.experiment_id, source, value, compared=compared)
        return version, crown(name, version), str(client.get_model_version_by_alias(name, "champion").version)

    first, _, champion = fit_with(0.30, seed0)
    other, decision, champion = fit_with(0.10, seed1)
    assert champion == str(first.version), decision
    assert (f"registered {name} v{other.version}; champion stays v{first.version}: v{other.version} is not compared "
            f"with it (splits 1111111111111111 vs splits 0000000000000000)") in decision, decision
    assert decision.endswith(f"to make it champion: argse crown models:/{name}/{other.version}")
    better, decision, champion = fit_with(0.20, seed0)  # compared, and better than the champion
    assert champion == str(better.version) and "compared with the versions of " + seed0 in decision, decision
    assert crown_by_hand(f"models:/{name}/{other.version}").startswith(
        f"{name}@champion is v{other.version} by hand (it was v{better.version})")
    _, decision, champion = fit_with(0.05, seed0)  # the old kind is now the one not compared
    assert champion == str(other.version) and "is not compared with it" in decision
    newer, decision, champion = fit_with(0.05, seed1)
    assert champion == str(newer.version) and "as champion" in decision, decision
    for bad in ("models:/ar-gse-comparable-test", f"models:/{name}/99"):
        with pytest.raises(ArgseError):
            crown_by_hand(bad)


def test_champion_is_never_a_version_whose_run_did_not_finish_and_a_rerun_repairs_it(chain_store):
    """The interleavings concurrent fits produce, played in one process: a better model registered
    by a fit still running is not champion until its run FINISHES; a champion left on an unfinished
    run (a kill, older code) moves to the best FINISHED version at the next crown."""
    _, ids = chain_store
    client = MlflowClient()
    name = "ar-gse-crown-test"
    fit = client.get_run(ids["argse"])
    source = f"models:/{fit.outputs.model_outputs[0].model_id}"
    worse = _version_with_criterion(client, name, fit.info.experiment_id, source, 0.4)
    better = _version_with_criterion(client, name, fit.info.experiment_id, source, 0.1, finish=False)  # RUNNING
    assert "as champion" in crown(name, worse)  # the better one has not finished: it does not count
    assert client.get_model_version_by_alias(name, "champion").version == worse.version
    mlflow.end_run("FAILED")  # the better fit died: never champion
    assert crown(name).startswith(f"{name}@champion is v{worse.version}")
    # A champion left on a run that did not finish (as a kill between alias and end once did):
    client.set_registered_model_alias(name, "champion", better.version)
    assert crown(name).startswith(f"moved {name}@champion to v{worse.version}")
    assert client.get_model_version_by_alias(name, "champion").version == worse.version


def test_fits_of_one_gate_that_differ_only_in_cost_tie_and_the_champion_stays(chain_store, cli):
    _, ids = chain_store
    client = MlflowClient()
    champion = client.get_model_version_by_alias("ar-gse-digits-lt", "champion").version
    values = []
    for cost in ("0.3", "0.0001", "0.3"):
        # --rounds 8 as the fixture's fit: the same gate and fit options, only the cost differs.
        result = cli("fit", "--dataset", "digits-lt", "--gating-run", ids["selective"], "--cost", cost, "--rounds", "8",
                     "--rerun")  # the third fit's options are the first's: a fit started alone would reuse it
        assert result.code == 0, result.err
        assert f"champion stays v{champion}" in result.out and "a tie keeps the champion" in result.out, result.out
        fit = client.search_runs([client.get_run(ids["argse"]).info.experiment_id], "tags.`argse.stage` = 'argse'",
                                 order_by=["attributes.start_time DESC"])[0]
        values.append(fit.data.params[CHAMPION_PARAM])
    assert len(set(values)) == 1  # the criterion does not depend on the cost
    assert client.get_model_version_by_alias("ar-gse-digits-lt", "champion").version == champion


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


def test_the_promotion_margin_check_is_relative_to_the_margins_scale():
    # Margins scale with the rule's 1/alpha: with one near 2.6e4, 0.27 anywhere is float32 rounding (1e-5
    # of the scale), near zero as well; where all margins are below 1 the difference is taken as it is.
    served, expected = np.array([25947.52, -0.12]), np.array([25947.25, -0.25])
    assert margin_gap(served, expected) == pytest.approx(0.27 / 25947.25)
    assert margin_gap(served, expected) < PROMOTE_MARGIN_TOLERANCE
    assert margin_gap(np.array([0.5, -0.12]), np.array([0.2, -0.25])) == pytest.approx(0.3)
    assert margin_gap(np.array([3.0, 0.0]), np.array([-2.0, 0.0])) == pytest.approx(2.5)
