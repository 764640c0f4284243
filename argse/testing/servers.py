"""Two helpers for a test or a bench that starts a server on 127.0.0.1: a free port to give it, and the
wait until it answers."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, *, timeout: float = 120, log: Path | None = None) -> None:
    """Wait until ``url`` answers (a server's /health or /ping); a RuntimeError with the end of its
    stderr (or of ``log``) when ``process`` exits first or ``timeout`` seconds pass."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                if log is not None:
                    said = log.read_text()
                else:
                    said = process.stderr.read().decode(errors="replace") if process.stderr and process.poll() is not None else ""
                raise RuntimeError(f"{url} did not answer: {said[-3000:]}") from None
            time.sleep(0.5)
