"""The tracking contract (DESIGN.md §6): stage runs, tags, upstream resolution, cache look-up.

Where runs live. A stage's *home* experiment is the one the user names (``--experiment``,
``MLFLOW_EXPERIMENT_NAME``, or ``mlflow run --experiment-name/--experiment-id``); when none is named
it is ``ar-gse/<dataset>``. ``mlflow run`` without an experiment puts its run in MLflow's Default
experiment, which we cannot move, so the rule that makes both paths meet is: **when no experiment is
named, ``latest`` and the cache search the home experiment and the Default experiment together**;
when one is named, they search that experiment only.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from argse import ArgseError, __version__, stage_registry
from argse.stage_registry import TAG_EXPERT, TAG_UPSTREAM  # noqa: F401  (the tracking layer's names for them)

log = logging.getLogger(__name__)

TAG_STAGE = "argse.stage"
TAG_DATASET = "argse.dataset"
TAG_CODE = "argse.code_version"
TAG_HASH = "argse.config_hash"
TAG_OWNER = "argse.owner"  # host/pid/start time of the process working on the run
TAG_HEARTBEAT = "argse.heartbeat"  # unix time of that process's last sign of life
TAG_FAILURE = "argse.failure"  # why the run ended FAILED, one line
TAG_RESUMABLE = "argse.resumable"  # "false": it failed for a reason a resume cannot fix
CLAIM_PARAM = "argse.resume."  # + n: the n-th process that took the unfinished run over, "<owner>@<time>"
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0  # no heartbeat for this long: the process working on the run is gone
SERVER_LOST_AFTER_S = 15.0  # no heartbeat got through for this long: the stage stops
HTTP_TIMEOUT_S = 10  # MLflow's per-request timeout (one retry), unless MLFLOW_HTTP_REQUEST_TIMEOUT says otherwise
FAILPOINT_ENV = "ARGSE_FAILPOINT"
DEFAULT_EXPERIMENT_ID = "0"
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")


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
    While it is open the heartbeat thread stamps it; a stage that starts at the top first marks the
    runs dead processes left RUNNING (:func:`reap_stale_runs`). When the error is the tracking server's
    (see :func:`server_problem`), the run gets one short try to end and the error becomes a
    :class:`TrackingServerError` with that one line. A :class:`RunBroken` error also tags the run
    ``argse.resumable=false``, so it is replaced rather than resumed.

    Which run: ``resume_run_id`` if given; a child of the active run when there is one (pipeline,
    ``--expert all``), named ``run_name``; the run ``mlflow run`` handed over in ``MLFLOW_RUN_ID``;
    else a new run in the home experiment. Top-level runs are named by :func:`top_level_name`.
    """
    stage_registry.stage(stage)  # a name no stage has fails here, before any run starts
    upstream = dict(upstream or {})
    active = mlflow.active_run()
    if active is None:
        HEARTBEAT.reset()
        reap_stale_runs(dataset, experiment)
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
    previous_handler = _arm_interrupt() if active is None else None
    HEARTBEAT.add(run.info.run_id)
    try:
        mlflow.set_tags({TAG_STAGE: stage, TAG_DATASET: dataset, TAG_CODE: code_version(),
                         TAG_OWNER: owner(), TAG_HEARTBEAT: f"{time.time():.0f}", **(tags or {})})
        _log_params(run.info.run_id, params)
        set_upstream(stage, params, upstream)
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        problem = server_problem(exc) or _record_failure(exc)
        if problem is not None:
            _end_quickly("FAILED")
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


def set_upstream(stage: str, params: Mapping[str, Any], upstream: Mapping[str, str]) -> None:
    """Tag the active run with the upstream run ids it consumed and the config hash they give.

    Stages resolve their inputs inside their run (so a missing input leaves a FAILED run) and call
    this once they know them."""
    mlflow.set_tags({
        TAG_HASH: config_hash(stage, params, upstream),
        **{TAG_UPSTREAM + k.removesuffix("_run"): v for k, v in upstream.items()},
    })


# -- the tracking server: fail fast, one line ------------------------------------------------------


class TrackingServerError(ArgseError):
    """The tracking server cannot be used: unreachable, not answering, its database down, or the
    credentials refused. The message is the one line :func:`server_problem` wrote."""


