"""What the benchmark scripts share. They run as ``python bench/<script>.py`` on the installed argse
(this folder is then first on the path, so ``import common`` finds this file): an ``argse`` command
in a fresh MLflow store (:func:`store_env`, :func:`argse`), an expert ready for the training step
the experts stage takes (:func:`expert`), a process that keeps one core busy (:func:`spin`), the
experts stage's seconds per epoch read from its runs (:func:`experts_epoch_wall`), and the
fashion-mnist-lt-shaped selective problem (:func:`problem`) and the commit a figure comes from
(:func:`commit`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from argse.training.experts import ExpertRecipe, ExpertTraining, assemble

ROOT = Path(__file__).resolve().parents[1]  # the checkout the benchmarks run from


def commit() -> str:
    """The checkout's commit (short), marked when tracked files differ from it: what heads a figure."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True)
    return (head.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


# -- argse in a fresh store ------------------------------------------------------------------------


def store_env(folder: str | Path, **extra: str) -> dict[str, str]:
    """The environment of an ``argse`` process that tracks in a fresh SQLite store in ``folder``: this
    process's, less its MLflow settings (a run or experiment it names belongs to another store)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{Path(folder) / 'mlflow.db'}", "MPLBACKEND": "Agg", **extra})
    return env


def argse(args: list[str], env: dict[str, str], cwd: str | Path) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``python -m argse ARGS``; its wall seconds and what it printed. A failure ends the benchmark
    with the command and the end of its output."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "argse", *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"argse {' '.join(args)} failed ({seconds:.0f} s):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done


def expert(backbone: str, num_classes: int, *, lr: float, batch_size: int, device: torch.device, bf16: bool = False,
           channels_last: bool = False, steps: int = 1) -> ExpertTraining:
    """A ce expert of ``backbone`` on ``device``, seeded, with the experts stage's optimizer and
    schedule for ``steps`` steps: what :func:`argse.training.experts.train_step` steps."""
    recipe = ExpertRecipe(backbone=backbone, epochs=1, lr=lr, batch_size=batch_size, weight_decay=5e-4,
                          warmup_epochs=0, la_tau=1.0, label_smoothing=0.0, checkpoint_every=1, seed=0, bf16=bf16,
                          channels_last=channels_last)
    return assemble("ce", recipe, np.ones(num_classes, dtype=np.int64), steps_per_epoch=steps, device=device)


def spin(stop) -> None:
    """Keep one core busy until ``stop`` (a ``multiprocessing.Event``) is set, as another job would."""
    x = 0
    while not stop.is_set():
        x += 1


def experts_epoch_wall(client, experts_parent: str) -> tuple[float, int]:
    """The experts stage's wall seconds per epoch of the three experts once training runs, and the
    epochs trained. Each expert's epoch time is the time from its first to its last logged epoch
    divided by the epochs between (the first epoch, with its start-up and any compilation, left
    out); experts trained at once (their runs overlap in time) take the slowest one's, experts
    trained one after another the sum."""
    parent = client.get_run(experts_parent)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{experts_parent}'")
    per_expert, epochs = [], 0
    for child in children:
        history = sorted(client.get_metric_history(child.info.run_id, "epoch/val_acc"), key=lambda m: m.step)
        epochs = len(history)
        if len(history) >= 2:
            per_expert.append((history[-1].timestamp - history[0].timestamp) / 1000 / (len(history) - 1))
        else:
            per_expert.append(child.data.metrics.get("timing/epoch_seconds", 0.0))
    spans = sorted((c.info.start_time, c.info.end_time or c.info.start_time) for c in children)
    at_once = any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
    return (max(per_expert, default=0.0) if at_once else sum(per_expert)), epochs


# -- a fashion-mnist-lt-shaped selective problem ---------------------------------------------------

SIZES = {"tunev": 3000, "val": 2000, "test": 5000}
N_CLASSES = 10
CLASS_TO_GROUP = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])  # the tail is classes 0-2, as in reverse order


def problem(seed: int = 0):
    """Labels per split and three experts' posteriors per split (balanced held-out splits of
    :data:`SIZES`), leaning towards the head by different amounts."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.floor(6000 * 100.0 ** (-(9 - torch.arange(N_CLASSES, dtype=torch.float64)) / 9))
    log_prior = (counts / counts.sum()).log()
    labels, experts = {}, {}
    for split, n in SIZES.items():
        y = torch.arange(N_CLASSES).repeat_interleave(n // N_CLASSES)
        signal = torch.randn(n, N_CLASSES, generator=g, dtype=torch.float64)
        signal[torch.arange(n), y] += 2.5 + (CLASS_TO_GROUP[y] == 0).double()
        labels[split] = y
        experts[split] = torch.stack([torch.softmax(signal * 1.3 + lean * log_prior, dim=1)
                                      for lean in (1.0, 0.3, 0.0)], dim=1)
    return labels, experts
