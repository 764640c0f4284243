"""The tracking server, when it is the problem: its errors in one line, what this process learned of
it (:data:`SERVER`: lost, and why, once the heartbeat found so), and ending a run quickly."""

from __future__ import annotations

import logging
import os
import re
from typing import Iterator, Mapping

import mlflow

from argse import ArgseError, first_line
from argse.tracking.tags import TAG_FAILURE, TAG_RESUMABLE

log = logging.getLogger(__name__)

# -- the tracking server: fail fast, one line ------------------------------------------------------


class TrackingServerError(ArgseError):
    """The tracking server cannot be used: unreachable, not answering, its database down, or the
    credentials refused. The message is the one line :func:`server_problem` wrote."""


class RunBroken(ArgseError):
    """The run failed for a reason a resume cannot fix (a corrupt checkpoint): it is tagged
    ``argse.resumable=false`` and the pipeline replaces it with a fresh run."""


class ServerState:
    """What this process learned of its tracking server beyond one request: that no heartbeat got
    through for a while (:mod:`argse.tracking.heartbeat` finds it), and the line that says so. Every
    error reported after that is reported as that line."""

    def __init__(self) -> None:
        self.lost: str | None = None


SERVER = ServerState()


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
    if SERVER.lost:
        return SERVER.lost
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


def record_failure(exc: BaseException) -> str | None:
    """Tag the active run with why it failed (and, for :class:`RunBroken`, that no resume can fix it).
    Returns the server's problem when that is why the tags could not be written."""
    tags = {TAG_FAILURE: first_line(exc)[:1000] or type(exc).__name__}
    if isinstance(exc, RunBroken):
        tags[TAG_RESUMABLE] = "false"
    try:
        mlflow.set_tags(tags)
    except Exception as err:
        log.debug("could not tag the failed run: %s", first_line(err))
        return server_problem(err)
    return None


_QUICK = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def quick_requests() -> dict[str, str | None]:
    """Make every MLflow request of this process try once, for 1 s (the server is in trouble and the
    stage on its way out: ending its runs, MLflow's exit hook); returns the settings to restore."""
    saved = {key: os.environ.get(key) for key in _QUICK}
    os.environ.update(_QUICK)
    return saved


def restore_requests(saved: Mapping[str, str | None]) -> None:
    """Undo :func:`quick_requests` with the settings it returned."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def end_quickly(status: str) -> None:
    """End the active run with one short try: the server is in trouble, and a run left RUNNING here
    is marked when next found, because its heartbeat stops."""
    saved = quick_requests()
    try:
        mlflow.end_run(status)  # pops the run first, so it is no longer active even when this fails
    except Exception as exc:
        log.debug("could not end the run: %s", first_line(exc))
    finally:
        restore_requests(saved)

