"""The served model's input contract: pixels are integers in 0..255, the cost a number >= 0.

Floats (images scaled to [0, 1], scikit-learn's 0..16 digits), out-of-range integers, wrong shapes and
a negative cost are refused with one line that names the contract, through the Python API and as
HTTP 400 from a real `mlflow models serve`; an empty batch gets an empty answer."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from sklearn.datasets import load_digits

from conftest import free_port, post_json, subprocess_env, wait_for_http

MODEL = "models:/ar-gse-digits-lt@champion"
COLUMNS = ["prediction", "accept", "margin", "group", "confidence"]
CONTRACT = "send images as integers in 0..255 (uint8) of shape [N, 8, 8]"


def _digits():
    """scikit-learn's digits as the library gives them (float64, 0..16) and as the contract wants."""
    images = load_digits().images[:6]
    return images, np.round(images * 255 / 16).astype(np.uint8)


@pytest.fixture
def model(chain_store):
    return mlflow.pyfunc.load_model(MODEL)


def test_uint8_and_other_integer_arrays_give_the_same_answer(model):
    _, pixels = _digits()
    as_uint8 = model.predict(pixels)
    assert list(as_uint8.columns) == COLUMNS and len(as_uint8) == len(pixels)
    np.testing.assert_array_equal(model.predict(pixels.astype(np.int64))["prediction"], as_uint8["prediction"])


@pytest.mark.parametrize("case, got", [
    ("sklearn", "got floats in [0, 16]"),
    ("unit", "got floats in [0, 1]"),
    ("above", "got integers in 0..300"),
    ("negative", "got integers in -1..254"),
    ("shape", "got shape [6, 64]"),
])
def test_images_outside_the_contract_are_refused_with_one_line(model, case, got):
    floats, pixels = _digits()
    images = {"sklearn": floats, "unit": floats / 16, "above": pixels.astype(np.int64) * 300 // 255,
              "negative": pixels.astype(np.int64) - 1, "shape": pixels.reshape(6, 64)}[case]
    with pytest.raises(MlflowException) as err:
        model.predict(images)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    message = err.value.message
    assert "\n" not in message and message.startswith(CONTRACT) and got in message, message


@pytest.mark.parametrize("cost", [-0.1, float("nan")])
def test_a_negative_or_nan_cost_is_refused(model, cost):
    _, pixels = _digits()
    with pytest.raises(MlflowException) as err:
        model.predict(pixels, params={"cost": cost})
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert err.value.message.startswith("params.cost must be a number >= 0") and "\n" not in err.value.message


def test_an_empty_batch_gets_an_empty_answer(model):
    for empty in (np.zeros((0, 8, 8), np.uint8), []):
        answer = model.predict(empty)
        assert len(answer) == 0 and list(answer.columns) == COLUMNS


def test_mlflow_models_serve_answers_the_contract_with_http_400_and_one_line(chain_store, tmp_path):
    uri, _ = chain_store
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=subprocess_env(uri), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server)
        floats, pixels = _digits()
        status, body = post_json(url, {"inputs": pixels.tolist(), "params": {"cost": 0.1}})
        assert status == 200 and len(body["predictions"]) == len(pixels), body
        for bad, got in ((floats, "got floats in [0, 16]"), (floats / 16, "got floats in [0, 1]")):
            status, body = post_json(url, {"inputs": bad.tolist()})
            assert status == 400 and "stack_trace" not in body, body
            assert body["message"].startswith(CONTRACT) and got in body["message"] and "\n" not in body["message"]
        status, body = post_json(url, {"inputs": pixels.tolist(), "params": {"cost": -1}})
        assert status == 400 and "stack_trace" not in body, body
        assert body["message"].startswith("params.cost must be a number >= 0") and "\n" not in body["message"]
        # A cost that is not a number never reaches the model: MLflow's own parameter check refuses it
        # (400, no stack trace, naming the parameter; its message echoes the request first).
        status, body = post_json(url, {"inputs": pixels.tolist(), "params": {"cost": "high"}})
        assert status == 400 and "stack_trace" not in body and "cost" in body["message"], body
        status, body = post_json(url, {"inputs": []})
        assert status == 200 and body == {"predictions": []}, body
    finally:
        server.terminate()
        server.wait(timeout=30)
