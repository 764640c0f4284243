"""Work that runs at once in spawned processes, each dying with its parent (pure Python: no MLflow).

:func:`run_all` starts one spawned process per piece of work, waits for all of them, and returns
their exit codes; interrupted (Ctrl-C, an error while waiting), it stops them first. Each process asks
the kernel to kill it when its parent dies (Linux), so that killing the parent, even with SIGKILL,
stops them too.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any, Callable, Sequence


def run_all(target: Callable[[Any], None], works: Sequence[Any], names: Sequence[str]) -> list[int | None]:
    """``target(work)`` for every work at once, one spawned process each (named ``names``); the exit
    codes once every process ended. ``target`` must be a module-level function and each work
    picklable: the processes are spawned, not forked."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_child, name=name, args=(target, work)) for work, name in zip(works, names)]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join()
    except BaseException:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=30)
        raise
    return [process.exitcode for process in processes]


def _child(target: Callable[[Any], None], work: Any) -> None:
    exit_with_parent()
    target(work)


def death_signal_setter() -> Callable[[], None] | None:
    """A function that has the kernel SIGKILL the calling process when its parent dies (Linux's
    ``PR_SET_PDEATHSIG``), or ``None`` where there is none. libc is looked up here, before any fork, so
    the function is safe as a ``subprocess`` ``preexec_fn`` in a process with threads."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return set_death_signal


def exit_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux), so that killing the parent, even
    with SIGKILL, stops this process too."""
    set_death_signal = death_signal_setter()
    if set_death_signal is None:
        return
    set_death_signal()
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)
