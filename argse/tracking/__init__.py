"""The tracking contract (docs/design.md): stage runs, tags, upstream resolution, cache look-up.

Where runs live. A stage's *home* experiment is the one the user names (``--experiment``,
``MLFLOW_EXPERIMENT_NAME``, or ``mlflow run --experiment-name/--experiment-id``); when none is named
it is ``ar-gse/<dataset>``, however the stage is started. ``mlflow run`` without an experiment makes
its own run in MLflow's Default experiment before the stage starts; the stage then works in the home
experiment and leaves that run as a *launcher* that names it (tag ``argse.launched``). When no
experiment is named, ``latest`` and the cache also search Default, where earlier versions put the
stage runs of ``mlflow run``; when one is named, they search that experiment only.

Liveness. Every run a process works on carries ``argse.owner`` (host/pid/start of that process) and
``argse.heartbeat`` (unix time), stamped every :data:`HEARTBEAT_S` seconds by a background thread. A
RUNNING run whose owner is dead (on this host) or whose heartbeat is older than :data:`STALE_AFTER_S`
was left by a process that is gone: it is marked FAILED when a stage next looks (:func:`reap_stale_runs`),
and the pipeline may resume it. Resuming takes the run over first (:func:`claim`): MLflow params are
write-once, so of two processes that try at once the store accepts one. A live run is never resumed;
a run that failed for a reason a resume cannot fix (``argse.resumable=false``, e.g. a corrupt
checkpoint) is replaced by a fresh one.

The server. MLflow retries a failing request for minutes by default; :func:`configure` lowers that so
a stage stops within 30 s of the server going away, and the heartbeat thread interrupts a stage that
is busy computing when the server stops answering for :data:`SERVER_LOST_AFTER_S` seconds.
:func:`server_problem` turns what the server did (no answer, HTTP 503 from its database, 401/403 for
the credentials in ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``) into one line.

Files, one concern each: ``tags`` (the names it writes), ``store`` (URI, experiments, code version and
config hash), ``runs`` (stage runs), ``server`` (the server's errors in one line), ``owners``
(liveness: owners, reaping, takeovers), ``heartbeat`` (the thread that stamps runs), ``lookup`` (run references,
the cache, artifacts) and ``mlflow_internals`` (the one use of MLflow's private API).
"""

from argse.tracking.heartbeat import HEARTBEAT
from argse.tracking.owners import Liveness, claim, liveness, owner, reap_stale_runs
from argse.tracking.lookup import (
    download,
    find_cached_run,
    find_resumable_run,
    log_split_inputs,
    resolve_upstream,
    run_id_of,
    search_finished,
)
from argse.tracking.runs import point_launcher, set_upstream, stage_run, top_level_name
from argse.tracking.server import RunBroken, TrackingServerError, redact, server_problem
from argse.tracking.store import (
    absolute_uri,
    code_version,
    config_hash,
    configure,
    home_experiment,
    named_experiment,
    runs_page,
    search_experiment_ids,
)
from argse.tracking.tags import (
    CLAIM_PARAM,
    HEARTBEAT_S,
    STALE_AFTER_S,
    TAG_CODE,
    TAG_DATASET,
    TAG_FAILURE,
    TAG_HASH,
    TAG_HEARTBEAT,
    TAG_OWNER,
    TAG_RESUMABLE,
    TAG_STAGE,
)

__all__ = [
    "absolute_uri",
    "CLAIM_PARAM",
    "HEARTBEAT",
    "HEARTBEAT_S",
    "Liveness",
    "RunBroken",
    "STALE_AFTER_S",
    "TAG_CODE",
    "TAG_DATASET",
    "TAG_FAILURE",
    "TAG_HASH",
    "TAG_HEARTBEAT",
    "TAG_OWNER",
    "TAG_RESUMABLE",
    "TAG_STAGE",
    "TrackingServerError",
    "claim",
    "code_version",
    "config_hash",
    "configure",
    "download",
    "find_cached_run",
    "find_resumable_run",
    "home_experiment",
    "liveness",
    "log_split_inputs",
    "named_experiment",
    "owner",
    "point_launcher",
    "reap_stale_runs",
    "redact",
    "resolve_upstream",
    "run_id_of",
    "runs_page",
    "search_experiment_ids",
    "search_finished",
    "server_problem",
    "set_upstream",
    "stage_run",
    "top_level_name",
]
