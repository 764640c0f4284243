"""The final AR-GSE model as an MLflow pyfunc: three experts, their temperatures, the gate and the rule.

Input (the contract, declared in the model's signature): a batch of raw images whose pixels are
integers in 0..255, a uint8 array ``[N, H, W, C]`` (``[N, H, W]`` for the one-channel digits). MLflow
enforces it: ``predict`` in Python refuses other dtypes and shapes; the scoring server casts a JSON
request's numbers to uint8 (so send integers: a fraction is cut off) and refuses integers outside
0..255. The model checks the same again for callers that bypass MLflow (:func:`as_images`).
An empty batch gets an empty answer. Output: one row per image with ``prediction``, ``accept``,
``margin``, ``group`` (the name of the predicted class's group: ``head`` / ``tail``) and ``confidence``
(the mixture's probability of the predicted class). The inference parameter ``cost`` (a number >= 0)
changes the rejection cost at predict time: an image is accepted when its margin is at least ``-cost``,
so a higher cost accepts more (rules with per-group thresholds ignore it, as their thresholds replace
the cost). The rejector abstains on hard images of the classes it was trained on; it is not an out-of-
distribution detector, and answers an image of something else (a blank one included) like any other.

The model is logged *from code* (MLflow 3): ``served_model.py`` builds :class:`ARGSEModel`, and the
``argse`` package travels with the model (``code_paths``), so it loads where argse is not installed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from argse.models.backbones import build_backbone
from argse.models.experts import ExpertModel
from argse.models.gating import GatingNet, gated_mixture
from argse.selective import PluginRule
from argse.stage_registry import MODEL


# The answer's columns, their dtypes and their MLflow signature types.
OUTPUT_COLUMNS = {"prediction": (np.int64, "long"), "accept": (bool, "boolean"), "margin": (np.float64, "double"),
                  "group": (str, "string"), "confidence": (np.float64, "double")}
MODEL_CODE = Path(__file__).with_name("served_model.py")


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
    """What a request must hold, in words (the first half of every refusal)."""
    h, w, c = image_shape
    shape = f"[N, {h}, {w}]" if c == 1 else f"[N, {h}, {w}, {c}]"
    return f"send images as integers in 0..255 (uint8) of shape {shape}"


def as_images(images, image_shape) -> np.ndarray:
    """The uint8 batch a request holds, or a :class:`ContractError` naming the contract."""
    h, w, c = image_shape
    contract = input_contract(image_shape)
    images = images.to_numpy() if isinstance(images, pd.DataFrame) else np.asarray(images)
    if images.size == 0:
        return np.zeros((0, h, w, c), dtype=np.uint8)
    if images.dtype.kind == "f":
        low, high = float(np.nanmin(images)), float(np.nanmax(images))
        raise ContractError(f"{contract}; got floats in [{low:g}, {high:g}]: scale them to 0..255 and round "
                            "(x * 255 for [0, 1], x * 255 / 16 for scikit-learn's 0..16 digits)")
    if images.dtype.kind not in "iu":
        kind = {"b": "booleans", "U": "text", "S": "bytes", "O": "mixed values"}.get(images.dtype.kind, str(images.dtype))
        raise ContractError(f"{contract}; got {kind}")
    ok = images.shape[1:] in ((h, w, c),) + (((h, w),) if c == 1 else ())
    if images.ndim not in (3, 4) or not ok:
        raise ContractError(f"{contract}; got shape {list(images.shape)}")
    low, high = int(images.min()), int(images.max())
    if low < 0 or high > 255:
        raise ContractError(f"{contract}; got integers in {low}..{high}")
    return images.astype(np.uint8, copy=False).reshape((-1, h, w, c))


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


class ARGSEModel(mlflow.pyfunc.PythonModel):
    """The pyfunc; build its artifacts with :func:`save_components`."""

    def load_context(self, context) -> None:
        folder = Path(context.artifacts["components"])
        meta = json.loads((folder / "meta.json").read_text())
        check_components(folder, meta.get("run_id"))
        self.meta = meta
        self.experts = []
        for name in meta["experts"]:
            saved = torch.load(folder / f"expert_{name}.pt", map_location="cpu", weights_only=True)
            model = ExpertModel(build_backbone(backbone_of(meta), meta["num_classes"]), saved["mean"], saved["std"])
            model.load_state_dict(saved["state_dict"])
            self.experts.append(model.eval())
        saved = torch.load(folder / "gate.pt", map_location="cpu", weights_only=True)
        self.gate = GatingNet.from_config(saved["config"])
        self.gate.load_state_dict(saved["state_dict"])
        self.gate.eval()
        self.rule = PluginRule.from_dict(json.loads((folder / "rule.json").read_text()))
        # Models logged before the experts' posteriors were moved to the target prior have no shifts.
        self.shifts = torch.tensor(meta.get("posterior_shifts", [[0.0] * meta["num_classes"]] * len(self.experts)),
                                   dtype=torch.float64)

    @torch.no_grad()
    def posteriors(self, images) -> torch.Tensor:
        """Calibrated expert posteriors [N, E, C] (float64) of raw images (see :func:`as_images`), each
        moved to the target prior the rule was fitted under (``posterior_shifts`` in meta.json)."""
        x = torch.from_numpy(np.ascontiguousarray(as_images(images, self.meta["image_shape"])))
        logits = torch.stack([expert(x).double() for expert in self.experts], dim=1)
        return (logits + self.shifts[None]).softmax(dim=2)

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        # The ndarray hint tells MLflow to validate with the logged signature, not with hints.
        cost = as_cost((params or {}).get("cost"))
        images = as_images(model_input, self.meta["image_shape"])
        if len(images) == 0:
            return _frame({name: [] for name in OUTPUT_COLUMNS})
        return predict_frame(self.rule, gated_mixture(self.gate, self.posteriors(images)), cost,
                             group_names=self.meta.get("group_names"))


def check_components(folder: Path, run_id: str | None) -> None:
    """Check the model's files against the digests its fit run recorded (write-once params), before any
    of them is read: one line naming the run and the file where one differs. Models logged before the
    digests existed have no run id and are read as they are."""
    if not run_id:
        return
    from argse.tracking.integrity import ArtifactChanged, recorded, sha256

    try:
        digests = recorded(run_id)
    except Exception as exc:  # the tracking server: unreachable, or the run is gone
        raise MlflowException(f"cannot check this model's files against run {run_id} that logged it "
                              f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}): "
                              "set MLFLOW_TRACKING_URI to the tracking server it was logged to") from None
    by_name = {path.split("/components/", 1)[1]: values for path, values in digests.items() if "/components/" in path}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = file.relative_to(folder).as_posix()
        if name not in by_name:
            raise ArtifactChanged(f"run {run_id}: model/.../components/{name} is not among the files the run logged")
        found = sha256(file)
        if found not in by_name[name]:
            raise ArtifactChanged(f"run {run_id}: model/.../components/{name} is not what the run logged (sha256 "
                                  f"expected {by_name[name][-1][:16]}..., found {found[:16]}...): do not serve it; "
                                  "refit with `argse fit`")


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


#: The expert network of models logged before meta.json named it, by their dataset.
EARLIER_BACKBONES = {"cifar100-lt": "resnet32", "digits-lt": "digits-net", "fashion-mnist-lt": "resnet8-grey"}


def backbone_of(meta: dict) -> str:
    """The expert network a logged model's meta.json names (models logged before it did: by dataset)."""
    return meta.get("backbone") or EARLIER_BACKBONES[meta["dataset"]]


