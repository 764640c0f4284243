"""The heartbeat: one thread per process that stamps its open runs, and stops a stage whose tracking
server stopped answering."""

from __future__ import annotations

import logging
import signal
import threading
import time

import mlflow
from mlflow.tracking import MlflowClient

from argse import first_line
from argse.tracking import tags
from argse.tracking.mlflow_internals import post_set_tag
from argse.tracking.server import SERVER, TrackingServerError, quick_requests, redact, restore_requests, server_problem
from argse.tracking.tags import SERVER_LOST_AFTER_S, TAG_HEARTBEAT

log = logging.getLogger(__name__)

_INTERRUPT_ARMED = threading.Event()


def arm_interrupt():
    """Let the heartbeat thread interrupt the main thread (SIGUSR1) when the server is lost; returns
    the previous handler, or ``None`` where signals cannot be handled (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGUSR1, _on_server_lost)
    _INTERRUPT_ARMED.set()
    return previous if previous is not None else signal.SIG_DFL


def _interrupt_main() -> None:
    if _INTERRUPT_ARMED.is_set():
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)


def _on_server_lost(signum, frame) -> None:
    """In the main thread: from now on every MLflow request of this process tries once, for 1 s (the
    stage is on its way out: ending its runs, MLflow's exit hook); then the stage stops with the line."""
    if SERVER.lost:
        HEARTBEAT.hurry()
        raise TrackingServerError(SERVER.lost)


class _Heartbeat:
    """One daemon thread per process: every :data:`HEARTBEAT_S` seconds it stamps ``argse.heartbeat``
    on each run this process has open. When none got through to an HTTP server for
    :data:`SERVER_LOST_AFTER_S` seconds, it records why (:data:`argse.tracking.server.SERVER`) and
    interrupts the main thread, whose stage then stops with that one line, even in the middle of a long
    epoch. The thread only records and signals; the main thread changes the process's settings."""

    def __init__(self):
        self._runs: dict[str, str] = {}  # run id -> tracking URI
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._saved_env: dict[str, str | None] | None = None

    def reset(self) -> None:
        """Forget a lost server (a new stage starts with no run open)."""
        with self._lock:
            if not self._runs:
                SERVER.lost = None
                if self._saved_env is not None:
                    restore_requests(self._saved_env)
                    self._saved_env = None

    def hurry(self) -> None:
        """Make every request of this process quick until :meth:`reset` (see :func:`quick_requests`)."""
        if self._saved_env is None:
            self._saved_env = quick_requests()

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
        last_ok, delay = time.monotonic(), tags.HEARTBEAT_S
        while True:
            time.sleep(delay)
            with self._lock:
                runs = dict(self._runs)
            try:
                for run_id, uri in runs.items():
                    _beat(uri, run_id)
            except Exception as exc:  # the thread must outlive any error; the main thread reports it
                log.debug("heartbeat of run %s failed: %s", run_id, first_line(exc))
                if (uri.startswith(("http://", "https://")) and SERVER.lost is None
                        and time.monotonic() - last_ok >= SERVER_LOST_AFTER_S):
                    line = server_problem(exc, uri) or f"the MLflow tracking server at {redact(uri)} stopped answering"
                    SERVER.lost = f"{line} (no heartbeat got through for {time.monotonic() - last_ok:.0f} s)"
                    _interrupt_main()
                delay = 1.0
            else:
                last_ok, delay = time.monotonic(), tags.HEARTBEAT_S


def _beat(uri: str, run_id: str) -> None:
    """Stamp the heartbeat: over HTTP one request with a short timeout and no retry (the next beat is
    the retry), else through the store."""
    now = f"{time.time():.0f}"
    if not uri.startswith(("http://", "https://")):
        MlflowClient(uri).set_tag(run_id, TAG_HEARTBEAT, now)
        return
    post_set_tag(uri, run_id, TAG_HEARTBEAT, now, timeout=tags.HEARTBEAT_S)


HEARTBEAT = _Heartbeat()
