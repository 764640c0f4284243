"""The benchmark's pipelines on a local Ray cluster of two nodes, one of them killed mid-pipeline, against
the local engine on the same seeds.

    python bench/ray_cluster.py [--seeds 0,1,2,3] [--epochs 2] [--no-kill]

As root on Linux, with the "ray" extra: it makes a network namespace where the loopback is the only
address (Ray listens beyond the loopback whatever it is told; argse.testing.ray_cluster) and in it an
`mlflow server` (SQLite, serving the artifacts) and a head and a worker node of 3 CPUs each (a pipeline
asks for 3: one at a time per node). Runs `argse benchmark --engine ray` there (the worker node killed,
every process of it by pid, at the first expert checkpoint of a pipeline it runs, and a new worker node
started in its place, unless --no-kill), then `argse benchmark --engine local --workers 2` of the same
seeds in another experiment of the same server, each timed from start to exit. Prints both wall times
and their ratio (ray / local), whether the two summaries are equal number for number, which node ran
each pipeline, and for the killed one how long after its last heartbeat the pipeline started again and
what it resumed. The tiny options of the team tests: the point is the engine's overhead and its
recovery, not training. On a machine of two cores both engines run two pipelines at a time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from mlflow.tracking import MlflowClient

from argse.testing.ray_cluster import Cluster, listeners, loopback_only_network, namespace_problem, tracking_server
from argse.testing.servers import wait_for_http

ROOT = Path(__file__).resolve().parents[1]

TAG_NODE = "argse.ray.node"


def options(epochs: int) -> list[str]:
    return ["--dataset", "digits-lt", "--epochs", str(epochs), "--gating-epochs", "2", "--selective-rounds", "1",
            "--epochs-per-round", "1", "--eg-rounds", "2", "--n-boot", "5", "--coverage-grid", "1,0.8,0.6",
            "--checkpoint-every", "1", "--device", "cpu"]


def env_for(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, MPLBACKEND="Agg",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def timed_benchmark(args: list[str], uri: str, cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "argse", "benchmark", *args], cwd=cwd, env=env_for(uri),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"argse benchmark {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def summary_of(client: MlflowClient, experiment: str, dst: Path):
    exp = client.get_experiment_by_name(experiment).experiment_id
    (run,) = client.search_runs([exp], "tags.\"argse.stage\" = 'benchmark'")
    return run, pd.read_csv(client.download_artifacts(run.info.run_id, "benchmark/table.csv", str(dst)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-kill", action="store_true", help="Leave the worker node alive.")
    args = parser.parse_args()
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    problem = namespace_problem()
    if problem:
        raise SystemExit(f"bench/ray_cluster.py: {problem}")
    work = Path(tempfile.mkdtemp(prefix="argse-bench-ray-"))
    for name in ("server", "ray", "local"):
        (work / name).mkdir()
    arm = work / "kill-the-worker"
    with loopback_only_network():
        base = {k: v for k, v in env_for("").items() if not k.startswith("MLFLOW_")}
        server, uri = tracking_server(work / "server", base)
        cluster = Cluster(base, cpus=3, gpus=0, worker_env={
            "PYTHONPATH": str(ROOT / "tests" / "killpoints") + os.pathsep + base["PYTHONPATH"],
            "ARGSE_KILL_AT": "experts:checkpoint", "ARGSE_KILL_NODE": str(arm)})
        try:
            cluster.start()
            wait_for_http(f"{uri}/health", server, log=work / "server" / "server.log")
            found = listeners()
            print(f"listeners in the namespace ({len(found)}): "
                  + ", ".join(sorted({address.rpartition(':')[0] for address, _ in found})))
            if not args.no_kill:
                arm.write_text(str(cluster.workers[0].pid))
            common = ["--seeds", args.seeds, *options(args.epochs)]
            ray_s = timed_benchmark([*common, "--engine", "ray", "--ray-address", cluster.address,
                                     "--experiment", "bench/ray"], uri, work / "ray")
            local_s = timed_benchmark([*common, "--workers", "2", "--experiment", "bench/local"], uri, work / "local")
            report(MlflowClient(tracking_uri=uri), ray_s, local_s, work, killed=not args.no_kill)
        finally:
            cluster.stop()
            server.terminate()
            server.wait(timeout=30)
            shutil.rmtree(work, ignore_errors=True)


def report(client: MlflowClient, ray_s: float, local_s: float, work: Path, killed: bool) -> None:
    _, ray_table = summary_of(client, "bench/ray", work / "ray-table")
    _, local_table = summary_of(client, "bench/local", work / "local-table")
    equal = ray_table.equals(local_table)
    print(f"argse benchmark --engine ray:   {ray_s:6.1f} s")
    print(f"argse benchmark --engine local: {local_s:6.1f} s")
    print(f"ratio ray / local: {ray_s / local_s:.2f}; the summaries are {'equal' if equal else 'NOT equal'}"
          " number for number")
    exp = client.get_experiment_by_name("bench/ray").experiment_id
    pipelines = client.search_runs([exp], "tags.\"argse.stage\" = 'pipeline'", order_by=["attributes.start_time ASC"])
    names: dict[str, str] = {}
    for run in pipelines:
        node = names.setdefault(run.data.tags[TAG_NODE], f"node {len(names) + 1}")
        seconds = (run.info.end_time - run.info.start_time) / 1000
        print(f"  seed {run.data.params['seed']}: {run.info.status:<8} on {node} "
              f"({run.data.tags[TAG_NODE][:12]}), {seconds:.1f} s, {run.data.tags.get('mlflow.runName', '')}")
    dead = [r for r in pipelines if r.info.status != "FINISHED"]
    if killed and dead:
        again = next(r for r in pipelines if r.info.status == "FINISHED"
                     and r.data.params["seed"] == dead[0].data.params["seed"])
        last_sign = float(dead[0].data.tags["argse.heartbeat"])
        before = [r for r in pipelines if last_sign < r.info.start_time / 1000 < again.info.start_time / 1000]
        print(f"the killed pipeline (seed {dead[0].data.params['seed']}) started again on a live node "
              f"{again.info.start_time / 1000 - last_sign:.1f} s after its last heartbeat, {len(before)} waiting "
              f"pipeline(s) having started first; it {again.data.tags['argse.step.experts'].split()[0]} its experts")


if __name__ == "__main__":
    main()
