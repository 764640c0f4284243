"""Liveness: which process works on a run, whether it still does, marking runs whose process is gone,
and taking an unfinished run over to resume it (see the package docstring)."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from argse.tracking.store import search_experiment_ids, tag_filter
from argse.tracking.tags import (
    CLAIM_PARAM,
    STALE_AFTER_S,
    TAG_DATASET,
    TAG_FAILURE,
    TAG_HEARTBEAT,
    TAG_OWNER,
    TAG_RESUMABLE,
    TAG_STAGE,
)

log = logging.getLogger(__name__)

# -- liveness ----------------------------------------------------------------------------------------


def _process_start(pid: int) -> str:
    """The start time of process ``pid`` (``/proc/<pid>/stat`` field 22), "" where there is no /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner() -> str:
    """This process, as ``host/pid/start``: the value of ``argse.owner`` on the runs it works on."""
    return f"{socket.gethostname()}/{os.getpid()}/{_process_start(os.getpid())}"


def _owner_dead(value: str) -> bool:
    """Whether the process ``value`` names is known to be gone: it ran on this host and is no longer
    there (or its pid now belongs to another process). On another host nobody can tell."""
    host, _, rest = value.partition("/")
    pid, _, start = rest.partition("/")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if start:
        return _process_start(int(pid)) != start
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _claims(run: Run) -> list[tuple[int, float, str]]:
    """The takeovers logged on ``run``: (n, time, owner), oldest first."""
    found = []
    for key, value in run.data.params.items():
        n = key[len(CLAIM_PARAM):]
        who, _, when = value.rpartition("@")
        if key.startswith(CLAIM_PARAM) and n.isdigit():
            found.append((int(n), float(when or 0), who))
    return sorted(found)


@dataclasses.dataclass(frozen=True)
class Liveness:
    """Whether a process works on a run, judged from its newest sign of life."""

    alive: bool
    owner: str
    age: float  # seconds since that sign

    def __str__(self) -> str:
        return f"{self.owner or 'unknown process'}, last sign of life {self.age:.0f} s ago"


def liveness(run: Run) -> Liveness:
    """A run is live when its newest sign of life (heartbeat while RUNNING, a heartbeat after it
    ended, a takeover) is younger than :data:`STALE_AFTER_S` and its process is not known dead."""
    tags, info = run.data.tags, run.info
    signs = [(when, who) for _, when, who in _claims(run)]
    beat = float(tags.get(TAG_HEARTBEAT) or 0)
    if info.status == "RUNNING":
        signs.append((beat or info.start_time / 1000, tags.get(TAG_OWNER, "")))
    elif beat and info.end_time and beat > info.end_time / 1000:
        signs.append((beat, tags.get(TAG_OWNER, "")))
    if not signs:
        return Liveness(False, tags.get(TAG_OWNER, ""), float("inf"))
    now = time.time()
    live = [(when, who) for when, who in signs if now - when < STALE_AFTER_S and not (who and _owner_dead(who))]
    when, who = max(live or signs)
    return Liveness(bool(live), who, max(0.0, now - when))


def _mark_failed(client: MlflowClient, run_id: str, reason: str) -> None:
    client.set_tag(run_id, TAG_FAILURE, reason[:1000])
    client.set_terminated(run_id, "FAILED")


def reap_stale_runs(dataset: str, experiment: str | None = None) -> list[str]:
    """Mark FAILED the RUNNING runs of ``dataset`` in the searched experiments whose process is gone
    (see :func:`liveness`): what a kill -9 or a lost connection left. Returns their ids."""
    exp_ids = search_experiment_ids(dataset, experiment)
    if not exp_ids:
        return []
    client = MlflowClient()
    reaped = []
    for run in client.search_runs(exp_ids, tag_filter({TAG_DATASET: dataset}) + " and attributes.status = 'RUNNING'",
                                  max_results=200):
        life = liveness(run)
        if life.alive or run.info.run_id == os.environ.get("MLFLOW_RUN_ID"):
            continue
        fresh = client.get_run(run.info.run_id)  # look again just before writing
        if fresh.info.status == "RUNNING" and not liveness(fresh).alive:
            _mark_failed(client, run.info.run_id, f"its process stopped ({life}); marked FAILED by {owner()}")
            log.info("marked run %s FAILED: its process stopped (%s)", run.info.run_id, life)
            reaped.append(run.info.run_id)
    return reaped


def claim(run_id: str) -> str | None:
    """Take over the unfinished run ``run_id`` so that this process alone resumes it. ``None`` when
    taken; else why not: it is live, it failed for good, or another process took it first. A stale
    RUNNING run is marked FAILED on the way."""
    client = MlflowClient()
    run = client.get_run(run_id)
    tags = run.data.tags
    if run.info.status == "FINISHED":
        return "it is FINISHED"
    if tags.get(TAG_RESUMABLE) == "false":
        return f"it failed for a reason a resume cannot fix ({tags.get(TAG_FAILURE, 'no reason recorded')})"
    claims = _claims(run)
    if claims and claims[-1][2] == owner():
        return None  # this process took it over already (the pipeline, before it called the stage)
    life = liveness(run)
    if life.alive:
        return f"it is live ({life})"
    n = max((c[0] for c in claims), default=0) + 1
    try:
        client.log_param(run_id, f"{CLAIM_PARAM}{n}", f"{owner()}@{time.time():.3f}")
    except MlflowException as exc:
        if exc.error_code == "INVALID_PARAMETER_VALUE":  # the store kept another process's takeover
            return "another process took it over first"
        raise
    if run.info.status == "RUNNING":
        _mark_failed(client, run_id, f"its process stopped ({life}); taken over by {owner()}")
    return None


def running_runs(dataset: str | None = None, experiment: str | None = None) -> list:
    """The RUNNING argse runs (of ``dataset``, or of every dataset), newest first, in the experiments
    ``latest`` searches (every experiment when no dataset is given)."""
    client = MlflowClient()
    if dataset:
        exp_ids = search_experiment_ids(dataset, experiment)
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    condition = tag_filter({TAG_DATASET: dataset}) if dataset else f"tags.\"{TAG_STAGE}\" != ''"
    return client.search_runs(exp_ids, condition + " and attributes.status = 'RUNNING'",
                              order_by=["attributes.start_time DESC"], max_results=500)


def mark_if_dead(run) -> bool:
    """Mark ``run`` FAILED when its process is gone (:func:`liveness`, looked at again just before
    writing); whether it did."""
    client = MlflowClient()
    life = liveness(run)
    if life.alive:
        return False
    fresh = client.get_run(run.info.run_id)
    if fresh.info.status != "RUNNING" or liveness(fresh).alive:
        return False
    _mark_failed(client, run.info.run_id, f"its process stopped ({life}); marked FAILED by {owner()}")
    return True
