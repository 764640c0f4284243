"""The final AR-GSE model as an MLflow pyfunc: three experts, their temperatures, the gate and the rule.

Input (the contract, in the model's metadata and checked by the model itself), in one of two forms:

* **pixels**: a batch of raw images whose pixels are integers in 0..255, an array ``[N, H, W, C]``
  (``[N, H, W]`` for the one-channel digits), uint8 or any integer dtype, of the training shape;
* **encoded images**: PNG or JPEG files of any size, grey or colour, in a column (or input) named
  ``image``: base64 text in a JSON request (``dataframe_split``, ``dataframe_records``, or
  ``{"inputs": {"image": [...]}}``), base64 text or the files' bytes in Python. Each is read as the
  training pipeline's deterministic view reads a file (:func:`argse.data.stream.read_image`: the
  largest centred square resized to the training side, grey or colour converted to the training
  channels), so an image answers as its pixels would. A model trained on non-square images takes
  pixels only.

Anything else is refused with one line that names both forms (HTTP 400 from ``mlflow models serve``):
floats (the scoring server would otherwise cast ``0.5`` to 0 and answer a black image), integers
outside 0..255, another shape, a request with no images, and, for encoded images, an empty value,
text that is not base64 and bytes Pillow cannot read (naming the image's row, counted from 0). The
signature declares the outputs and the ``cost`` parameter, not the input: a declared uint8 input
makes MLflow cast a request's numbers to uint8 before the model sees them, cutting fractions off, and
a declared ``image`` column makes it turn a pixel batch into a column of text (the two forms cannot
share one MLflow schema). Both forms are in the metadata's ``input_contract`` instead. A Python batch
of zero images of the right shape (or an empty ``image`` column) gets an empty answer.

Output: one row per image with ``prediction``, ``accept``, ``margin``, ``group`` (the name of the
predicted class's group: ``head`` / ``tail``) and ``confidence`` (the mixture's probability of the
predicted class). The inference parameter ``cost`` (a number >= 0) changes the rejection cost at
predict time: an image is accepted when its margin is at least ``-cost``, so a higher cost accepts
more (rules with per-group thresholds ignore it, as their thresholds replace the cost). The rejector
abstains on hard images of the classes it was trained on; it is not an out-of-distribution detector,
and answers an image of something else (a blank one included) like any other.

The model holds data only: ``data/components`` (the experts' and the gate's weights, the rule, and
``meta.json`` with the provenance) and MLflow's own files. Its code is this installed package: MLflow
loads it through the ``loader_module`` flavour (:mod:`argse.served_model`), which checks every file
of the model against the digests the run that logged it sealed on the tracking server, and reads
weights only with ``torch.load(weights_only=True)`` (docs/team-server.md says why).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from argse import ArgseError, __version__
from argse.data.stream import read_image
from argse.models.backbones import build_backbone
from argse.models.experts import ExpertModel
from argse.models.gating import GatingNet, gated_mixture
from argse.selective import PluginRule
from argse.stage_registry import MODEL

# The answer's columns, their dtypes and their MLflow signature types.
OUTPUT_COLUMNS = {"prediction": (np.int64, "long"), "accept": (bool, "boolean"), "margin": (np.float64, "double"),
                  "group": (str, "string"), "confidence": (np.float64, "double")}
LOADER = "argse.served_model"  # the module MLflow imports to load the model (it defines _load_pyfunc)
COMPONENTS = "data/components"  # inside the model folder: what the loader reads
EXPERT_FILE = "expert_{name}.pt"
GATE_FILE = "gate.pt"
RULE_FILE = "rule.json"
META_FILE = "meta.json"
ENCODED = "image"  # the column (or input) that holds encoded images: base64 text, or bytes in Python
#: The fields of meta.json that say where the model comes from: the run that logged it (whose sealed
#: digests the loader checks every file against) and the runs its files were copied from.
PROVENANCE = ("run_id", "upstream")


class ContractError(MlflowException):
    """A request that breaks the input contract: HTTP 400 from ``mlflow models serve``, one line.

    The scoring server prefixes the message of any MlflowException raised in ``predict`` with the
    whole request (``Failed to predict data '<every pixel>'``); the message of this one is fixed once
    set, so the client reads the one line that says what to send instead."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_line"):
            self._line = value