def save_components(folder: Path, *, dataset: str, backbone: str, num_classes: int, image_shape, class_names,
                    group_names, experts: dict[str, ExpertModel], gate: GatingNet, rule: PluginRule,
                    shifts: torch.Tensor | None = None, run_id: str | None = None) -> Path:
    """Write what :class:`ARGSEModel` loads into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in experts.items():
        torch.save({"state_dict": model.state_dict(), "mean": (model.mean.flatten() / 255.0).tolist(),
                    "std": (model.std.flatten() / 255.0).tolist()}, folder / f"expert_{name}.pt")
    torch.save({"state_dict": gate.state_dict(), "config": gate.config()}, folder / "gate.pt")
    (folder / "rule.json").write_text(json.dumps(rule.to_dict()))
    meta = {"run_id": run_id, "dataset": dataset, "backbone": backbone, "num_classes": num_classes,
            "image_shape": list(image_shape),
            "class_names": list(class_names), "group_names": list(group_names), "experts": list(experts),
            "posterior_shifts": (torch.zeros(len(experts), num_classes) if shifts is None else shifts).tolist()}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return folder


def log_model(*, dataset: str, backbone: str, num_classes: int, image_shape, class_names, group_names,
              experts: dict[str, ExpertModel], gate: GatingNet, rule: PluginRule, example: np.ndarray,
              shifts: torch.Tensor | None = None, run_id: str | None = None):
    """Log the pyfunc, from code, as the active run's ``model``; returns MLflow's ModelInfo.

    The signature declares the input (uint8 images, [-1, H, W] or [-1, H, W, C]), the outputs and the
    ``cost`` parameter, so the registry shows the contract. With it, MLflow itself enforces the
    input: in Python, ``predict`` refuses any array that is not uint8 of that shape; the scoring server
    casts a request's JSON numbers to uint8 before the model sees them (a fraction is cut off: 0.5 is
    0) and refuses integers outside 0..255. The input example, with its ``cost``, shows the request."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    h, w, c = image_shape
    shape = (-1, h, w) if c == 1 else (-1, h, w, c)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), shape)]),
        outputs=Schema([ColSpec(kind, name) for name, (_, kind) in OUTPUT_COLUMNS.items()]),
        params=ParamSchema([ParamSpec("cost", "double", float(rule.cost))]),
    )
    images = example.reshape(shape).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_components(Path(tmp) / "components", dataset=dataset, backbone=backbone, num_classes=num_classes,
                                 image_shape=image_shape, class_names=class_names, group_names=group_names,
                                 experts=experts, gate=gate, rule=rule, shifts=shifts, run_id=run_id)
        return mlflow.pyfunc.log_model(
            name=MODEL, python_model=str(MODEL_CODE), artifacts={"components": str(folder)},
            signature=signature, input_example=(images, {"cost": float(rule.cost)}),
            pip_requirements=pip_requirements(), code_paths=[package_dir()],
            metadata={"input_contract": input_contract(image_shape)},
        )


def package_dir() -> str:
    """The ``argse`` package folder, logged with models so they load without the package installed."""
    return str(Path(__file__).resolve().parent)


def pip_requirements() -> list[str]:
    import pandas

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}", f"pandas=={pandas.__version__}"]
