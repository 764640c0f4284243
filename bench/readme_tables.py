"""The tables the README quotes, regenerated on a fresh MLflow store at this checkout's commit.

    python bench/readme_tables.py                      # the quickstart's digits-lt table (about a minute)
    python bench/readme_tables.py --benchmark fashion-mnist-lt --seeds 0,1,2,3,4 --test-prior lt,balanced
    python bench/readme_tables.py --folder              # "Your own images": a generated folder of PNGs

The first form runs the quickstart's pipeline (`argse pipeline`, what `mlflow run .` runs) in a
temporary store and prints its evaluate table as the console prints it. The second runs `argse
benchmark` with those options and prints its summary table. Each table is headed by the command, the
commit, the CPU, the torch threads and the precision it ran in, and the wall time. The third writes
scikit-learn's digits as a folder of 32x32 colour PNGs with a natural long tail
(:data:`FOLDER_TAIL` training images per class, 50 test images each;
argse.testing.image_folders), prints what the dry run says of it, then runs the README's `mlflow run .
-P dataset=my-digits -P data_dir=...` as `argse pipeline` and prints the end of its output. A fresh
store each time: nothing is reused from an earlier run. `--keep DIR` keeps the store of the first two
forms in DIR (its runs, tables and figures: the README's figure is the benchmark run's
`benchmark/figures/rc_worst_lt.png`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import argse, commit, store_env

FOLDER_TAIL = (120, 80, 55, 38, 26, 18, 12, 8, 6, 4)  # the generated folder's training images per class


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
    parser.add_argument("--folder", action="store_true", help="the README's folder example instead")
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="keep the store in DIR (new or empty; by default a temporary folder, removed)")
    args = parser.parse_args()
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        sys.exit(f"--keep {args.keep}: the folder is not empty; name a new or empty one")
    if args.folder:
        folder_example()
        return

    from argse.training.utils import cpu_model

    from argse import stage_registry

    with tempfile.TemporaryDirectory(prefix="argse-readme-") as tmp:
        store = Path(tmp) if args.keep is None else args.keep.resolve()
        store.mkdir(parents=True, exist_ok=True)
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
            client, summary = newest_run(store, stage_registry.BENCHMARK_STAGE.name)
            table = Path(client.download_artifacts(summary.info.run_id, f"{stage_registry.BENCHMARK_DIR}/table.md",
                                                   tmp)).read_text()
    print(f"`argse {' '.join(command)}` (what `mlflow run .` runs{'' if args.benchmark is None else ' -e benchmark'}), "
          f"commit {commit()}, {cpu_model()} ({os.cpu_count()} cores), {precision(dataset)}, "
          f"fresh store, {seconds:.0f} s wall:\n")
    print(table)
    if args.keep is not None:
        print(f"\nthe store: sqlite:///{store / 'mlflow.db'} (artifacts under {store})")


def folder_example() -> None:
    """The README's "Your own images": the dry run's account of a generated folder, the end of a
    pipeline on it, and the champion served answering one of its test images sent as a base64 PNG."""
    from argse.testing.image_folders import write_image_folder
    from argse.training.utils import cpu_model

    with tempfile.TemporaryDirectory(prefix="argse-readme-") as tmp:
        store = Path(tmp)
        folder = write_image_folder(store / "my-digits", FOLDER_TAIL, per_class_test=50, size=32, suffix=".png")
        given = ["--dataset", "my-digits", "--data-dir", str(folder)]
        _, dry = argse(["splits", *given, "--dry-run"], store_env(store), store)
        seconds, done = argse(["pipeline", *given], store_env(store), store)
        image = sorted((folder / "test").rglob("*.png"))[0]
        answer = served_answer(store, "models:/ar-gse-my-digits@champion", image)
    start = next(i for i, line in enumerate(dry.stdout.splitlines()) if line.startswith("folder "))
    scan = dry.stdout.splitlines()[start:]
    scan = scan[:next(i for i, line in enumerate(scan) if line.startswith("  experiment:"))]
    print(f"`argse splits --dataset my-digits --data-dir DIR --dry-run`, then `argse pipeline --dataset my-digits "
          f"--data-dir DIR` (what `mlflow run . --env-manager local -P dataset=my-digits -P data_dir=DIR` runs), "
          f"commit {commit()}, {cpu_model()} ({os.cpu_count()} cores), fresh store, {seconds:.0f} s wall:\n")
    print("\n".join(line.replace(str(folder), "DIR") for line in scan))
    print("...")
    out = done.stdout.splitlines()
    last = max(i for i, line in enumerate(out) if line.startswith("argse run "))  # the pipeline's closing lines
    print("\n".join(line.replace(str(store), "STORE") for line in out[last:] if not line.startswith("see the runs")))
    print(f"\nthe champion served, sent {image.relative_to(folder)} as a base64 PNG:\n{answer}")


def served_answer(store: Path, model: str, image: Path) -> str:
    """What ``mlflow models serve -m MODEL`` answers to ``image`` sent as the README's curl sends it."""
    import base64
    import json
    import urllib.request

    from argse.testing.servers import free_port, wait_for_http

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port)], cwd=store, env=store_env(store),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image.read_bytes()).decode()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read().decode()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