def input_contract(image_shape) -> str:
    """What a request must hold, in words (the first half of every refusal): both forms, or the pixels
    alone for a model trained on non-square images."""
    h, w, c = image_shape
    shape = f"[N, {h}, {w}]" if c == 1 else f"[N, {h}, {w}, {c}]"
    pixels = f"send images as integers in 0..255 (uint8) of shape {shape}"
    if h != w:
        return pixels
    return f"{pixels}, or as PNG or JPEG files, base64 text in a column named {ENCODED}"


def as_images(images, image_shape) -> np.ndarray:
    """The uint8 batch a request holds (pixels, or encoded images read by :func:`decode_image`), or a
    :class:`ContractError` naming the contract."""
    h, w, c = image_shape
    contract = input_contract(image_shape)
    encoded = encoded_values(images, contract)
    if encoded is not None:
        if h != w:
            raise ContractError(f"{contract}; got encoded images, which this model does not take: it was trained on "
                                f"{h} x {w} images and reads files as squares, so send their pixels")
        out = np.zeros((len(encoded), h, w, c), dtype=np.uint8)
        for row, value in enumerate(encoded):
            out[row] = decode_image(value, row, image_shape, contract)
        return out
    images = images.to_numpy() if isinstance(images, pd.DataFrame) else np.asarray(images)
    shapes = ((h, w, c),) + (((h, w),) if c == 1 else ())
    if images.size == 0:
        if images.ndim in (3, 4) and images.shape[1:] in shapes:
            return np.zeros((0, h, w, c), dtype=np.uint8)
        raise ContractError(f"{contract}; got no images (an empty request): send at least one")
    if images.dtype.kind == "f":
        low, high = float(np.nanmin(images)), float(np.nanmax(images))
        raise ContractError(f"{contract}; got floats in [{low:g}, {high:g}]: scale them to 0..255 and round to "
                            "integers (x * 255 for [0, 1], x * 255 / 16 for scikit-learn's 0..16 digits)")
    if images.dtype.kind not in "iu":
        kind = {"b": "booleans", "U": "text", "S": "bytes", "O": "mixed values"}.get(images.dtype.kind, str(images.dtype))
        raise ContractError(f"{contract}; got {kind}")
    if images.ndim not in (3, 4) or images.shape[1:] not in shapes:
        raise ContractError(f"{contract}; got shape {list(images.shape)}")
    low, high = int(images.min()), int(images.max())
    if low < 0 or high > 255:
        raise ContractError(f"{contract}; got integers in {low}..{high}")
    return images.astype(np.uint8, copy=False).reshape((-1, h, w, c))


def encoded_values(images, contract: str) -> list | None:
    """The values of a request's :data:`ENCODED` column, one per image, or ``None`` for a request
    without one (pixels). The scoring server hands ``dataframe_split`` and ``dataframe_records`` over as
    a DataFrame, ``{"inputs": {"image": [...]}}`` and ``instances`` records as a dict of arrays."""
    if isinstance(images, pd.DataFrame):
        if ENCODED not in images.columns and all(dtype.kind in "iufb" for dtype in images.dtypes):
            return None
        names = [str(name) for name in images.columns]
        values = images[ENCODED] if names == [ENCODED] else None
    elif isinstance(images, dict):
        names = [str(name) for name in images]
        values = images[ENCODED] if names == [ENCODED] else None
    else:
        return None
    if values is None:
        raise ContractError(f"{contract}; got the columns {names}")
    if isinstance(values, (str, bytes)):
        return [values]
    values = values.to_numpy() if isinstance(values, pd.Series) else values
    if isinstance(values, np.ndarray) and values.ndim > 1:
        raise ContractError(f"{contract}; got a {ENCODED} column of shape {list(values.shape)}: send one value "
                            "per image")
    return values.reshape(-1).tolist() if isinstance(values, np.ndarray) else list(values)


