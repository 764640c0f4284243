"""The tracking contract (DESIGN.md §6): stage runs, tags, upstream resolution, cache look-up.

Where runs live. A stage's *home* experiment is the one the user names (``--experiment``,
``MLFLOW_EXPERIMENT_NAME``, or ``mlflow run --experiment-name/--experiment-id``); when none is named
it is ``ar-gse/<dataset>``. ``mlflow run`` without an experiment puts its run in MLflow's Default
experiment, which we cannot move, so the rule that makes both paths meet is: **when no experiment is
named, ``latest`` and the cache search the home experiment and the Default experiment together**;
when one is named, they search that experiment only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from argse import ArgseError, __version__

log = logging.getLogger(__name__)

TAG_STAGE = "argse.stage"
TAG_DATASET = "argse.dataset"
TAG_CODE = "argse.code_version"
TAG_HASH = "argse.config_hash"
TAG_EXPERT = "argse.expert"
TAG_UPSTREAM = "argse.upstream."  # + upstream name, e.g. argse.upstream.splits
DEFAULT_EXPERIMENT_ID = "0"
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")

# How to produce a missing upstream run, for the one-line error.
PRODUCER = {
    "splits": "argse splits",
    "experts": "argse experts",
    "gating": "argse gating --mode pretrain",
    "gating-selective": "argse gating --mode selective",
    "argse": "argse fit",
    "evaluate": "argse evaluate",
    "pipeline": "argse pipeline",
}


def configure(tracking_uri: str | None = None) -> None:
    """Point MLflow at ``tracking_uri`` (else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    mlflow.set_tracking_uri(uri)
    # A stopped server should fail in seconds with one line, not after minutes of back-off.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # Our own progress bars show the long work; MLflow's per-download bars only clutter stderr.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+<sha256 of the package's source files, 12 hex>``: changes with any edit."""
    root = Path(__file__).resolve().parent
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


def _experiment_id(name: str, create: bool) -> str | None:
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


def search_experiment_ids(dataset: str, experiment: str | None = None) -> list[str]:
    """Where ``latest`` and the cache look (see the module docstring)."""
    named = named_experiment(experiment)
    if named:
        exp_id = _experiment_id(named, create=False)
        return [exp_id] if exp_id else []
    ids = [DEFAULT_EXPERIMENT_ID]
    home = _experiment_id(f"ar-gse/{dataset}", create=False)
    if home:
        ids.insert(0, home)
    return ids


# -- stage runs ----------------------------------------------------------------------------------


def _log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Log the resolved options. ``mlflow run`` has already logged its raw ``-P`` values under the
    same names (``imb_factor=preset``); MLflow forbids changing a param, so a resolved value that
    differs from the raw one goes under ``<name>.resolved``."""
    existing = MlflowClient().get_run(run_id).data.params
    fresh = {}
    for key, value in params.items():
        text = "" if value is None else str(value)
        if key not in existing:
            fresh[key] = text
        elif existing[key] != text and existing.get(f"{key}.resolved", text) == text:
            fresh[f"{key}.resolved"] = text
    if fresh:
        mlflow.log_params(fresh)


def top_level_name(run_name: str, dataset: str) -> str:
    """The name of a run at the top of the run list (``experts digits-lt``): what it is and on which
    data. Child runs keep their short names (``expert-ce``), their parent says the rest."""
    return f"{run_name} {dataset}"


@contextlib.contextmanager
def stage_run(
    stage: str,
    dataset: str,
    params: Mapping[str, Any],
    *,
    upstream: Mapping[str, str] | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    resume_run_id: str | None = None,
) -> Iterator[Run]:
    """Start (or resume) the MLflow run of a stage; tag it, log its params; end it FINISHED, or
    FAILED when the body raises (KILLED on Ctrl-C), so ``latest`` never resolves to a broken run.

    Which run: ``resume_run_id`` if given; a child of the active run when there is one (pipeline,
    ``--expert all``), named ``run_name``; the run ``mlflow run`` handed over in ``MLFLOW_RUN_ID``;
    else a new run in the home experiment. Top-level runs are named by :func:`top_level_name`.
    """
    upstream = dict(upstream or {})
    active = mlflow.active_run()
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id, nested=active is not None)
    elif active is not None:
        run = mlflow.start_run(experiment_id=active.info.experiment_id, run_name=run_name, nested=True)
    elif os.environ.get("MLFLOW_RUN_ID"):
        # Consume it: runs started inside this one must not resume it again. `mlflow run` made it
        # before this process started, under a random name: give it the name a top-level run gets.
        run = mlflow.start_run(run_id=os.environ.pop("MLFLOW_RUN_ID"))
        if run_name:
            MlflowClient().update_run(run.info.run_id, name=top_level_name(run_name, dataset))
    else:
        exp_id = _experiment_id(home_experiment(dataset, experiment), create=True)
        run = mlflow.start_run(experiment_id=exp_id, run_name=run_name and top_level_name(run_name, dataset))
    try:
        mlflow.set_tags({TAG_STAGE: stage, TAG_DATASET: dataset, TAG_CODE: code_version(), **(tags or {})})
        _log_params(run.info.run_id, params)
        set_upstream(stage, params, upstream)
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def set_upstream(stage: str, params: Mapping[str, Any], upstream: Mapping[str, str]) -> None:
    """Tag the active run with the upstream run ids it consumed and the config hash they give.

    Stages resolve their inputs inside their run (so a missing input leaves a FAILED run) and call
    this once they know them."""
    mlflow.set_tags({
        TAG_HASH: config_hash(stage, params, upstream),
        **{TAG_UPSTREAM + k.removesuffix("_run"): v for k, v in upstream.items()},
    })


# -- finding runs --------------------------------------------------------------------------------


def _filter(conditions: Mapping[str, str]) -> str:
    return " and ".join(f"tags.\"{k}\" = '{v}'" for k, v in conditions.items())


def search_finished(
    stage: str, dataset: str, lineage: Mapping[str, str] | None = None, *, experiment: str | None = None,
    max_results: int = 1,
) -> list[Run]:
    """Newest-first FINISHED runs of ``stage`` for ``dataset`` whose tags match ``lineage``."""
    exp_ids = search_experiment_ids(dataset, experiment)
    if not exp_ids:
        return []
    conditions = {TAG_STAGE: stage, TAG_DATASET: dataset, **(lineage or {})}
    return MlflowClient().search_runs(
        exp_ids,
        filter_string=_filter(conditions) + " and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )


def _describe(lineage: Mapping[str, str] | None) -> str:
    if not lineage:
        return ""
    return " with " + ", ".join(f"{k.removeprefix('argse.')}={v}" for k, v in lineage.items())


def run_id_of(ref: str) -> str:
    """The run id a reference names: a run id, ``runs:/<id>/...`` or ``models:/<name>@<alias>``
    (or ``models:/<name>/<version>``)."""
    client = MlflowClient()
    if RUN_ID_RE.match(ref):
        return ref
    if ref.startswith("runs:/"):
        run_id = ref[len("runs:/"):].split("/", 1)[0]
        if not RUN_ID_RE.match(run_id):
            raise ArgseError(f"{ref!r} is not a runs:/<run id>/<path> URI")
        return run_id
    if ref.startswith("models:/"):
        body = ref[len("models:/"):].strip("/")
        try:
            if "@" in body:
                name, alias = body.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            elif "/" in body:
                name, number = body.rsplit("/", 1)
                version = client.get_model_version(name, number)
            else:
                raise ArgseError(f"{ref!r} names no version: use models:/<name>@<alias> or models:/<name>/<version>")
        except MlflowException as exc:
            raise ArgseError(f"{ref} does not resolve in the model registry: {_first_line(exc)}") from None
        if not version.run_id:
            raise ArgseError(f"{ref} has no source run; register a model logged by `argse fit`")
        return version.run_id
    raise ArgseError(
        f"{ref!r} is not a run reference: use latest, a run id, runs:/<id>/<path> or models:/<name>@<alias>"
    )


def resolve_upstream(
    stage: str,
    ref: str,
    *,
    dataset: str,
    lineage: Mapping[str, str] | None = None,
    experiment: str | None = None,
) -> Run:
    """The FINISHED run of ``stage`` that ``ref`` names (``latest`` | run id | ``runs:/`` |
    ``models:/``), checked against ``dataset`` and the ``lineage`` tags. Nothing found: an
    :class:`ArgseError` naming what is missing and the command that produces it."""
    producer = PRODUCER.get(stage, f"argse {stage}")
    if ref in (None, "", "latest"):
        runs = search_finished(stage, dataset, lineage, experiment=experiment)
        if not runs:
            where = ", ".join(_experiment_names(search_experiment_ids(dataset, experiment))) or home_experiment(dataset, experiment)
            raise ArgseError(
                f"no FINISHED {stage} run for {dataset}{_describe(lineage)} in experiment {where}: "
                f"run `{producer} --dataset {dataset}` first, or pass a run id"
            )
        return runs[0]
    run_id = run_id_of(ref)
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        raise ArgseError(f"run {run_id} (from {ref!r}) does not exist on {mlflow.get_tracking_uri()}") from None
    tags = run.data.tags
    if tags.get(TAG_STAGE) != stage:
        raise ArgseError(
            f"run {run_id} is a {tags.get(TAG_STAGE, 'non-argse')} run, not a {stage} run: pass a {stage} run (made by `{producer}`)"
        )
    if tags.get(TAG_DATASET) != dataset:
        raise ArgseError(
            f"run {run_id} was made for dataset {tags.get(TAG_DATASET)}, not {dataset}: pass --dataset {tags.get(TAG_DATASET)} or another run"
        )
    if run.info.status != "FINISHED":
        raise ArgseError(f"{stage} run {run_id} is {run.info.status}, not FINISHED: rerun `{producer}` or pass another run")
    for key, value in (lineage or {}).items():
        if tags.get(key) != value:
            raise ArgseError(
                f"{stage} run {run_id} has {key}={tags.get(key)}, expected {value}: pass a run made from the same inputs"
            )
    return run


def find_cached_run(
    stage: str, config_hash_value: str, code_version_value: str, *, dataset: str, experiment: str | None = None,
    lineage: Mapping[str, str] | None = None,
) -> Run | None:
    """The newest FINISHED run of ``stage`` with this config hash and code version, if any."""
    runs = search_finished(
        stage, dataset, {TAG_HASH: config_hash_value, TAG_CODE: code_version_value, **(lineage or {})},
        experiment=experiment,
    )
    return runs[0] if runs else None


def find_resumable_run(
    stage: str, config_hash_value: str, code_version_value: str, *, dataset: str, experiment: str | None = None,
    lineage: Mapping[str, str] | None = None,
) -> Run | None:
    """The newest run of ``stage`` with this config hash and code version that did not finish (killed,
    failed, or left RUNNING by a process that died): the pipeline resumes it instead of starting over."""
    exp_ids = search_experiment_ids(dataset, experiment)
    if not exp_ids:
        return None
    conditions = {TAG_STAGE: stage, TAG_DATASET: dataset, TAG_HASH: config_hash_value, TAG_CODE: code_version_value,
                  **(lineage or {})}
    runs = MlflowClient().search_runs(
        exp_ids, filter_string=_filter(conditions) + " and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _experiment_names(ids: list[str]) -> list[str]:
    client = MlflowClient()
    return [client.get_experiment(i).name for i in ids]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- artifacts and inputs ------------------------------------------------------------------------

_DOWNLOADS: dict[tuple[str, str], Path] = {}


def download(run_id: str, artifact_path: str) -> Path:
    """A local copy of a run's artifact (file or folder), downloaded once per process."""
    key = (run_id, artifact_path)
    if key not in _DOWNLOADS:
        dst = tempfile.mkdtemp(prefix="argse-")
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=dst)
        except (MlflowException, OSError) as exc:
            raise ArgseError(
                f"run {run_id} has no artifact {artifact_path!r} ({_first_line(exc)}); rerun the stage that makes it"
            ) from None
        _DOWNLOADS[key] = Path(local)
    return _DOWNLOADS[key]


def log_split_inputs(splits, contexts: tuple[str, ...]) -> None:
    """Record the splits a run consumed as MLflow dataset inputs (shown in the UI's Inputs)."""
    import mlflow.data

    for context in contexts:
        dataset = mlflow.data.from_numpy(
            features=splits.indices[context],
            targets=splits.labels[context],
            name=f"{splits.dataset}/{context}",
            digest=f"{splits.fingerprint[:12]}-{context}",
        )
        mlflow.log_input(dataset, context=context)
