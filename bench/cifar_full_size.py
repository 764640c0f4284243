"""The original benchmark at its real size, offline: CIFAR-100-LT end to end on a generated folder.

    python bench/cifar_full_size.py [--epochs 3] [--data-dir /tmp/argse-cifar100-full] [--device auto]
                                    [--per-class 500,100] [--write-only]

Writes a CIFAR-100-format folder of the real sizes (the `cifar-100-python` pickles torchvision reads:
50,000 train and 10,000 test 32x32 colour images, 100 classes) whose images carry a learnable class
signal (each class a smooth colour pattern of its own, under heavy per-image noise and a random
shift), unless the folder is there already. Then runs `argse pipeline --dataset cifar100-lt` on it
through the real loader with ResNet-32 for `--epochs` epochs (splits at imbalance factor 100: 10,847
train images; experts; gating; fit; evaluate with 100 classes; registration), serves the champion
with `mlflow models serve` and sends it one request. Prints the wall time of each stage, the peak
resident memory of the pipeline and its processes, and the projected time of the preset's 200 epochs
on this machine (the measured per-epoch time of the experts stage, with the rest of the pipeline as
measured). `--per-class` shrinks the folder for a dry run of this script (e.g. `20,10` on a CPU before
the GPU minutes); `--write-only` writes the folder and stops (bench/cuda_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from common import argse, experts_epoch_wall, store_env

N_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 100, 500, 100
STAGES = ("splits", "experts", "gating-pretrain", "gating-selective", "argse", "evaluate")


def write_folder(root: Path, seed: int = 0, train_per_class: int = TRAIN_PER_CLASS,
                 test_per_class: int = TEST_PER_CLASS) -> Path:
    """The `cifar-100-python/{train,test,meta}` pickles at CIFAR-100's sizes (or the given sizes per
    class), with a class signal: class
    c's images are its 8x8 random colour pattern, upsampled to 32x32, shifted by up to 6 pixels, at
    30% contrast under Gaussian noise of standard deviation 64 (of 255)."""
    folder = root / "cifar-100-python"
    if (folder / "meta").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(-1.0, 1.0, size=(N_CLASSES, 3, 8, 8)).repeat(4, axis=2).repeat(4, axis=3)  # [C, 3, 32, 32]
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(N_CLASSES), per_class)
        rng.shuffle(labels)
        data = np.empty((len(labels), 3 * 32 * 32), dtype=np.uint8)
        for start in range(0, len(labels), 5000):  # in chunks, to keep the float arrays small
            y = labels[start:start + 5000]
            shift = rng.integers(-6, 7, size=(len(y), 2))
            images = np.stack([np.roll(patterns[c], tuple(s), axis=(1, 2)) for c, s in zip(y, shift)])
            images = 128 + 0.3 * 127 * images + rng.normal(0, 64, size=images.shape)
            data[start:start + len(y)] = np.clip(images, 0, 255).astype(np.uint8).reshape(len(y), -1)
        batch = {"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                 "filenames": [f"img_{i}.png" for i in range(len(labels))], "batch_label": name}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"class_{c:02d}" for c in range(N_CLASSES)],
                     "coarse_label_names": [f"super_{c:02d}" for c in range(20)]}, fh)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_times(client, pipeline_id: str) -> dict[str, float]:
    """Wall seconds of each stage run of the pipeline (its child runs, by run name)."""
    run = client.get_run(pipeline_id)
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{pipeline_id}'")
    out = {}
    for child in children:
        name = child.data.tags.get("mlflow.runName", "")
        out[name] = (child.info.end_time - child.info.start_time) / 1000
    return out


def serve_one_request(env: dict[str, str], model_uri: str, image: np.ndarray) -> str:
    """`mlflow models serve` the model, send one image, stop the server; the answer."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(1)
        body = json.dumps({"inputs": image[None].tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(request, timeout=60).read().decode()
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "argse-cifar100-full"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--per-class", default=f"{TRAIN_PER_CLASS},{TEST_PER_CLASS}",
                        help="train,test images per class of a folder written anew (CIFAR-100's: 500,100)")
    parser.add_argument("--write-only", action="store_true", help="write the folder and stop")
    args = parser.parse_args()

    from argse.training.utils import cpu_model
    try:
        train_per_class, test_per_class = (int(n) for n in args.per_class.split(","))
    except ValueError:
        parser.error(f"--per-class {args.per_class!r}: give two whole numbers, train,test (e.g. 500,100)")

    data_dir = Path(args.data_dir)
    started = time.perf_counter()
    write_folder(data_dir, train_per_class=train_per_class, test_per_class=test_per_class)
    print(f"{cpu_model()}, {os.cpu_count()} cores; CIFAR-100-format folder {data_dir} "
          f"({time.perf_counter() - started:.0f} s to write or find)", flush=True)
    if args.write_only:
        return

    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="argse-cifar-") as tmp:
        work = Path(tmp)
        env = store_env(work)
        command = ["pipeline", "--dataset", "cifar100-lt", "--data-dir", str(data_dir), "--epochs", str(args.epochs),
                   "--device", args.device]
        print("$ argse " + " ".join(command), flush=True)
        wall, done = argse(command, env, work)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
        print(done.stdout[-4000:])
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        exps = [e.experiment_id for e in client.search_experiments()]
        pipeline = client.search_runs(exps, "tags.\"argse.stage\" = 'pipeline'", order_by=["attributes.start_time DESC"])[0]
        runs = client.search_runs(exps, "tags.\"argse.stage\" != 'pipeline'")
        assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_id, r.info.status) for r in runs]
        times = stage_times(client, pipeline.info.run_id)
        experts_parent = client.search_runs(exps, "tags.\"argse.expert\" = 'all'")[0].info.run_id
        per_epoch, epochs = experts_epoch_wall(client, experts_parent)
        gpu_memory = [r.data.metrics["timing/peak_gpu_memory_gb"] for r in runs if "timing/peak_gpu_memory_gb" in r.data.metrics]

        print("| stage | wall |")
        print("|:---|---:|")
        for name in STAGES:
            seconds = next((v for k, v in times.items() if k.startswith(name)), None)
            print(f"| {name} | {'-' if seconds is None else f'{seconds:.0f} s'} |")
        print(f"| pipeline (process) | {wall:.0f} s |")
        print(f"\nall {len(runs)} stage runs FINISHED; peak resident memory of one process: {peak:.2f} GiB"
              + (f"; peak GPU memory of one expert: {max(gpu_memory):.2f} GB" if gpu_memory else ""))
        experts_wall = next(v for k, v in times.items() if k.startswith("experts"))
        projected_experts = experts_wall + (200 - epochs) * per_epoch
        projected = wall - experts_wall + projected_experts
        print(f"experts stage: {per_epoch:.1f} s per epoch of the three experts ({epochs} epochs trained); "
              f"projected for the preset's 200 epochs: experts {_duration(projected_experts)}, "
              f"pipeline {_duration(projected)} on this machine", flush=True)

        source_images = pickle.load(open(data_dir / "cifar-100-python" / "test", "rb"))["data"][:1]
        image = source_images.reshape(1, 3, 32, 32).transpose(0, 2, 3, 1)[0]
        started = time.perf_counter()
        answer = serve_one_request(env, "models:/ar-gse-cifar100-lt@champion", image)
        print(f"served models:/ar-gse-cifar100-lt@champion ({time.perf_counter() - started:.0f} s to start the "
              f"server and answer), one request: {answer}")


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"

if __name__ == "__main__":
    main()
