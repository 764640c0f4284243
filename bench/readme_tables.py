"""The tables the README quotes, regenerated on a fresh MLflow store at this checkout's commit.

    python bench/readme_tables.py                      # the quickstart's digits-lt table (about a minute)
    python bench/readme_tables.py --benchmark fashion-mnist-lt --seeds 0,1,2,3,4 --test-prior lt,balanced

The first form runs the quickstart's pipeline (`argse pipeline`, what `mlflow run .` runs) in a
temporary store and prints its evaluate table as the console prints it. The second runs `argse
benchmark` with those options and prints its summary table. Each table is headed by the command, the
commit, the CPU, the torch threads and the precision it ran in, and the wall time. A fresh store
each time: nothing is reused from an earlier run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import argse, store_env

ROOT = Path(__file__).resolve().parents[1]  # the checkout whose commit heads the tables


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True)
    return (head.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def precision(dataset: str) -> str:
    """What the dataset's preset trains in on this CPU (`--precision auto`, as `argse experts` decides)."""
    import torch

    from argse.presets import PRESETS
    from argse.training.utils import training_mode

    preset = PRESETS[dataset]
    bf16, _ = training_mode("auto", torch.device("cpu"), preset.cpu_fast_path)
    threads = preset.cpu_threads or torch.get_num_threads()
    return f"{'bf16 autocast' if bf16 else 'fp32'} training, {threads} torch thread{'s' if threads != 1 else ''}"


def newest_run(store: Path, stage: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"tags.\"argse.stage\" = '{stage}' and attributes.status = 'FINISHED'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        sys.exit(f"no FINISHED {stage} run in the store")
    return client, found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--benchmark", metavar="DATASET", help="run `argse benchmark` on DATASET instead")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--test-prior", default="lt")
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()

    from argse.training.utils import cpu_model

    from argse import stage_registry

    with tempfile.TemporaryDirectory(prefix="argse-readme-") as tmp:
        store = Path(tmp)
        if args.benchmark is None:
            dataset = "digits-lt"
            command = ["pipeline", "--dataset", dataset]
            seconds, _ = argse(command, store_env(store), store)
            client, evaluate = newest_run(store, "evaluate")
            import pandas as pd

            from argse.stages.evaluate import summary_markdown

            local = client.download_artifacts(evaluate.info.run_id,
                                              f"{stage_registry.RESULTS_DIR}/{stage_registry.RESULTS_TABLE}", tmp)
            table = summary_markdown(pd.read_csv(local))
        else:
            dataset = args.benchmark
            command = ["benchmark", "--dataset", dataset, "--seeds", args.seeds, "--test-prior", args.test_prior,
                       "--data-dir", args.data_dir]
            seconds, _ = argse(command, store_env(store), store)
            client, summary = newest_run(store, stage_registry.BENCHMARK_STAGE)
            table = Path(client.download_artifacts(summary.info.run_id, f"{stage_registry.BENCHMARK_DIR}/table.md",
                                                   tmp)).read_text()
    print(f"`argse {' '.join(command)}` (what `mlflow run .` runs{'' if args.benchmark is None else ' -e benchmark'}), "
          f"commit {commit()}, {cpu_model()} ({os.cpu_count()} cores), {precision(dataset)}, "
          f"fresh store, {seconds:.0f} s wall:\n")
    print(table)


if __name__ == "__main__":
    main()
