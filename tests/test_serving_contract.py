"""The served model's input contract: integer images in 0..255 of the dataset's shape, or PNG or JPEG
files in a column named image (base64 text in JSON), read as the training pipeline's deterministic
view reads a file (the model's metadata says so, and the model checks it), and a rejection cost >= 0
(the signature's parameter).

The signature declares no input, so MLflow hands a request's numbers to the model as they came: floats
are refused with one line that says to send integers in 0..255 (never cut to a black image), as are
integers outside 0..255, another shape and a request with no images, each an HTTP 400 without a stack
trace. Encoded images answer as the pixels they decode to; text that is not base64, bytes that are
not an image and empty values are refused with one line naming the image. The model refuses a
negative or NaN cost with one line."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.pyfunc import PyFuncModel, scoring_server
from PIL import Image
from sklearn.datasets import load_digits

from conftest import free_port, post_json, subprocess_env, wait_for_http

MODEL = "models:/ar-gse-digits-lt@champion"
COLUMNS = ["prediction", "accept", "margin", "group", "confidence"]
CONTRACT = ("send images as integers in 0..255 (uint8) of shape [N, 8, 8], or as PNG or JPEG files, base64 text in "
            "a column named image")


def _digits():
    """scikit-learn's digits as the library gives them (float64, 0..16) and as the contract wants."""
    images = load_digits().images[:6]
    return images, np.round(images * 255 / 16).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str = "PNG", size: tuple[int, int] | None = None) -> bytes:
    """One image ([H, W] grey or [H, W, 3] colour uint8) as a file's bytes, resized to ``size`` first."""
    image = Image.fromarray(pixels)
    if size is not None:
        image = image.resize(size, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _b64(files) -> list[str]:
    return [base64.b64encode(raw).decode("ascii") for raw in files]


@pytest.fixture
def model(chain_store):
    return mlflow.pyfunc.load_model(MODEL)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """The served model's class read from a folder of random digits-sized components (three experts,
    a gate, a rule): what the model computes, without a fit or a tracking server."""
    from argse.models.backbones import build_backbone
    from argse.models.experts import ExpertModel
    from argse.models.gating import GatingNet
    from argse.selective import PluginRule
    from argse.serving import ARGSEModel, save_expert, write_components

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("small-model")
    experts = {name: save_expert(ExpertModel(build_backbone("digits-net", 10), [0.3], [0.35]), folder / f"{name}.pt")
               for name in ("ce", "logitadjust", "balsoftmax")}
    gate = GatingNet(num_experts=3)
    torch.save({"state_dict": gate.state_dict(), "config": gate.config()}, folder / "gate.pt")
    rule = PluginRule(alpha=torch.ones(2), mu=torch.zeros(2), beta=torch.full((2,), 0.5), cost=0.2,
                      class_to_group=torch.tensor([0] * 5 + [1] * 5))
    meta = {"backbone": "digits-net", "num_classes": 10, "image_shape": [8, 8, 1], "group_names": ["head", "tail"],
            "posterior_shifts": torch.zeros(3, 10).tolist()}
    model = ARGSEModel(write_components(folder / "components", experts=experts, gate=folder / "gate.pt", rule=rule,
                                        meta=meta))
    model.predict(np.zeros((6, 8, 8), np.uint8))  # torch's first calls (a second or two) belong to the setup
    return model


def test_the_registered_version_declares_the_input_the_cost_and_the_outputs(chain_store):
    from mlflow.models import get_model_info

    info = get_model_info(MODEL)
    signature = info.signature
    # The input is declared in the metadata, not the signature: a declared uint8 tensor makes MLflow cast
    # a request's numbers to uint8 before the model sees them (0.5 becomes 0), and a declared image column
    # turns a batch of pixels into a column of text. The metadata names both forms.
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


def test_png_and_jpeg_files_answer_as_the_pixels_they_decode_to(small_model):
    from argse.data.stream import read_image
    from argse.serving import as_images

    _, pixels = _digits()
    same = [_encode(image) for image in pixels]
    # The same-size PNG is the pixels themselves, read by Pillow alone.
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(io.BytesIO(raw))) for raw in same]), pixels)
    answer = small_model.predict(pixels)
    assert len(set(answer["prediction"])) > 1  # the images are told apart: equal answers mean something
    pd.testing.assert_frame_equal(small_model.predict(pd.DataFrame({"image": _b64(same)})), answer)
    for spelling in (pd.DataFrame({"image": same}), {"image": np.array(_b64(same))}, {"image": same}):
        np.testing.assert_array_equal(as_images(spelling, (8, 8, 1))[..., 0], pixels)
    # JPEGs, and PNGs and JPEGs of other sizes than the model's: what read_image makes of the file, as pixels.
    files = ([_encode(image, "JPEG") for image in pixels] + [_encode(image, "PNG", (20, 13)) for image in pixels]
             + [_encode(image, "JPEG", (40, 40)) for image in pixels])
    read = np.stack([read_image(io.BytesIO(raw), 8, 1) for raw in files])
    pd.testing.assert_frame_equal(small_model.predict(pd.DataFrame({"image": _b64(files)})), small_model.predict(read))
    assert small_model.predict(pd.DataFrame({"image": pd.Series([], dtype=object)})).empty


