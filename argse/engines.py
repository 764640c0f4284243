"""Where the benchmark's pipelines run: processes of this machine, or tasks of a Ray cluster.

``argse benchmark`` decides which pipelines to run and reads what became of them; an engine runs one
``argse pipeline`` command, writes its output to the job's log and says how it ended (a
:class:`subprocess.CompletedProcess`), so the two look alike to the benchmark.

``--engine local`` (:class:`LocalEngine`): a subprocess of this process, in its environment.

``--engine ray`` (:class:`RayEngine`): one Ray task per pipeline, which runs the same command with the
node's own interpreter and installation of argse, asking the scheduler for what the pipeline needs
(:func:`pipeline_request`). The tracking URI and credentials (every ``MLFLOW_*`` variable of the
driver) travel in the task's runtime environment and the artifacts through the tracking server
(``mlflow server`` serves them), so the nodes share no filesystem with the driver. Every run a
pipeline makes is tagged with the node that made it (``argse.ray.node``, ``argse.ray.node_ip``). A
node that dies mid-pipeline fails its task, and Ray starts it again on a node that is alive
(:data:`TASK_RETRIES` times); the pipeline there reuses the stages that finished and resumes the
experts from their checkpoints (:mod:`argse.stages.pipeline`). Ray is an extra (``pip install -e
".[ray]"``), imported only here and only for ``--engine ray``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
from typing import IO, Mapping
from urllib.parse import urlparse

import mlflow
from mlflow.tracking import MlflowClient

from argse import ArgseUsageError, first_line
from argse.stage_registry import TAG_RAY_NODE, TAG_RAY_NODE_IP
from argse.tracking.store import code_version
from argse.training.processes import death_signal_setter

#: How often Ray starts a pipeline's task again after the node running it died (or its worker process
#: did). A pipeline that fails by itself (exit code not 0) is not retried: it fails the same way again.
TASK_RETRIES = 3
#: How long the driver waits for the head node's port to accept a connection before saying it is
#: unreachable (Ray itself would keep trying for minutes).
CONNECT_TIMEOUT_S = 10.0
#: The tracking URI schemes every node can reach and that keep artifacts on the server's side.
REMOTE_TRACKING = ("http", "https", "databricks")
#: Where the runs' artifacts must not be: a folder of one machine (what MLflow writes as a plain path).
LOCAL_ARTIFACTS = ("", "file")


class LocalEngine:
    """``argse pipeline`` as a subprocess of this process, with the environment it is given."""

    name = "local"

    def describe(self) -> str:
        return "local"

    def run(self, command: list[str], env: Mapping[str, str], log: IO[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=dict(env), stdout=log, stderr=subprocess.STDOUT, text=True)


def pipeline_request(device: str, cluster_gpus: float, cores: int, memory_gib: float) -> dict[str, float]:
    """What one pipeline asks Ray for, as ``ray.remote`` options: one GPU where it trains on CUDA
    (``--device auto`` too, where the cluster has GPUs: a GPU it did not ask for would be used
    unaccounted); else ``cores`` CPUs and ``memory_gib`` of memory, what the local engine reserves."""
    if device == "cuda" or (device == "auto" and cluster_gpus > 0):
        return {"num_gpus": 1}
    return {"num_cpus": cores, "memory": int(memory_gib * 2**30)}


def describe_request(request: Mapping[str, float]) -> str:
    """``1 GPU``, ``3 CPUs and 3 GiB of memory``."""
    if request.get("num_gpus"):
        return f"{request['num_gpus']:g} GPU"
    return f"{request['num_cpus']:g} CPUs and {request['memory'] / 2**30:g} GiB of memory"


class RayEngine:
    """The pipelines as tasks of a Ray cluster this process is connected to (:func:`connect_ray`)."""

    name = "ray"

    def __init__(self, address: str, request: dict[str, float], nodes: list[dict]):
        import ray

        self.address = address  # the GCS address the driver is connected to
        self.request = request
        self.nodes = nodes  # the nodes alive when the driver connected (ray.nodes())
        self.code = code_version()
        self._task = ray.remote(run_on_node)

    def describe(self) -> str:
        return f"ray {self.address}"

    def slots(self, n_seeds: int, workers: int | None) -> tuple[int, str]:
        """How many seeds are handed to Ray at once (a seed's priors go one after another), and the
        phrase that says how the cluster places them."""
        total: dict[str, float] = {}
        for node in self.nodes:
            for key, value in node["Resources"].items():
                total[key] = total.get(key, 0.0) + value
        cluster = (f"{len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''}, {total.get('CPU', 0):g} CPUs, "
                   f"{total.get('GPU', 0):g} GPUs")
        why = (f"Ray at {self.address} places them on its {cluster}; each pipeline asks for "
               f"{describe_request(self.request)}")
        if workers is not None:
            return min(workers, n_seeds), f"--workers {workers}; {why}"
        return n_seeds, why

    def run(self, command: list[str], env: Mapping[str, str], log: IO[str]) -> subprocess.CompletedProcess:
        """``command`` (``python -m argse pipeline ...``) as a Ray task, with the node's interpreter in
        place of ``command[0]`` and the ``MLFLOW_*`` variables of ``env`` (the tracking server, the
        credentials) in the task's environment; its output (led by a line naming the node) goes to ``log``."""
        import ray

        tracking_env = {k: v for k, v in env.items() if k.startswith("MLFLOW_") and k != "MLFLOW_RUN_ID"}
        task = self._task.options(**self.request, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD",
                                  runtime_env={"env_vars": tracking_env})
        try:
            returncode, output = ray.get(task.remote(command[1:], self.code))
        except ray.exceptions.RayError as exc:
            # An error raised in the task (a node without argse: ModuleNotFoundError) is in ``cause``; the
            # rest (the node died on every retry, ...) say what happened in their first line.
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None else exc
            log.write(f"error: its Ray task failed: {type(cause).__name__}: {first_line(cause)}\n")
            return subprocess.CompletedProcess(command, 1)
        log.write(output)
        return subprocess.CompletedProcess(command, returncode)


def connect_ray(address: str | None, *, device: str, home_experiment: str, cores: int,
                memory_gib: float) -> RayEngine:
    """Connect this process to the Ray cluster at ``address`` (default: ``RAY_ADDRESS``, else the
    cluster this machine joined with ``ray start``) after checking that its nodes can reach the
    tracking server and its artifacts; a usage error in one line where they cannot, where the extra
    is missing, or where nothing answers at the address."""
    try:
        import ray
    except ImportError:
        raise ArgseUsageError('--engine ray needs Ray, the project\'s "ray" extra: pip install -e ".[ray]"') from None
    uri = mlflow.get_tracking_uri()
    if urlparse(uri).scheme not in REMOTE_TRACKING:
        raise ArgseUsageError(
            f"--engine ray needs a tracking server that every node reaches; the tracking URI is {uri}, "
            "a store of this machine: start `mlflow server` (it serves the artifacts too) and give its "
            "http:// address in MLFLOW_TRACKING_URI or --tracking-uri (docs/cluster.md)")
    _check_artifact_location(home_experiment)
    given = address or os.environ.get("RAY_ADDRESS")
    _check_reachable(given)
    try:
        ray.init(address=given or "auto", logging_level=logging.WARNING, log_to_driver=False,
                 ignore_reinit_error=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at {given}" if given else "on this machine (no --ray-address or RAY_ADDRESS given)"
        raise ArgseUsageError(f"--engine ray: no Ray cluster answered {where}: {first_line(exc)}; start one with "
                              "`ray start --head` or give the head node's address in --ray-address") from None
    nodes = [node for node in ray.nodes() if node["Alive"]]
    _check_tracking_host(uri, nodes)
    request = pipeline_request(device, ray.cluster_resources().get("GPU", 0.0), cores, memory_gib)
    if request.get("num_gpus") and not ray.cluster_resources().get("GPU"):
        raise ArgseUsageError(f"--device {device}: the Ray cluster has no GPU (`ray status` lists its resources): "
                              "join GPU nodes with `ray start`, or use --device cpu")
    return RayEngine(ray.get_runtime_context().gcs_address, request, nodes)


def _check_artifact_location(home_experiment: str) -> None:
    """Refuse an experiment whose artifacts go to a folder of one machine: the other nodes would write
    theirs beside themselves, where nobody reads them."""
    experiment = MlflowClient().get_experiment_by_name(home_experiment)
    if experiment is not None and urlparse(experiment.artifact_location).scheme in LOCAL_ARTIFACTS:
        raise ArgseUsageError(
            f"experiment {home_experiment} keeps its artifacts in {experiment.artifact_location}, a folder of one "
            "machine that the other nodes cannot write: run `mlflow server` serving the artifacts (its default; "
            "not --no-serve-artifacts) and use an experiment it creates, or name one with --experiment")


def _check_reachable(address: str | None) -> None:
    """A one-line usage error unless something accepts a connection at ``host:port`` (or
    ``ray://host:port``) within :data:`CONNECT_TIMEOUT_S`; ``auto`` and ``local`` are Ray's to resolve."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ArgseUsageError(f"--ray-address {address}: give the head node's host:port (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ArgseUsageError(
            f"--ray-address {address}: nothing answers there ({exc.strerror or first_line(exc)}): give the head "
            "node's address (`ray start --head` prints it) or leave it out on a node of the cluster") from None


def _is_loopback(host: str | None) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_tracking_host(uri: str, nodes: list[dict]) -> None:
    """Refuse a tracking server on this machine's loopback when the cluster has nodes elsewhere."""
    elsewhere = sorted({n["NodeManagerAddress"] for n in nodes if not _is_loopback(n["NodeManagerAddress"])})
    if elsewhere and _is_loopback(urlparse(uri).hostname):
        raise ArgseUsageError(
            f"the tracking server {uri} is on this machine's loopback, which the cluster's nodes at "
            f"{', '.join(elsewhere)} cannot reach: give its address on the cluster's network in "
            "MLFLOW_TRACKING_URI or --tracking-uri")


# -- on the node ------------------------------------------------------------------------------------


def run_on_node(argv: list[str], driver_code: str) -> tuple[int, str]:
    """The Ray task: ``argv`` (``-m argse pipeline ...``) run by this node's interpreter, in a process
    of its own that dies with the task's; its exit code and output, led by a line that names the node
    and what Ray gave the task. Every run the pipeline makes is tagged with the node (MLflow adds the
    tags in ``MLFLOW_RUN_CONTEXT`` to every run a process starts). GPUs Ray did not give the task are
    hidden from it. A node whose argse differs from the driver's runs nothing: its runs would carry
    another code version, which the driver's cache never finds."""
    import ray

    context = ray.get_runtime_context()
    node, ip = context.get_node_id(), ray.util.get_node_ip_address()
    gpus = context.get_accelerator_ids().get("GPU", [])
    given = ", ".join(f"{key} {value:g}" for key, value in sorted(context.get_assigned_resources().items())
                      if key != "memory")
    head = f"ray: node {node} ({ip}), given {given}" + (f" (GPU ids {','.join(gpus)})" if gpus else "") + "\n"
    mine = code_version()
    if mine != driver_code:
        return 1, head + (f"error: node {ip} runs argse {mine}, the driver {driver_code}: install the driver's "
                          "commit on every node\n")
    env = dict(os.environ)
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    tags = json.loads(env.get("MLFLOW_RUN_CONTEXT") or "{}")
    env["MLFLOW_RUN_CONTEXT"] = json.dumps({**tags, TAG_RAY_NODE: node, TAG_RAY_NODE_IP: ip})
    done = subprocess.run([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, preexec_fn=death_signal_setter())
    return done.returncode, head + done.stdout


Engine = LocalEngine | RayEngine


def connect(engine: str, ray_address: str | None, *, device: str, home_experiment: str, cores: int,
            memory_gib: float) -> Engine:
    """The engine ``--engine`` names (one of :data:`argse.ENGINES`), connected (see :func:`connect_ray`)."""
    if engine == "ray":
        return connect_ray(ray_address, device=device, home_experiment=home_experiment, cores=cores,
                           memory_gib=memory_gib)
    return LocalEngine()


__all__ = ["Engine", "LocalEngine", "RayEngine", "connect", "connect_ray", "pipeline_request", "run_on_node",
           "TASK_RETRIES"]
