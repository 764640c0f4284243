"""`argse benchmark --engine ray`: the pipelines as tasks of a Ray cluster of two nodes on 127.0.0.1 that
write to a real `mlflow server` serving the artifacts (the nodes share no store with the driver), in a
network namespace of the test's own where the loopback is the only address (argse.testing.ray_cluster).

One cluster for every check. The benchmark of seeds 0-3 runs on both nodes while the worker node is
killed (all its processes, by pid) at a pipeline's first expert checkpoint, and a new worker joins as
KubeRay would start one; the benchmark finishes, that pipeline resumes from its checkpoint, and the
summary equals, number for number, the `--engine local` summary of the same seeds in a store of its own.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, free_port, subprocess_env, wait_for_http
from argse.testing.ray_cluster import Cluster, addresses, listeners, loopback_only_network, namespace_problem, tracking_server

# The team tests' tiny pipeline (tests/test_team_roles.py), with the coverages the summary reads (1, 0.8,
# 0.6), a checkpoint every epoch (the kill lands between the two epochs of the first expert) and the CPU
# named (the nodes declare logical GPUs, which `--device auto` would ask for).
TINY = ("--dataset", "digits-lt", "--epochs", "2", "--gating-epochs", "2", "--selective-rounds", "1",
        "--epochs-per-round", "1", "--eg-rounds", "2", "--n-boot", "5", "--coverage-grid", "1,0.8,0.6",
        "--checkpoint-every", "1")
SEEDS = "0,1,2,3"
TAG_NODE = "argse.ray.node"


def _ray_missing() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return 'Ray is not installed (the extra: pip install -e ".[ray]"; .ci/run installs it)'
    return None


needs_a_cluster = pytest.mark.skipif(bool(_ray_missing() or namespace_problem()),
                                     reason=str(_ray_missing() or namespace_problem()))


@dataclass
class World:
    uri: str  # the tracking server, inside the namespace
    cluster: Cluster
    arm: Path  # the worker's kill point fires once this file names a pid
    local: subprocess.Popen  # the --engine local benchmark of the same seeds, on a store of its own
    local_uri: str
    work: Path


def _argse(*args: str, uri: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "argse", *args], cwd=cwd, env=subprocess_env(uri),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory, _migrated_db):
    work = tmp_path_factory.mktemp("ray-engine")
    for name in ("local", "server", "driver"):
        (work / name).mkdir()
    shutil.copy(_migrated_db, work / "local" / "mlflow.db")
    shutil.copy(_migrated_db, work / "server" / "mlflow.db")
    local_uri = f"sqlite:///{work / 'local' / 'mlflow.db'}"
    with loopback_only_network():
        # The local benchmark needs neither the server nor the cluster: it starts first, beside them.
        local = subprocess.Popen([sys.executable, "-m", "argse", "benchmark", "--seeds", SEEDS, "--workers", "2",
                                  "--device", "cpu", *TINY], cwd=work / "local", env=subprocess_env(local_uri),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        env = {k: v for k, v in subprocess_env("").items() if not k.startswith("MLFLOW_")}
        arm = work / "kill-the-worker"
        # The worker node's processes (and so the pipelines it runs) carry the kill point: armed once
        # `arm` names a pid, it kills that process's whole tree at an expert's checkpoint, once.
        cluster = Cluster(env, cpus=3, gpus=1, worker_env={
            "PYTHONPATH": str(REPO / "tests" / "killpoints") + ":" + env["PYTHONPATH"],
            "ARGSE_KILL_AT": "experts:checkpoint", "ARGSE_KILL_NODE": str(arm)})
        server = None
        try:
            server, uri = tracking_server(work / "server", env)
            cluster.start()
            wait_for_http(f"{uri}/health", server, log=work / "server" / "server.log")
            yield World(uri, cluster, arm, local, local_uri, work)
        finally:
            if local.poll() is None:
                local.kill()
                local.communicate()
            cluster.stop()
            if server is not None:
                server.terminate()
                server.wait(timeout=30)


def _runs(client: MlflowClient, stage: str) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, f"tags.\"argse.stage\" = '{stage}'", max_results=1000)


def _table(client: MlflowClient, run_id: str, dst: Path) -> pd.DataFrame:
    dst.mkdir(parents=True, exist_ok=True)
    return pd.read_csv(client.download_artifacts(run_id, "benchmark/table.csv", str(dst)))


@needs_a_cluster
@pytest.mark.slow
def test_a_benchmark_on_two_nodes_survives_a_dead_worker_and_equals_the_local_summary(world):
    # Only the loopback: the namespace has no other address and every listener (the tracking server, the
    # GCS, the raylets, the agents) is bound to 127.0.0.1.
    assert sorted(addresses()) == ["127.0.0.1/8", "::1/128"]
    found = listeners()
    assert {"gcs_server", "raylet"} <= {p.split('"')[1] for _, p in found if '"' in p}, found
    assert all(address.rpartition(":")[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for address, _ in found), found

    first_worker = world.cluster.workers[0]
    world.arm.with_suffix(".tmp").write_text(str(first_worker.pid))
    world.arm.with_suffix(".tmp").rename(world.arm)
    done = _argse("benchmark", "--seeds", SEEDS, "--engine", "ray", "--ray-address", world.cluster.address,
                  "--device", "cpu", *TINY, uri=world.uri, cwd=world.work / "driver")
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "each pipeline asks for 3 CPUs and 3 GiB of memory" in done.stdout

    # The worker node was killed, every process of it, by the pipeline that reached the checkpoint;
    # a new worker took its place.
    assert world.arm.with_suffix(".fired").read_text() == str(first_worker.pid)
    assert first_worker.proc.poll() is not None and len(world.cluster.workers) == 2

    client = MlflowClient(tracking_uri=world.uri)
    assert not [r.info.run_id for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'")]
    (summary,) = _runs(client, "benchmark")
    assert summary.info.status == "FINISHED"
    assert summary.data.tags["argse.benchmark.engine"] == f"ray {world.cluster.address}"
    log = Path(client.download_artifacts(summary.info.run_id, "benchmark/logs/seed0-lt.log", str(world.work)))
    assert log.read_text().splitlines()[0].endswith(", given CPU 3")  # what Ray gave the task: no GPU

    pipelines = _runs(client, "pipeline")
    finished = [r for r in pipelines if r.info.status == "FINISHED"]
    (killed,) = [r for r in pipelines if r.info.status != "FINISHED"]  # the attempt on the dead node
    assert sorted(int(r.data.params["seed"]) for r in finished) == [0, 1, 2, 3]
    assert set(summary.data.tags[f"argse.benchmark.pipeline.seed{s}.lt"] for s in range(4)) == {
        r.info.run_id for r in finished}
    nodes = Counter(r.data.tags[TAG_NODE] for r in finished)
    assert len(nodes) == 2, nodes  # the pipelines ran on the head and on a worker
    assert killed.info.status == "FAILED" and killed.data.tags[TAG_NODE] not in nodes
    assert "its process stopped" in killed.data.tags["argse.failure"]
    # That seed's pipeline ran again on a live node and resumed its experts from the checkpoint.
    (again,) = [r for r in finished if r.data.params["seed"] == killed.data.params["seed"]]
    action, experts_id = again.data.tags["argse.step.experts"].split()
    assert action == "resumed"

    # Each seed's experts trained once: one parent and one run per expert, all FINISHED. The killed
    # seed's were made on the node that died and taken over (argse.resume.1) by the pipeline that ran
    # again; its first expert, killed after its first epoch, went on from that epoch's checkpoint.
    experts = _runs(client, "experts")
    assert all(r.info.status == "FINISHED" for r in experts)
    assert Counter((r.data.params["seed"], r.data.tags["argse.expert"]) for r in experts) == Counter(
        {(str(s), e): 1 for s in range(4) for e in ("all", "ce", "logitadjust", "balsoftmax")})
    (taken_over,) = [r for r in experts if any(k.startswith("argse.resume.") for k in r.data.params)]
    assert taken_over.info.run_id == experts_id and taken_over.data.tags[TAG_NODE] == killed.data.tags[TAG_NODE]
    ce = client.get_run(taken_over.data.tags["argse.expert_run.ce"])
    assert ce.data.tags[TAG_NODE] == killed.data.tags[TAG_NODE]
    assert sorted(m.step for m in client.get_metric_history(ce.info.run_id, "epoch/val_acc")) == [1, 2]

    # The same seeds on this machine's processes, in a store of their own: the same summary, number for number.
    out, err = world.local.communicate(timeout=600)
    assert world.local.returncode == 0, (out[-3000:], err[-3000:])
    local = MlflowClient(tracking_uri=world.local_uri)
    (local_summary,) = _runs(local, "benchmark")
    assert local_summary.data.tags["argse.benchmark.engine"] == "local"
    assert not any(TAG_NODE in r.data.tags for r in _runs(local, "pipeline"))
    pd.testing.assert_frame_equal(_table(client, summary.info.run_id, world.work / "ray-table"),
                                  _table(local, local_summary.info.run_id, world.work / "local-table"),
                                  check_exact=True)


@needs_a_cluster
@pytest.mark.slow
def test_a_cuda_pipeline_asks_ray_for_one_gpu(world):
    # The nodes declare one logical GPU each; this machine may have no CUDA (the pipeline then fails at
    # its experts, which is not what is checked): the request and what Ray gave the task are.
    done = _argse("benchmark", "--seeds", "7", "--engine", "ray", "--ray-address", world.cluster.address,
                  "--device", "cuda", *TINY, uri=world.uri, cwd=world.work / "driver")
    assert "each pipeline asks for 1 GPU" in done.stdout, (done.stdout[-3000:], done.stderr[-3000:])
    client = MlflowClient(tracking_uri=world.uri)
    summary = next(r for r in _runs(client, "benchmark") if r.data.params["seeds"] == "7")
    log = Path(client.download_artifacts(summary.info.run_id, "benchmark/logs/seed7-lt.log", str(world.work)))
    head = log.read_text().splitlines()[0]
    assert head.startswith("ray: node ") and "GPU 1" in head and "(GPU ids 0)" in head, head


@needs_a_cluster
@pytest.mark.slow
def test_an_unreachable_ray_address_is_one_line_and_exit_2_within_30_s(world):
    address = f"127.0.0.1:{free_port()}"  # inside the namespace: nothing listens there
    client = MlflowClient(tracking_uri=world.uri)
    before = len(_runs(client, "benchmark"))
    started = time.monotonic()
    done = _argse("benchmark", "--seeds", "0", "--engine", "ray", "--ray-address", address, *TINY,
                  uri=world.uri, cwd=world.work / "driver", timeout=120)
    assert time.monotonic() - started < 30
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: --ray-address {address}: nothing answers there")
    assert len(_runs(client, "benchmark")) == before  # no run


# ------------------------------------------------------------------------------------ without a cluster


def test_engine_ray_without_the_extra_is_one_line_naming_it(store, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    result = cli("benchmark", "--dataset", "digits-lt", "--seeds", "0", "--engine", "ray")
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1
    assert lines[0] == 'error: --engine ray needs Ray, the project\'s "ray" extra: pip install -e ".[ray]"'
    assert not MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])


@pytest.mark.skipif(bool(_ray_missing()), reason=str(_ray_missing()))
def test_engine_ray_refuses_a_store_the_nodes_cannot_reach(store, cli):
    result = cli("benchmark", "--dataset", "digits-lt", "--seeds", "0", "--engine", "ray")
    lines = result.err.strip().splitlines()
    assert result.code == 2 and len(lines) == 1, result.err
    assert lines[0].startswith("error: --engine ray needs a tracking server that every node reaches; the tracking "
                               f"URI is {store}, a store of this machine")


@pytest.mark.parametrize("address", ["head-node", "10.0.0.5:", ":6379", "10.0.0.5:port"])
def test_a_ray_address_without_host_and_port_is_refused(address):
    from argse import ArgseUsageError
    from argse.engines import _check_reachable

    with pytest.raises(ArgseUsageError, match="give the head node's host:port"):
        _check_reachable(address)


def test_ray_address_without_engine_ray_is_refused(store, cli):
    result = cli("benchmark", "--dataset", "digits-lt", "--seeds", "0", "--ray-address", "127.0.0.1:6379")
    assert result.code == 2
    assert result.err.strip() == "error: --ray-address is for --engine ray (the engine is local): add --engine ray"


def test_a_pipeline_asks_for_a_gpu_where_it_trains_on_cuda_else_the_local_engines_cores_and_memory():
    from argse.engines import describe_request, pipeline_request

    cpu = {"num_cpus": 3, "memory": 3 * 2**30}
    assert pipeline_request("cuda", 0.0, 3, 3.0) == {"num_gpus": 1}
    assert pipeline_request("auto", 4.0, 3, 3.0) == {"num_gpus": 1}  # auto trains on a GPU where there is one
    assert pipeline_request("auto", 0.0, 3, 3.0) == cpu
    assert pipeline_request("cpu", 4.0, 3, 3.0) == cpu
    assert describe_request(cpu) == "3 CPUs and 3 GiB of memory" and describe_request({"num_gpus": 1}) == "1 GPU"


def test_engine_ray_refuses_artifacts_in_a_folder_of_one_machine(store):
    from argse import ArgseUsageError
    from argse.engines import _check_artifact_location

    client = MlflowClient()
    client.create_experiment("served", artifact_location="mlflow-artifacts:/served")  # what `mlflow server` gives
    client.create_experiment("local folder")  # a SQLite store's: ./mlruns beside it
    _check_artifact_location("served")
    _check_artifact_location("not made yet")
    with pytest.raises(ArgseUsageError, match="experiment local folder keeps its artifacts in .*, a folder of one machine"):
        _check_artifact_location("local folder")


def test_engine_ray_refuses_a_tracking_server_on_the_loopback_when_nodes_are_elsewhere():
    from argse import ArgseUsageError
    from argse.engines import _check_tracking_host

    here, there = {"NodeManagerAddress": "127.0.0.1"}, {"NodeManagerAddress": "10.0.0.7"}
    _check_tracking_host("http://127.0.0.1:5000", [here, here])  # a cluster of this machine (the tests')
    _check_tracking_host("http://10.0.0.5:5000", [here, there])
    for uri in ("http://127.0.0.1:5000", "http://localhost:5000", "http://[::1]:5000"):
        with pytest.raises(ArgseUsageError, match="nodes at 10.0.0.7 cannot reach"):
            _check_tracking_host(uri, [here, there])
