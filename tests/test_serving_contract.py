"""The served model's input contract: integer images in 0..255 of the dataset's shape (the model's
metadata says so, and the model checks it), and a rejection cost >= 0 (the signature's parameter).

The signature declares no input, so MLflow hands a request's numbers to the model as they came: floats
are refused with one line that says to send integers in 0..255 (never cut to a black image), as are
integers outside 0..255, another shape and a request with no images, each an HTTP 400 without a stack
trace. The model refuses a negative or NaN cost with one line."""

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


def test_the_registered_version_declares_the_input_the_cost_and_the_outputs(chain_store):
    from mlflow.models import get_model_info

    info = get_model_info(MODEL)
    signature = info.signature
    # The input is declared in the metadata, not the signature: a declared uint8 tensor makes MLflow cast
    # a request's numbers to uint8 before the model sees them (0.5 becomes 0).
    assert signature.inputs is None
    assert info.metadata["input_contract"] == CONTRACT
    assert [p.name for p in signature.params.params] == ["cost"]
    assert signature.params.params[0].dtype.name == "double"
    assert signature.outputs.input_names() == COLUMNS


def test_integer_images_are_answered_one_row_each_and_other_arrays_refused(model):
    floats, pixels = _digits()
    answer = model.predict(pixels)
    assert list(answer.columns) == COLUMNS and len(answer) == len(pixels)
    assert set(answer["group"]) <= {"head", "tail"}
    # The same pixels as int64 (what JSON gives) are the same images.
    assert model.predict(pixels.astype(np.int64)).equals(answer)
    for other in (floats, floats / 16, pixels.reshape(6, 64)):
        with pytest.raises(MlflowException):
            model.predict(other)
    # A batch of no images of the right shape gets no rows; an array without the images' shape, one line.
    assert len(model.predict(pixels[:0])) == 0
    with pytest.raises(MlflowException, match="got no images"):
        model.predict(np.zeros(0, dtype=np.uint8))


@pytest.mark.parametrize("case, got", [
    ("sklearn", "got floats in [0, 16]"),
    ("unit", "got floats in [0, 1]"),
    ("above", "got integers in 0..300"),
    ("negative", "got integers in -1..254"),
    ("shape", "got shape [6, 64]"),
])
def test_the_models_own_check_refuses_what_bypasses_mlflow_with_one_line(case, got):
    from argse.serving import as_images

    floats, pixels = _digits()
    images = {"sklearn": floats, "unit": floats / 16, "above": pixels.astype(np.int64) * 300 // 255,
              "negative": pixels.astype(np.int64) - 1, "shape": pixels.reshape(6, 64)}[case]
    with pytest.raises(MlflowException) as err:
        as_images(images, (8, 8, 1))
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "\n" not in err.value.message and err.value.message.startswith(CONTRACT) and got in err.value.message
    np.testing.assert_array_equal(as_images(pixels.astype(np.int64), (8, 8, 1))[..., 0], pixels)


@pytest.mark.parametrize("cost", [-0.1, float("nan")])
def test_a_negative_or_nan_cost_is_refused(model, cost):
    _, pixels = _digits()
    with pytest.raises(MlflowException) as err:
        model.predict(pixels, params={"cost": cost})
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert err.value.message.startswith("params.cost must be a number >= 0") and "\n" not in err.value.message


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
        # Floats are refused with one line that says what to send, never cut to a black image: images
        # scaled to [0, 1], and the in-range 0.5 of the report.
        for floaty, got in (((floats / 16).tolist(), "got floats in [0, 1]"),
                            (np.full((1, 8, 8), 0.5).tolist(), "got floats in [0.5, 0.5]")):
            status, body = post_json(url, {"inputs": floaty})
            assert status == 400 and "stack_trace" not in body, body
            assert body["message"].startswith(CONTRACT) and got in body["message"] and "\n" not in body["message"], body
            assert "integers" in body["message"]
        # An empty request: one line, 4xx.
        status, body = post_json(url, {"inputs": []})
        assert status == 400 and "stack_trace" not in body, body
        assert body["message"] == f"{CONTRACT}; got no images (an empty request): send at least one", body
        status, body = post_json(url, {"inputs": (pixels.astype(np.int64) + 100).tolist()})
        assert status == 400 and "stack_trace" not in body and "got integers in 100..355" in body["message"], body
        status, body = post_json(url, {"inputs": pixels.tolist(), "params": {"cost": -1}})
        assert status == 400 and "stack_trace" not in body, body
        assert body["message"].startswith("params.cost must be a number >= 0") and "\n" not in body["message"]
        # A cost that is not a number never reaches the model: MLflow's own parameter check refuses it
        # (400, no stack trace, naming the parameter; its message echoes the request first).
        status, body = post_json(url, {"inputs": pixels.tolist(), "params": {"cost": "high"}})
        assert status == 400 and "stack_trace" not in body and "cost" in body["message"], body
    finally:
        server.terminate()
        server.wait(timeout=30)