class RunBroken(ArgseError):
    """The run failed for a reason a resume cannot fix (a corrupt checkpoint): it is tagged
    ``argse.resumable=false`` and the pipeline replaces it with a fresh run."""


def redact(uri: str) -> str:
    """``uri`` without the password it may carry (``postgresql://user:secret@host`` -> ``user:***@``)."""
    return re.sub(r"(//[^/:@]+):[^/@]*@", r"\1:***@", uri)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def server_problem(exc: BaseException, uri: str | None = None) -> str | None:
    """One line for an error that is the tracking server's rather than the stage's, ``None`` for any
    other error: the server is unreachable or stopped answering; it answers but its database does not
    (HTTP 503), or it fails with other 5xx errors; it refused the credentials (401) or the user (403)."""
    if HEARTBEAT.lost:
        return HEARTBEAT.lost
    errors = list(_chain(exc))
    for error in errors:
        if isinstance(error, TrackingServerError):
            return str(error)
    uri = redact(uri or mlflow.get_tracking_uri())
    text = " | ".join(str(e) for e in errors)
    names = {type(e).__name__ for e in errors}
    codes = {getattr(e, "error_code", None) for e in errors}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if "PERMISSION_DENIED" in codes or re.search(r"error code 403\b", text):
        return (f"the MLflow tracking server at {uri} refused user {user!r} (HTTP 403, permission denied): "
                "ask its admin for EDIT on this experiment and registered model")
    if "UNAUTHENTICATED" in codes or re.search(r"error code 401\b", text):
        if not user:
            return (f"the MLflow tracking server at {uri} refused a request without credentials (HTTP 401): "
                    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        return (f"the MLflow tracking server at {uri} refused the credentials of user {user!r} (HTTP 401): "
                "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    status = re.search(r"too many (50[0234]) error responses|error code (50[0234]) != 200", text)
    if status:
        code = status.group(1) or status.group(2)
        if code == "503":
            return (f"the MLflow tracking server at {uri} answers, but its database does not (HTTP 503): "
                    "check the server's backend store (is PostgreSQL up?) and its log")
        return (f"the MLflow tracking server at {uri} answers with errors (HTTP {code}): check its log and its "
                "backend store (is PostgreSQL up?)")
    if not uri.startswith(("http://", "https://")):
        if "OperationalError" in names and re.search(r"connect|connection", text, re.IGNORECASE):
            return f"cannot reach the tracking database at {uri}: start it or point --tracking-uri elsewhere"
        return None
    if names & {"ReadTimeout", "ReadTimeoutError", "Timeout"} or "timed out" in text:
        return (f"the MLflow tracking server at {uri} stopped answering (its requests time out): check that "
                "it is not frozen or overloaded")
    if (names & {"ConnectionError", "MaxRetryError", "NewConnectionError", "ConnectTimeout", "ConnectTimeoutError"}
            or "Max retries exceeded" in text or "Failed to establish" in text):
        return (f"cannot reach the MLflow tracking server at {uri}: start it or point --tracking-uri / "
                "MLFLOW_TRACKING_URI elsewhere")
    return None


def _record_failure(exc: BaseException) -> str | None:
    """Tag the active run with why it failed (and, for :class:`RunBroken`, that no resume can fix it).
    Returns the server's problem when that is why the tags could not be written."""
    tags = {TAG_FAILURE: _first_line(exc)[:1000] or type(exc).__name__}
    if isinstance(exc, RunBroken):
        tags[TAG_RESUMABLE] = "false"
    try:
        mlflow.set_tags(tags)
    except Exception as err:
        log.debug("could not tag the failed run: %s", _first_line(err))
        return server_problem(err)
    return None


_QUICK = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def _quick_requests() -> dict[str, str | None]:
    """Make every MLflow request of this process try once, for 1 s (the server is in trouble and the
    stage on its way out: ending its runs, MLflow's exit hook); returns the settings to restore."""
    saved = {key: os.environ.get(key) for key in _QUICK}
    os.environ.update(_QUICK)
    return saved


def _restore(saved: Mapping[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _end_quickly(status: str) -> None:
    """End the active run with one short try: the server is in trouble, and a run left RUNNING here
    is marked when next found, because its heartbeat stops."""
    saved = _quick_requests()
    try:
        mlflow.end_run(status)  # pops the run first, so it is no longer active even when this fails
    except Exception as exc:
        log.debug("could not end the run: %s", _first_line(exc))
    finally:
        _restore(saved)


def failpoint(name: str) -> None:
    """Test hook: kill this process (SIGKILL) here when ``ARGSE_FAILPOINT`` names this point, so the
    tests can stop a stage at an exact boundary (``pipeline:<step>``, ``argse:registered``, ...)."""
    if os.environ.get(FAILPOINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


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
    for run in client.search_runs(exp_ids, _filter({TAG_DATASET: dataset}) + " and attributes.status = 'RUNNING'",
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


def _interrupt_main() -> None:
    if _INTERRUPT_ARMED.is_set():
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)


def _on_server_lost(signum, frame) -> None:
    if HEARTBEAT.lost:
        raise TrackingServerError(HEARTBEAT.lost)


_INTERRUPT_ARMED = threading.Event()


def _arm_interrupt():
    """Let the heartbeat thread interrupt the main thread (SIGUSR1) when the server is lost; returns
    the previous handler, or ``None`` where signals cannot be handled (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGUSR1, _on_server_lost)
    _INTERRUPT_ARMED.set()
    return previous if previous is not None else signal.SIG_DFL


class _Heartbeat:
    """One daemon thread per process: every :data:`HEARTBEAT_S` seconds it stamps ``argse.heartbeat``
    on each run this process has open. When none got through to an HTTP server for
    :data:`SERVER_LOST_AFTER_S` seconds, it records why (:attr:`lost`) and interrupts the main thread,
    whose stage then stops with that one line, even in the middle of a long epoch."""

    def __init__(self):
        self._runs: dict[str, str] = {}  # run id -> tracking URI
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        self._saved_env: dict[str, str | None] | None = None

    def reset(self) -> None:
        """Forget a lost server (a new stage starts with no run open)."""
        with self._lock:
            if not self._runs:
                self.lost = None
                if self._saved_env is not None:
                    _restore(self._saved_env)
                    self._saved_env = None

    def add(self, run_id: str) -> None:
        with self._lock:
            self._runs[run_id] = mlflow.get_tracking_uri()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="argse-heartbeat", daemon=True)
                self._thread.start()

    def remove(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)
            if not self._runs:
                _INTERRUPT_ARMED.clear()

    def _loop(self) -> None:
        last_ok, delay = time.monotonic(), HEARTBEAT_S
        while True:
            time.sleep(delay)
            with self._lock:
                runs = dict(self._runs)
            try:
                for run_id, uri in runs.items():
                    _beat(uri, run_id)
            except Exception as exc:  # the thread must outlive any error; the main thread reports it
                log.debug("heartbeat of run %s failed: %s", run_id, _first_line(exc))
                if (uri.startswith(("http://", "https://")) and self.lost is None
                        and time.monotonic() - last_ok >= SERVER_LOST_AFTER_S):
                    line = server_problem(exc, uri) or f"the MLflow tracking server at {redact(uri)} stopped answering"
                    self.lost = f"{line} (no heartbeat got through for {time.monotonic() - last_ok:.0f} s)"
                    self._saved_env = _quick_requests()
                    _interrupt_main()
                delay = 1.0
            else:
                last_ok, delay = time.monotonic(), HEARTBEAT_S


def _beat(uri: str, run_id: str) -> None:
    """Stamp the heartbeat: over HTTP one request with a short timeout and no retry (the next beat is
    the retry), else through the store."""
    now = f"{time.time():.0f}"
    if not uri.startswith(("http://", "https://")):
        MlflowClient(uri).set_tag(run_id, TAG_HEARTBEAT, now)
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    endpoint = "/api/2.0/mlflow/runs/set-tag"
    response = http_request(get_default_host_creds(uri), endpoint, "POST", max_retries=0, backoff_factor=0,
                            backoff_jitter=0, timeout=HEARTBEAT_S,
                            json={"run_id": run_id, "key": TAG_HEARTBEAT, "value": now})
    verify_rest_response(response, endpoint)


HEARTBEAT = _Heartbeat()


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
    producer = stage_registry.stage(stage).producer(lineage)
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
        exp_ids, filter_string=_filter(conditions) + " and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=5)
    passed_over = None
    for run in runs:
        why = claim(run.info.run_id)
        if why is None:
            return client.get_run(run.info.run_id), passed_over
        passed_over = passed_over or f"run {run.info.run_id} {why}"
    return None, passed_over


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