def test_grey_and_colour_files_are_converted_to_the_models_channels():
    from argse.serving import as_images

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    colour = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    got = as_images({"image": _b64([_encode(grey)])}, (32, 32, 3))
    assert got.shape == (1, 32, 32, 3) and all((got[0, ..., k] == grey).all() for k in range(3))
    got = as_images(pd.DataFrame({"image": [_encode(colour)]}), (8, 8, 1))
    np.testing.assert_array_equal(got[0, ..., 0], np.asarray(Image.fromarray(colour).convert("L")))
    deep = io.BytesIO()  # 16-bit grey: its high byte
    Image.fromarray(colour[..., 0].astype(np.uint16) * 257).save(deep, format="PNG")
    np.testing.assert_array_equal(as_images({"image": [deep.getvalue()]}, (8, 8, 1))[0, ..., 0], colour[..., 0])


@pytest.mark.parametrize("request_, got", [
    ({"image": ["not base64!"]}, "image 0 is not base64 text"),
    ({"image": _b64([b"\x89PNG", b"hello"])}, "image 0 is not a PNG or JPEG image Pillow can read"),
    ({"image": [_encode(np.zeros((8, 8), np.uint8)), b"GIF8 not really"]}, "image 1 is not a PNG or JPEG image"),
    ({"image": [_encode(np.zeros((8, 8), np.uint8))[:40]]}, "image 0 is not a PNG or JPEG image Pillow can read"),
    (pd.DataFrame({"image": ["", "iVBORw0KGgo="]}), "image 0 is empty"),
    (pd.DataFrame({"image": [None]}), "image 0 is not base64 text or bytes (got NoneType)"),
    (pd.DataFrame({"image": ["iVBORw0KGgo="], "label": [3]}), "got the columns ['image', 'label']"),
    ({"images": ["iVBORw0KGgo="]}, "got the columns ['images']"),
    (np.array(["iVBORw0KGgo="]), "got text"),
])
def test_bad_encoded_images_are_refused_with_one_line_naming_the_image(request_, got):
    from argse.serving import as_images

    with pytest.raises(MlflowException) as err:
        as_images(request_, (8, 8, 1))
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "\n" not in err.value.message and err.value.message.startswith(CONTRACT) and got in err.value.message


def test_a_model_trained_on_non_square_images_takes_their_pixels_only():
    from argse.serving import as_images, input_contract

    contract = input_contract((24, 32, 3))
    assert contract == "send images as integers in 0..255 (uint8) of shape [N, 24, 32, 3]"
    with pytest.raises(MlflowException) as err:
        as_images({"image": _b64([_encode(np.zeros((24, 32, 3), np.uint8))])}, (24, 32, 3))
    assert err.value.message.startswith(contract) and "got encoded images" in err.value.message
    assert "\n" not in err.value.message


def test_the_scoring_servers_spellings_of_encoded_images_reach_the_model(small_model):
    """What `mlflow models serve` hands to predict for each JSON spelling (its own request handler)."""
    served = PyFuncModel(model_meta=Model(), model_impl=small_model)
    _, pixels = _digits()
    text = _b64(_encode(image) for image in pixels[:3])
    expected = small_model.predict(pixels[:3]).to_dict("records")
    for body in ({"dataframe_split": {"columns": ["image"], "data": [[t] for t in text]}},
                 {"dataframe_records": [{"image": t} for t in text]}, {"inputs": {"image": text}},
                 {"instances": [{"image": t} for t in text]}):
        answer = scoring_server.invocations(json.dumps(body), "application/json", served, None)
        assert answer.status == 200 and json.loads(answer.response)["predictions"] == expected, body
    bad = json.dumps({"inputs": {"image": [text[0], "%%%"]}})
    with pytest.raises(MlflowException) as err:
        scoring_server.invocations(bad, "application/json", served, None)
    assert err.value.message == f"{CONTRACT}; image 1 is not base64 text"


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
        # The same images as base64 PNGs answer the same; text that is not base64 gets one line.
        files = [[text] for text in _b64(_encode(image) for image in pixels)]
        status, encoded = post_json(url, {"dataframe_split": {"columns": ["image"], "data": files},
                                          "params": {"cost": 0.1}})
        assert status == 200 and encoded["predictions"] == body["predictions"], encoded
        status, encoded = post_json(url, {"inputs": {"image": [files[0][0], "%%%"]}})
        assert status == 400 and encoded["message"] == f"{CONTRACT}; image 1 is not base64 text", encoded
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
