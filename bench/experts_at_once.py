"""The experts stage at once (one process per expert) against one after another, interleaved.

    python bench/experts_at_once.py [--epochs 20] [--repeats 1] [--data-dir /usr/share/datasets/fashion-mnist]
                                    [--dataset fashion-mnist-lt] [--device auto] [--compile]

On fashion-mnist-lt (Debian's `dataset-fashion-mnist`; the preset's 14,886 train images, bf16 on CPUs
with bf16 units, one torch thread per expert), in a temporary MLflow store: one splits run, then
`argse experts --at-once no` and `--at-once yes` as fresh processes (what the pipeline starts),
alternating which goes first in each repeat, each timed from start to exit. Prints the wall times,
their ratio (one after another / at once) and each expert's final val accuracy in both modes, at the
same seed, the stage's seconds per epoch of the three experts once training runs and the projected
time of the preset's epochs for the three experts, and on CUDA the experts' peak GPU memory. Run it
on an idle machine: the point is how the stage uses the cores it has. Another dataset (e.g.
`--dataset cifar100-lt --data-dir` a folder of bench/cifar_full_size.py), `--device cuda` and
`--compile` time the same comparison on a GPU (bench/cuda_check.sh).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from common import argse, experts_epoch_wall, store_env

EXPERTS = ("ce", "logitadjust", "balsoftmax")


def gpu_name(device: str) -> str:
    """``NVIDIA H100 80GB HBM3; `` where the experts will train on CUDA, else nothing."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return ""
    return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs per expert (the preset's: 20)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data-dir", default="data", help="where the dataset is (Fashion-MNIST: else Debian's folder)")
    parser.add_argument("--dataset", default="fashion-mnist-lt")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile each expert")
    args = parser.parse_args()

    from argse.training.utils import cpu_model

    from mlflow.tracking import MlflowClient

    from argse.presets import PRESETS
    from argse.stage_registry import expert_run_tag

    with tempfile.TemporaryDirectory(prefix="argse-bench-") as tmp:
        work = Path(tmp)
        env = store_env(work)
        dataset = ["--dataset", args.dataset, "--data-dir", args.data_dir]
        argse(["splits", *dataset], env, work)
        training = ["--epochs", str(args.epochs), "--device", args.device] + (["--compile"] if args.compile else [])
        print(f"{cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} before; {gpu_name(args.device)}"
              f"{args.dataset} experts, {args.epochs} epochs each{', torch.compile' if args.compile else ''}")
        times: dict[str, list[float]] = {"no": [], "yes": []}
        parents: dict[str, list[str]] = {"no": [], "yes": []}
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        for repeat in range(args.repeats):
            for mode in (("no", "yes") if repeat % 2 == 0 else ("yes", "no")):
                # --rerun: the second mode's options are the first's (--at-once is no param), and a stage
                # started alone would reuse the first's FINISHED run
                seconds, _ = argse(["experts", *dataset, *training, "--at-once", mode, "--rerun"], env, work)
                times[mode].append(seconds)
                exps = [e.experiment_id for e in client.search_experiments()]
                newest = client.search_runs(exps, "tags.\"argse.expert\" = 'all'", order_by=["attributes.start_time DESC"])
                parents[mode].append(newest[0].info.run_id)
                print(f"  repeat {repeat + 1}, --at-once {mode}: {seconds:.1f} s", flush=True)

        def expert_runs(parent_id: str) -> dict:
            tags = client.get_run(parent_id).data.tags
            return {name: client.get_run(tags[expert_run_tag(name)]) for name in EXPERTS}

        def accuracies(parent_id: str) -> dict[str, float]:
            return {name: run.data.metrics["final/val_acc"] for name, run in expert_runs(parent_id).items()}

        serial, at_once = statistics.median(times["no"]), statistics.median(times["yes"])
        print()
        full = PRESETS[args.dataset].epochs
        print(f"| mode | wall (median) | s per epoch | {full} epochs x 3 experts (projected) | "
              + " | ".join(f"{name} val acc" for name in EXPERTS) + " | peak GPU memory |")
        print("|:---|---:|---:|---:|" + "---:|" * len(EXPERTS) + "---:|")
        for mode, label, seconds in (("no", "one after another", serial), ("yes", "at once", at_once)):
            acc = accuracies(parents[mode][0])
            per_epoch, _ = experts_epoch_wall(client, parents[mode][0])
            projected = seconds + (full - args.epochs) * per_epoch
            memory = [run.data.metrics.get("timing/peak_gpu_memory_gb") for run in expert_runs(parents[mode][0]).values()]
            gpu = "-" if None in memory else f"{max(memory):.2f} GB per expert"
            print(f"| {label} | {seconds:.1f} s | {per_epoch:.2f} s | {projected / 60:.1f} min | "
                  + " | ".join(f"{acc[name]:.4f}" for name in EXPERTS) + f" | {gpu} |")
        gap = max(abs(accuracies(parents["no"][0])[n] - accuracies(parents["yes"][0])[n]) for n in EXPERTS)
        print(f"\nratio (one after another / at once): {serial / at_once:.2f}x; largest val accuracy difference "
              f"between the modes: {gap * 100:.2f} points")


if __name__ == "__main__":
    main()
