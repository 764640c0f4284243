"""Stage runs: start (or resume) a stage's run, tag it, log its params, end it FINISHED or FAILED."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from argse import stage_registry
from argse.tracking import integrity
from argse.tracking.heartbeat import HEARTBEAT, arm_interrupt
from argse.tracking.owners import owner, reap_stale_runs
from argse.tracking.server import TrackingServerError, end_quickly, record_failure, server_problem
from argse.tracking.store import code_version, config_hash, experiment_id, home_experiment
from argse.stage_registry import TAG_UPSTREAM
from argse.tracking.tags import TAG_CODE, TAG_DATASET, TAG_HASH, TAG_HEARTBEAT, TAG_LAUNCHED, TAG_OWNER, TAG_STAGE

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
    system_metrics: bool = False,
) -> Iterator[Run]:
    """Start (or resume) the MLflow run of a stage; tag it, log its params; end it FINISHED, or
    FAILED when the body raises (KILLED on Ctrl-C), so ``latest`` never resolves to a broken run.
    Just before it ends FINISHED the run seals the digests of the files it logged
    (:func:`argse.tracking.integrity.seal`).
    While it is open the heartbeat thread stamps it; a stage that starts at the top first marks the
    runs dead processes left RUNNING (:func:`reap_stale_runs`). When the error is the tracking server's
    (see :func:`server_problem`), the run gets one short try to end and the error becomes a
    :class:`TrackingServerError` with that one line. A :class:`RunBroken` error also tags the run
    ``argse.resumable=false``, so it is replaced rather than resumed. ``system_metrics``: MLflow samples
    the machine's CPU, memory (and GPU, with pynvml) into the run's ``system/`` metrics while it is open.

    Which run: ``resume_run_id`` if given; a child of the active run when there is one (pipeline,
    ``--expert all``), named ``run_name``; the run ``mlflow run`` handed over in ``MLFLOW_RUN_ID`` when
    it lives in the home experiment; else a new run in the home experiment (a run ``mlflow run`` made
    elsewhere, in MLflow's Default experiment when no experiment was named, is then left as a
    launcher that names this run). Top-level runs are named by :func:`top_level_name`.
    """
    stage_registry.stage(stage)  # a name no stage has fails here, before any run starts
    upstream = dict(upstream or {})
    active = mlflow.active_run()
    if active is None:
        HEARTBEAT.reset()
        reap_stale_runs(dataset, experiment)
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id, nested=active is not None, log_system_metrics=system_metrics)
    elif active is not None:
        run = mlflow.start_run(experiment_id=active.info.experiment_id, run_name=run_name, nested=True,
                               log_system_metrics=system_metrics)
    else:
        # Consume MLflow's run: runs started inside this one must not resume it again.
        launched = os.environ.pop("MLFLOW_RUN_ID", None)
        exp_id = experiment_id(home_experiment(dataset, experiment), create=True)
        client = MlflowClient()
        if launched and client.get_run(launched).info.experiment_id == exp_id:
            # `mlflow run` made it before this process started, under a random name: give it the
            # name a top-level run gets.
            run = mlflow.start_run(run_id=launched, log_system_metrics=system_metrics)
            if run_name:
                client.update_run(run.info.run_id, name=top_level_name(run_name, dataset))
        else:
            run = mlflow.start_run(experiment_id=exp_id, run_name=run_name and top_level_name(run_name, dataset),
                                   log_system_metrics=system_metrics)
            if launched:  # one experiment per dataset: `mlflow run`'s own run only points here
                point_launcher(launched, run, f"{top_level_name(run_name or stage, dataset)} in")
    previous_handler = arm_interrupt() if active is None else None
    HEARTBEAT.add(run.info.run_id)
    try:
        mlflow.set_tags({TAG_STAGE: stage, TAG_DATASET: dataset, TAG_CODE: code_version(),
                         TAG_OWNER: owner(), TAG_HEARTBEAT: f"{time.time():.0f}", **(tags or {})})
        _log_params(run.info.run_id, params)
        set_upstream(stage, params, upstream)
        yield run
        integrity.seal(run.info.run_id)  # its digests, one per file, write-once: the last thing before FINISHED
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        problem = server_problem(exc) or record_failure(exc)
        if problem is not None:
            end_quickly("FAILED")
            raise TrackingServerError(problem) from exc
        mlflow.end_run("FAILED")
        raise
    else:
        try:
            mlflow.end_run("FINISHED")
        except Exception as exc:  # the run stays RUNNING; its heartbeat stops, it is marked when found
            problem = server_problem(exc)
            if problem is None:
                raise
            raise TrackingServerError(problem) from exc
    finally:
        HEARTBEAT.remove(run.info.run_id)
        if previous_handler is not None:
            signal.signal(signal.SIGUSR1, previous_handler)


def point_launcher(launched: str, run: Run, what: str) -> None:
    """Leave the run ``mlflow run`` made (``launched``) as a launcher: named ``mlflow run: <what>
    <experiment>`` and tagged with the run that holds the work (``argse.launched``)."""
    client = MlflowClient()
    where = client.get_experiment(run.info.experiment_id).name
    client.update_run(launched, name=f"mlflow run: {what} {where}")
    client.set_tag(launched, TAG_LAUNCHED, f"{where}/{run.info.run_id}")


def set_upstream(stage: str, params: Mapping[str, Any], upstream: Mapping[str, str]) -> None:
    """Tag the active run with the upstream run ids it consumed and the config hash they give.

    Stages resolve their inputs inside their run (so a missing input leaves a FAILED run) and call
    this once they know them."""
    mlflow.set_tags({
        TAG_HASH: config_hash(stage, params, upstream),
        **{TAG_UPSTREAM + k.removesuffix("_run"): v for k, v in upstream.items()},
    })

