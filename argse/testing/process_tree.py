"""A process and all its descendants, read from /proc, and SIGKILL for all of them by pid: how the tests
take a whole Ray node down (the ``ray start --block`` process, its raylet, agents, workers and the
pipelines those run), as a machine that dies would."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, parents before children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        found.append(pid)
        todo += children.get(pid, [])
    return found


def kill_tree(root: int) -> list[int]:
    """SIGKILL ``root`` and its descendants (this process last, if it is one of them); the pids killed.
    Two passes: a process started while the first ran is caught by the second."""
    killed: list[int] = []
    for _ in range(2):
        for pid in descendants(root):
            if pid == os.getpid() or pid in killed:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    if os.getpid() in descendants(root):
        os.kill(os.getpid(), signal.SIGKILL)
    return killed
