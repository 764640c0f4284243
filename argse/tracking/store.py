"""Where runs live: the tracking URI, the experiments a stage searches, the code version and the
config hash that key the cache."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from argse import ArgseError, __version__
from argse.tracking.tags import DEFAULT_EXPERIMENT_ID, HTTP_TIMEOUT_S, SYSTEM_METRICS_S


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute, so the same URI works from any folder."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def configure(tracking_uri: str | None = None) -> None:
    """Point MLflow at ``tracking_uri`` (else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    mlflow.set_tracking_uri(uri)
    # A stopped or frozen server should fail in seconds with one line, not after minutes of back-off:
    # one retry, 10 s per try (a read timeout: a long upload that keeps answering is not cut).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))
    # Our own progress bars show the long work; MLflow's per-download bars only clutter stderr.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The expert runs' system metrics (stage_run(system_metrics=True)): a sample every few seconds, so
    # that a run of a minute has a curve; MLflow's four lines per run about starting and stopping the
    # sampler are not news.
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SYSTEM_METRICS_S))
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+<sha256 of the package's source files, 12 hex>``: changes with any edit."""
    root = Path(__file__).resolve().parents[1]  # the argse package
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


def config_hash(stage: str, params: Mapping[str, Any], upstream: Mapping[str, str] | None = None) -> str:
    """Hash of a stage's resolved params with each upstream reference replaced by the run id it
    resolved to, so ``latest`` and the explicit id of the same run hash alike."""
    merged = {k: str(v) for k, v in params.items()}
    merged.update({k: str(v) for k, v in (upstream or {}).items()})
    text = json.dumps({"stage": stage, "params": merged}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- experiments ---------------------------------------------------------------------------------


def named_experiment(experiment: str | None = None) -> str | None:
    """The experiment the user named, by name or (``MLFLOW_EXPERIMENT_ID``) by id, if any."""
    if experiment:
        return experiment
    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return os.environ["MLFLOW_EXPERIMENT_NAME"]
    exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if exp_id and exp_id != DEFAULT_EXPERIMENT_ID:
        return f"id:{exp_id}"
    return None


def home_experiment(dataset: str, experiment: str | None = None) -> str:
    return named_experiment(experiment) or f"ar-gse/{dataset}"


def experiment_id(name: str, create: bool) -> str | None:
    """The id of the experiment ``name`` (or ``id:<id>``); made when missing and ``create``, else None."""
    client = MlflowClient()
    if name.startswith("id:"):
        exp = client.get_experiment(name[3:])
        return exp.experiment_id if exp else None
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise ArgseError(
                f"experiment {name!r} is deleted: restore it (mlflow experiments restore) or pick another --experiment"
            )
        return exp.experiment_id
    if not create:
        return None
    try:
        return client.create_experiment(name)
    except MlflowException:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def runs_page(experiment_id: str, server: str = "http://127.0.0.1:5000") -> str:
    """The address of an experiment's run list in MLflow's UI (3.17), in its Model training view: the
    UI opens an experiment on its GenAI pages unless the address says otherwise (its GenAI / Model
    training switch decides, whatever the experiment's tags say)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def search_experiment_ids(dataset: str, experiment: str | None = None) -> list[str]:
    """Where ``latest`` and the cache look (see the module docstring)."""
    named = named_experiment(experiment)
    if named:
        exp_id = experiment_id(named, create=False)
        return [exp_id] if exp_id else []
    ids = [DEFAULT_EXPERIMENT_ID]
    home = experiment_id(f"ar-gse/{dataset}", create=False)
    if home:
        ids.insert(0, home)
    return ids



def experiment_names(ids: list[str]) -> list[str]:
    client = MlflowClient()
    return [client.get_experiment(i).name for i in ids]


def tag_filter(conditions: Mapping[str, str]) -> str:
    """An MLflow search filter requiring each tag of ``conditions`` to have its value."""
    return " and ".join(f"tags.\"{k}\" = '{v}'" for k, v in conditions.items())