def decode_image(value, row: int, image_shape, contract: str) -> np.ndarray:
    """Image ``row`` of the :data:`ENCODED` column (base64 text, or the file's bytes) as uint8 [S, S, C]:
    the training pipeline's deterministic view of the file (:func:`argse.data.stream.read_image`)."""
    side, _, channels = image_shape
    if isinstance(value, str):
        try:
            raw = base64.b64decode("".join(value.split()), validate=True)
        except ValueError:  # binascii.Error, or text that is not ASCII
            raise ContractError(f"{contract}; image {row} is not base64 text") from None
    elif isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    else:
        raise ContractError(f"{contract}; image {row} is not base64 text or bytes (got {type(value).__name__})")
    if not raw:
        raise ContractError(f"{contract}; image {row} is empty")
    try:
        return read_image(io.BytesIO(raw), side, channels)
    except Exception as exc:  # Pillow raises many kinds on bytes that are not an image, or a damaged one
        raise ContractError(f"{contract}; image {row} is not a PNG or JPEG image Pillow can read "
                            f"({type(exc).__name__})") from None


def as_cost(value) -> float | None:
    """The ``cost`` inference parameter: ``None`` (the rule's own) or a finite number >= 0."""
    if value is None:
        return None
    try:
        cost = float(value)
    except (TypeError, ValueError):
        cost = float("nan")
    if isinstance(value, bool) or not np.isfinite(cost) or cost < 0:
        raise ContractError(f"params.cost must be a number >= 0 (the rejection cost); got {value!r}")
    return cost


