"""A Ray cluster of two nodes on 127.0.0.1 and an ``mlflow server`` that serves the artifacts, for the
tests, in a network namespace of their own.

Ray listens beyond the loopback whatever it is told (its GCS on every interface, an agent on the
machine's outward address), so everything here runs in a network namespace where the loopback is the
only address (:func:`loopback_only_network`): this thread enters it, and every process it starts is
born in it. Nothing outside it is ever a target. Each node is a ``ray start --block`` process; a node is
stopped, or killed as a dying machine would be, by the pids of that process and all its descendants.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from argse.testing.process_tree import kill_tree
from argse.testing.servers import free_port

CLONE_NEWNET = 0x40000000  # <sched.h>: unshare(2) / setns(2) of the network namespace
START_TIMEOUT_S = 120.0  # a node that has not said it is up by then is killed


def namespace_problem() -> str | None:
    """Why this machine cannot make a network namespace here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "making a network namespace needs root (CAP_SYS_ADMIN)"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian: apt-get install iproute2)"
    return None


@contextlib.contextmanager
def loopback_only_network():
    """Move the calling thread into a new network namespace that has only the loopback, up; every
    process the thread starts in the block is born there. The thread's own namespace is restored after."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original network namespace failed")
    finally:
        os.close(home)


def addresses() -> list[str]:
    """The addresses of this namespace's interfaces (``ip -o addr``)."""
    out = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True, timeout=30).stdout
    return [line.split()[3] for line in out.splitlines()]


def listeners() -> list[tuple[str, str]]:
    """Every listening TCP socket of this namespace as (local address:port, process), from ``ss -ltnpH``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True, timeout=30).stdout
    return [(line.split()[3], line.split()[-1] if len(line.split()) > 5 else "") for line in out.splitlines()]


def tracking_server(folder: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 with its runs in ``folder/mlflow.db`` (copy a migrated store there
    to skip the migrations) and serving the artifacts, which it keeps in ``folder/artifacts``: the
    nodes reach both through it alone. Returns the process, started, and its URI; wait for
    ``<uri>/health`` before using it (its log: ``folder/server.log``)."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        # Telemetry off: its thread, finding no network, unsets _MLFLOW_TELEMETRY_SESSION_ID while the
        # `mlflow server` command copies os.environ to start its workers (a KeyError, seen once here).
        cwd=folder, env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"))
    return server, uri


class Node:
    """One ``ray start --block`` process, started in ``cwd`` with ``env`` (a node's processes inherit
    it: the raylet, its workers and what they run)."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.log = log
        ray = Path(sys.executable).with_name("ray")
        self.proc = subprocess.Popen([str(ray), "start", "--block", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        said = []
        too_long = threading.Timer(START_TIMEOUT_S, kill_tree, args=(self.proc.pid,))
        too_long.start()
        for line in self.proc.stdout:  # until the node says it is up (or its process ends)
            said.append(line)
            if "Ray runtime started" in line:
                break
        too_long.cancel()
        threading.Thread(target=self._keep_log, args=(said,), daemon=True).start()
        if self.proc.poll() is not None:
            raise RuntimeError("ray start failed: " + "".join(said)[-3000:])

    def _keep_log(self, said: list[str]) -> None:
        with open(self.log, "w") as out:
            out.writelines(said)
            for line in self.proc.stdout:
                out.write(line)
                out.flush()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGKILL the node's processes (by pid), and reap the one this process started."""
        kill_tree(self.pid)
        self.proc.wait(timeout=30)


class Cluster:
    """A head and a worker node on 127.0.0.1, each with ``cpus`` CPUs and ``gpus`` logical GPUs (Ray
    takes the count as given; nothing checks for CUDA), the dashboard off. Start it inside
    :func:`loopback_only_network`. ``worker_env`` is added to the worker node's environment only. A
    worker node that dies is replaced by a new one, as Kubernetes replaces a worker pod (KubeRay):
    ``workers`` lists them in order."""

    def __init__(self, env: dict[str, str], *, cpus: int, gpus: int, worker_env: dict[str, str] | None = None):
        self.env = env
        self.cpus, self.gpus = cpus, gpus
        self.worker_env = worker_env or {}
        # Ray's sockets live under its temp dir, and a Unix socket path may be 107 bytes at most.
        self.dir = Path(tempfile.mkdtemp(prefix="argse-ray-"))
        self.port = 6390
        self.address = f"127.0.0.1:{self.port}"
        self.head: Node | None = None
        self.workers: list[Node] = []
        self._stopping = threading.Event()
        self._keeper: threading.Thread | None = None

    def _args(self) -> list[str]:
        return ["--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus), "--num-gpus", str(self.gpus),
                "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]

    def _start_worker(self) -> Node:
        n = len(self.workers)
        (self.dir / f"worker{n}").mkdir()
        node = Node(["--address", self.address, *self._args()], {**self.env, **self.worker_env},
                    self.dir / f"worker{n}", self.dir / f"worker{n}.log")
        self.workers.append(node)
        return node

    def _keep_a_worker(self) -> None:
        """Wait for the worker node's process to end; unless the cluster is stopping, start another.
        (A thread started by the namespace's thread is born in its namespace.)"""
        while True:
            self.workers[-1].proc.wait()
            if self._stopping.is_set():
                return
            self._start_worker()

    def start(self) -> "Cluster":
        # The head notices a dead node within seconds instead of the default half-minute.
        head_env = {**self.env, "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "RAY_health_check_initial_delay_ms": "1000"}
        (self.dir / "head").mkdir()
        self.head = Node(["--head", "--port", str(self.port), "--include-dashboard=false", "--temp-dir", str(self.dir),
                          *self._args()], head_env, self.dir / "head", self.dir / "head.log")
        self._start_worker()
        self._keeper = threading.Thread(target=self._keep_a_worker, daemon=True)
        self._keeper.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        while self._keeper is not None and self._keeper.is_alive():  # it may be starting a replacement
            if self.workers[-1].proc.poll() is None:
                self.workers[-1].stop()
            self._keeper.join(timeout=5)
        for node in [*self.workers, self.head]:
            if node is not None and node.proc.poll() is None:
                node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
