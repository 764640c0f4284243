"""The final AR-GSE model as an MLflow pyfunc: three experts, their temperatures, the gate and the rule.

Input: a batch of raw images, uint8 ``[N, H, W, C]`` (``[N, H, W]`` for the one-channel digits).
Output: one row per image with ``prediction``, ``accept``, ``margin``, ``group`` (of the predicted
class) and ``confidence`` (the mixture's probability of the predicted class). The inference
parameter ``cost`` changes the rejection cost at predict time (rules with per-group thresholds ignore
it, as their thresholds replace the cost).
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

from argse.models.backbones import build_backbone
from argse.models.experts import ExpertModel
from argse.models.gating import GatingNet, mix
from argse.selective import PluginRule


class ARGSEModel(mlflow.pyfunc.PythonModel):
    """The pyfunc; build its artifacts with :func:`save_components`."""

    def load_context(self, context) -> None:
        folder = Path(context.artifacts["components"])
        meta = json.loads((folder / "meta.json").read_text())
        self.meta = meta
        self.experts = []
        for name in meta["experts"]:
            saved = torch.load(folder / f"expert_{name}.pt", map_location="cpu", weights_only=True)
            model = ExpertModel(build_backbone(meta["dataset"], meta["num_classes"]), saved["mean"], saved["std"])
            model.load_state_dict(saved["state_dict"])
            self.experts.append(model.eval())
        saved = torch.load(folder / "gate.pt", map_location="cpu", weights_only=True)
        self.gate = GatingNet.from_config(saved["config"])
        self.gate.load_state_dict(saved["state_dict"])
        self.gate.eval()
        self.rule = PluginRule.from_dict(json.loads((folder / "rule.json").read_text()))

    def _check(self, images: np.ndarray) -> torch.Tensor:
        h, w, c = self.meta["image_shape"]
        expected = f"[N, {h}, {w}]" if c == 1 else f"[N, {h}, {w}, {c}]"
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 of shape {expected}; got dtype {images.dtype}")
        ok = images.shape[1:] in ((h, w, c),) + (((h, w),) if c == 1 else ())
        if images.ndim not in (3, 4) or not ok:
            raise ValueError(f"images must be uint8 of shape {expected}; got shape {list(images.shape)}")
        return torch.from_numpy(np.ascontiguousarray(images))

    @torch.no_grad()
    def posteriors(self, images: np.ndarray) -> torch.Tensor:
        """Calibrated expert posteriors [N, E, C] (float64) of raw images."""
        x = self._check(np.asarray(images))
        return torch.stack([expert(x).double().softmax(dim=1) for expert in self.experts], dim=1)

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        # The ndarray hint tells MLflow to validate with the logged signature, not with hints.
        images = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
        probs = self.posteriors(images)
        with torch.no_grad():
            mixture = mix(probs, self.gate(probs.float()).double())
        return predict_frame(self.rule, mixture, (params or {}).get("cost"))


def predict_frame(rule: PluginRule, mixture: torch.Tensor, cost: float | None = None) -> pd.DataFrame:
    """The model's output rows for mixture posteriors [N, C] (shared with the stages' own checks)."""
    if cost is not None and rule.thresholds is None:
        rule = rule.with_cost(float(cost))
    out = rule.predict(mixture)
    return pd.DataFrame({
        "prediction": out.pred.numpy().astype(np.int64),
        "accept": out.accept.numpy().astype(bool),
        "margin": out.margin.double().numpy(),
        "group": out.group.numpy().astype(np.int64),
        "confidence": mixture.gather(1, out.pred[:, None].long())[:, 0].double().numpy(),
    })


def save_components(folder: Path, *, dataset: str, num_classes: int, image_shape, class_names, group_names,
                    experts: dict[str, ExpertModel], gate: GatingNet, rule: PluginRule) -> Path:
    """Write what :class:`ARGSEModel` loads into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in experts.items():
        torch.save({"state_dict": model.state_dict(), "mean": (model.mean.flatten() / 255.0).tolist(),
                    "std": (model.std.flatten() / 255.0).tolist()}, folder / f"expert_{name}.pt")
    torch.save({"state_dict": gate.state_dict(), "config": gate.config()}, folder / "gate.pt")
    (folder / "rule.json").write_text(json.dumps(rule.to_dict()))
    meta = {"dataset": dataset, "num_classes": num_classes, "image_shape": list(image_shape),
            "class_names": list(class_names), "group_names": list(group_names), "experts": list(experts)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return folder


def log_model(*, dataset: str, num_classes: int, image_shape, class_names, group_names,
              experts: dict[str, ExpertModel], gate: GatingNet, rule: PluginRule, example: np.ndarray):
    """Log the pyfunc as the active run's ``model``; returns MLflow's ModelInfo."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    h, w, c = image_shape
    shape = (-1, h, w) if c == 1 else (-1, h, w, c)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), shape)]),
        outputs=Schema([ColSpec("long", "prediction"), ColSpec("boolean", "accept"), ColSpec("double", "margin"),
                        ColSpec("long", "group"), ColSpec("double", "confidence")]),
        params=ParamSchema([ParamSpec("cost", "double", float(rule.cost))]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_components(Path(tmp) / "components", dataset=dataset, num_classes=num_classes,
                                 image_shape=image_shape, class_names=class_names, group_names=group_names,
                                 experts=experts, gate=gate, rule=rule)
        return mlflow.pyfunc.log_model(
            name="model", python_model=ARGSEModel(), artifacts={"components": str(folder)},
            signature=signature, input_example=example.reshape((-1,) + shape[1:]),
            pip_requirements=pip_requirements(), code_paths=[package_dir()],
        )


def package_dir() -> str:
    """The ``argse`` package folder, logged with models so they load without the package installed."""
    return str(Path(__file__).resolve().parent)


def pip_requirements() -> list[str]:
    import pandas

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}", f"pandas=={pandas.__version__}"]