class ARGSEModel:
    """The served model: what :func:`load_checked` returns for MLflow to call ``predict`` on."""

    def __init__(self, folder: Path):
        meta = json.loads((folder / META_FILE).read_text())
        self.meta = meta
        self.experts = []
        for name in meta["experts"]:
            saved = torch.load(folder / EXPERT_FILE.format(name=name), map_location="cpu", weights_only=True)
            backbone = build_backbone(meta["backbone"], meta["num_classes"], in_channels=meta["image_shape"][2])
            model = ExpertModel(backbone, saved["mean"], saved["std"])
            model.load_state_dict(saved["state_dict"])
            self.experts.append(model.eval())
        self.gate = load_gate_file(folder / GATE_FILE)
        self.rule = PluginRule.from_dict(json.loads((folder / RULE_FILE).read_text()))
        self.shifts = torch.tensor(meta["posterior_shifts"], dtype=torch.float64)

    @torch.no_grad()
    def posteriors(self, images) -> torch.Tensor:
        """Calibrated expert posteriors [N, E, C] (float64) of raw images (see :func:`as_images`), each
        moved to the target prior the rule was fitted under (``posterior_shifts`` in meta.json)."""
        x = torch.from_numpy(np.require(as_images(images, self.meta["image_shape"]), requirements=["C", "W"]))
        logits = torch.stack([expert(x).double() for expert in self.experts], dim=1)
        return (logits + self.shifts[None]).softmax(dim=2)

    def predict(self, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        cost = as_cost((params or {}).get("cost"))
        images = as_images(model_input, self.meta["image_shape"])
        if len(images) == 0:
            return _frame({name: [] for name in OUTPUT_COLUMNS})
        return predict_frame(self.rule, gated_mixture(self.gate, self.posteriors(images)), cost,
                             group_names=self.meta["group_names"])


def load_gate_file(path: Path) -> GatingNet:
    """A gate as the gating stage saves it (``{"state_dict", "config"}``), weights only."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    gate = GatingNet.from_config(saved["config"])
    gate.load_state_dict(saved["state_dict"])
    return gate.eval()


def load_checked(data_path: str | Path) -> ARGSEModel:
    """The model whose components are at ``data_path``, after :func:`check_model` (MLflow's entry)."""
    components = Path(data_path)
    root = next((p for p in (components, *components.parents) if (p / "MLmodel").is_file()), None)
    if root is None or components != root / COMPONENTS:
        raise ModelRefused(f"{components} is not the {COMPONENTS} folder of an argse model: load the model folder "
                           "(or models:/...) that `argse fit` logged")
    check_model(root)
    return ARGSEModel(components)


class ModelRefused(MlflowException):
    """The loader refuses a model it cannot vouch for: one line naming the run and the file."""


def check_model(root: Path) -> str:
    """Check every file of the model folder ``root`` against the digests its run sealed, read from the
    tracking server (never from the folder itself): one line naming the run and the file where one
    differs, is missing or was added. The run is the one meta.json and MLmodel both name; a model
    without that provenance is refused. Only the run that is logging the model (the active run of this
    process, checking what it just logged) may be read before its digests are sealed. Returns the run id."""
    from mlflow.models import Model

    from argse.tracking import integrity

    try:
        meta = json.loads((root / COMPONENTS / META_FILE).read_text())
        logged_by = Model.load(str(root / "MLmodel")).run_id
    except (OSError, ValueError, MlflowException) as exc:
        raise ModelRefused(f"this model's {COMPONENTS}/{META_FILE} or MLmodel cannot be read ({type(exc).__name__}): "
                           "do not serve it") from None
    missing = [field for field in PROVENANCE if not meta.get(field)]
    if missing:
        raise ModelRefused(f"this model's {META_FILE} has no {', '.join(missing)} (its provenance): it cannot be checked "
                           "against the run that logged it; do not serve it, refit with `argse fit`")
    run_id = meta["run_id"]
    if logged_by != run_id:
        raise ModelRefused(f"this model's {META_FILE} names run {run_id} but its MLmodel run {logged_by}: one was "
                           "edited; do not serve it")
    active = mlflow.active_run()
    try:
        digests = integrity.recorded(run_id, sealed_only=not (active and active.info.run_id == run_id))
    except integrity.ArtifactChanged as exc:
        raise ModelRefused(str(exc)) from None
    except Exception as exc:  # the tracking server: unreachable, or the run is gone
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelRefused(f"cannot check this model's files against run {run_id} that logged it ({line}): set "
                           "MLFLOW_TRACKING_URI to the tracking server it was logged to") from None
    expected = {path.removeprefix(f"{MODEL}/"): values for path, values in digests.items()
                if path.startswith(f"{MODEL}/")}
    found = integrity.files_under(root, "")
    for name in sorted(set(expected) - set(found)):
        raise ModelRefused(f"run {run_id}: {MODEL}/{name}, a file of the model it logged, is missing: do not serve it")
    for name, file in found.items():
        if name not in expected:
            raise ModelRefused(f"run {run_id}: {MODEL}/{name} is not among the files the run logged (it was added): "
                               "do not serve it")
        digest = integrity.sha256(file)
        if digest not in expected[name]:
            raise ModelRefused(f"run {run_id}: {MODEL}/{name} is not what the run logged (sha256 expected "
                               f"{expected[name][-1][:16]}..., found {digest[:16]}...): do not serve it; refit with "
                               "`argse fit`")
    return run_id


def predict_frame(rule: PluginRule, mixture: torch.Tensor, cost: float | None = None,
                  group_names=None) -> pd.DataFrame:
    """The model's output rows for mixture posteriors [N, C] (shared with the stages' own checks); the
    group is named by ``group_names`` (its index, as text, without them)."""
    if cost is not None and rule.thresholds is None:
        rule = rule.with_cost(float(cost))
    out = rule.predict(mixture)
    names = list(group_names) if group_names else [str(k) for k in range(rule.n_groups)]
    return _frame({"prediction": out.pred.numpy(), "accept": out.accept.numpy(), "margin": out.margin.double().numpy(),
                   "group": [names[k] for k in out.group.tolist()],
                   "confidence": mixture.gather(1, out.pred[:, None].long())[:, 0].double().numpy()})


def _frame(columns: dict) -> pd.DataFrame:
    return pd.DataFrame(columns).astype({name: dtype for name, (dtype, _) in OUTPUT_COLUMNS.items()})


def save_expert(model: ExpertModel, path: Path) -> Path:
    """Write an expert as the model reads it (its state dict with temperature and normalisation): what
    an expert run logs as ``expert/weights.pt``, and a fit copies byte for byte into its model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "mean": (model.mean.flatten() / 255.0).tolist(),
                "std": (model.std.flatten() / 255.0).tolist()}, path)
    return path


def write_components(folder: Path, *, experts: dict[str, Path], gate: Path, rule: PluginRule, meta: dict) -> Path:
    """Write what :class:`ARGSEModel` loads into ``folder``: the experts' and the gate's files copied byte
    for byte from the runs that logged them (``experts``: name -> file, ``gate``: file), the rule, and
    ``meta.json`` (``meta`` with the expert names; its provenance fields: :data:`PROVENANCE`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, file in experts.items():
        shutil.copyfile(file, folder / EXPERT_FILE.format(name=name))
    shutil.copyfile(gate, folder / GATE_FILE)
    (folder / RULE_FILE).write_text(json.dumps(rule.to_dict()))
    (folder / META_FILE).write_text(json.dumps({**meta, "experts": list(experts)}, indent=1))
    return folder


def log_model(components: Path, *, image_shape, cost: float, example: np.ndarray):
    """Log the model of ``components`` (:func:`write_components`) as the active run's ``model``;
    returns MLflow's ModelInfo and the model loaded back from the store (its files checked).

    In three steps, so that the digests exist before any file: the model is saved locally (MLflow's
    ``loader_module`` flavour, an input example with its ``cost``), the digests of all its files are
    recorded, then it is uploaded as the run's logged model. MLflow's own check of the input example,
    which loads the model before its files have digests, is replaced by :func:`check_serving_example`
    after the upload. The signature declares the outputs and the ``cost`` parameter; the input contract
    is in the metadata (see the module docstring)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from argse.tracking import integrity

    h, w, c = image_shape
    signature = ModelSignature(
        outputs=Schema([ColSpec(kind, name) for name, (_, kind) in OUTPUT_COLUMNS.items()]),
        params=ParamSchema([ParamSpec("cost", "double", float(cost))]),
    )
    images = example.reshape((-1, h, w) if c == 1 else (-1, h, w, c)).astype(np.uint8)
    run_id = mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    logged = mlflow.initialize_logged_model(name=MODEL, source_run_id=run_id)
    mlflow_model = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                         model_id=logged.model_id)
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / MODEL
            mlflow.pyfunc.save_model(
                str(local), loader_module=LOADER, data_path=str(components), mlflow_model=mlflow_model,
                signature=signature, input_example=(images, {"cost": float(cost)}),
                pip_requirements=pip_requirements(), metadata={"input_contract": input_contract(image_shape)})
            if not (local / COMPONENTS / META_FILE).is_file():
                raise ArgseError(f"MLflow saved the model's data elsewhere than {COMPONENTS}")
            integrity.record(local, MODEL)
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    info = mlflow_model.get_model_info(client.get_logged_model(logged.model_id))
    return info, check_serving_example(info.model_uri)


def check_serving_example(model_uri: str):
    """Load the model at ``model_uri`` (its files checked against their digests, so only once they
    exist) and send its logged serving example through MLflow's scoring server code (the handler
    ``mlflow models serve`` runs): it must answer one row per image. Returns the loaded model."""
    from mlflow.pyfunc import scoring_server

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        model = mlflow.pyfunc.load_model(str(local))
        example = model.metadata.get_serving_input(str(local))
    if example is None:
        raise ArgseError(f"the model at {model_uri} has no serving input example")
    answer = scoring_server.invocations(example, "application/json", model, model.metadata.get_input_schema())
    rows = json.loads(answer.response).get("predictions") if answer.status == 200 else None
    if rows is None or len(rows) != len(json.loads(example)["inputs"]):
        raise ArgseError(f"the model at {model_uri} did not answer its own serving example (HTTP {answer.status}: "
                         f"{answer.response[:200]})")
    return model


def pip_requirements() -> list[str]:
    """What the model needs installed where it is served: this package (its loader, :data:`LOADER`)
    and the versions of its dependencies it was logged with."""
    import pandas

    return [f"argse=={__version__}", f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}", f"pandas=={pandas.__version__}"]


def package_dir() -> str:
    """The ``argse`` package folder, logged with the experts' own models (``mlflow.pytorch``) so that
    they load without the package installed."""
    return str(Path(__file__).resolve().parent)
