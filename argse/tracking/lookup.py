"""Finding runs: ``latest`` and the other run references, the cache, unfinished runs to resume, and
artifacts."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Mapping

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from argse import ArgseError, first_line, stage_registry
from argse.tracking import integrity
from argse.tracking.owners import claim
from argse.tracking.store import experiment_names, home_experiment, search_experiment_ids, tag_filter
from argse.tracking.tags import RUN_ID_RE, TAG_CODE, TAG_DATASET, TAG_HASH, TAG_STAGE

# -- finding runs --------------------------------------------------------------------------------


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
        filter_string=tag_filter(conditions) + " and attributes.status = 'FINISHED'",
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
            raise ArgseError(f"{ref} does not resolve in the model registry: {first_line(exc)}") from None
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
    unfinished: bool = False,
) -> Run:
    """The FINISHED run of ``stage`` that ``ref`` names (``latest`` | run id | ``runs:/`` |
    ``models:/``), checked against ``dataset`` and the ``lineage`` tags; with ``unfinished``, a run
    named by id may also be one that did not finish (``--resume``). Nothing found: an
    :class:`ArgseError` naming what is missing and the command that produces it."""
    producer = stage_registry.stage(stage).producer(lineage)
    if ref in (None, "", "latest"):
        runs = search_finished(stage, dataset, lineage, experiment=experiment)
        if not runs:
            where = ", ".join(experiment_names(search_experiment_ids(dataset, experiment))) or home_experiment(dataset, experiment)
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
    if run.info.status != "FINISHED" and not unfinished:
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
) -> tuple[Run | None, str | None]:
    """The newest run of ``stage`` with this config hash and code version that did not finish (killed,
    failed, or left RUNNING by a process that died) and that this process has taken over
    (:func:`claim`), for the pipeline to resume; and, when it passed one over, a phrase that says which
    and why (live in another process, failed for good, taken by another process)."""
    exp_ids = search_experiment_ids(dataset, experiment)
    if not exp_ids:
        return None, None
    conditions = {TAG_STAGE: stage, TAG_DATASET: dataset, TAG_HASH: config_hash_value, TAG_CODE: code_version_value,
                  **(lineage or {})}
    client = MlflowClient()
    runs = client.search_runs(
        exp_ids, filter_string=tag_filter(conditions) + " and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=5)
    passed_over = None
    for run in runs:
        why = claim(run.info.run_id)
        if why is None:
            return client.get_run(run.info.run_id), passed_over
        passed_over = passed_over or f"run {run.info.run_id} {why}"
    return None, passed_over



# -- artifacts and inputs ------------------------------------------------------------------------

_DOWNLOADS: dict[tuple[str, str], Path] = {}
_DOWNLOAD_DIR: tempfile.TemporaryDirectory | None = None  # removed when the process exits


def download(run_id: str, artifact_path: str, *, check: bool = True) -> Path:
    """A local copy of a run's artifact (file or folder), downloaded once per process into a folder
    that is removed when the process exits, and checked against the digests the run recorded
    (:mod:`argse.tracking.integrity`) unless ``check`` is false. ``model`` (and its files) is the run's
    logged model."""
    global _DOWNLOAD_DIR
    key = (run_id, artifact_path)
    if key not in _DOWNLOADS:
        if _DOWNLOAD_DIR is None:
            _DOWNLOAD_DIR = tempfile.TemporaryDirectory(prefix="argse-downloads-")
        dst = tempfile.mkdtemp(dir=_DOWNLOAD_DIR.name)
        try:
            if artifact_path == "model" or artifact_path.startswith("model/"):
                local = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/{artifact_path}", dst_path=dst)
            else:
                local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=dst)
        except (MlflowException, OSError) as exc:
            raise ArgseError(
                f"run {run_id} has no artifact {artifact_path!r} ({first_line(exc)}); rerun the stage that makes it"
            ) from None
        _DOWNLOADS[key] = Path(local)
    if check:
        integrity.verify(run_id, _DOWNLOADS[key], artifact_path)
    return _DOWNLOADS[key]


def verify_run(run_id: str) -> list[str]:
    """Download every artifact ``run_id`` recorded a digest for and check it; the paths checked. The
    model files (``model/...``) are read through the run's logged model."""
    paths = sorted(integrity.recorded(run_id))
    if not paths:
        raise ArgseError(f"run {run_id} recorded no artifact digests (it was logged before they existed, or it "
                         "is not an argse stage run): nothing to verify")
    tops = sorted({"model" if p.startswith("model/") else p for p in paths})
    for top in tops:  # the model's files at once, through the run's logged model; the others one by one
        integrity.verify(run_id, download(run_id, top, check=False), top)
    return paths


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
        for attempt in range(3):
            try:
                mlflow.log_input(dataset, context=context)
                break
            except MlflowException as exc:
                # The store creates a dataset on first use; two runs logging the same one at once
                # race on its unique key (PostgreSQL: UniqueViolation). The loser finds it next time.
                if attempt == 2 or not re.search(r"UniqueViolation|duplicate key|UNIQUE constraint", str(exc)):
                    raise
                time.sleep(0.2 * (attempt + 1))

