"""What training the experts will cost, measured before it starts (``argse experts --dry-run``).

The network's size and training FLOPs are counted; then a few training steps of the real backbone at
the real batch size, on random images of the dataset's shape through the real on-device augmentation,
are timed (:func:`argse.training.experts.train_step`, the step training takes), with the evaluation
in each precision the stage computes in, and projected over the configured steps, epochs and experts.
"""

from __future__ import annotations

import dataclasses
import resource
import time

import torch

from argse.data.device import DeviceImages
from argse.data.splits import EVAL_SPLITS, Splits
from argse.models.backbones import count_parameters, estimate_training_flops
from argse.training.experts import ExpertRecipe, assemble, predict_logits, train_step


def estimate(recipe: ExpertRecipe, splits: Splits, *, image_shape: tuple[int, int, int], augmentation: str,
             device: torch.device, experts: int, steps: int = 3) -> list[str]:
    """Three lines on training ``experts`` experts of ``recipe`` on ``splits`` (images of
    ``image_shape``, H x W x C, augmented as ``augmentation`` says) on ``device``: the network and its
    parameters, the FLOPs of one expert's training, and its time and memory, projected from ``steps``
    measured training steps after one warm-up, plus the per-epoch val evaluation and the final logits
    (MLflow's logging comes on top)."""
    h, w, c = image_shape
    n_train, n_eval = len(splits.indices["train"]), {s: len(splits.indices[s]) for s in EVAL_SPLITS}
    batch = min(recipe.batch_size, n_train)
    state = assemble("ce", dataclasses.replace(recipe, batch_size=batch, compile=False), splits.train_counts,
                     steps_per_epoch=steps + 1, device=device)
    generator = torch.Generator().manual_seed(recipe.seed)
    images = torch.randint(0, 256, ((steps + 1) * batch, h, w, c), dtype=torch.uint8, generator=generator)
    data = DeviceImages(images, torch.arange(len(images)) % splits.num_classes, mean=[0.5] * c, std=[0.25] * c,
                        augmentation=augmentation, device=device, channels_last=recipe.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = []
    for x, y in data.batches(batch, shuffle=True, generator=generator, augment=True, drop_last=True):
        started = time.perf_counter()
        train_step(state, x, y, device=device, bf16=recipe.bf16)
        _sync(device)
        timed.append(time.perf_counter() - started)
    step_seconds = sum(timed[1:]) / max(len(timed) - 1, 1)
    eval_seconds = {}  # per image: per-epoch val in training's precision, the final logits in float32
    for bf16 in (recipe.bf16, False):
        for _ in range(2):  # a warm-up, then the time taken
            started = time.perf_counter()
            predict_logits(state.backbone, data, bf16=bf16)
            _sync(device)
        eval_seconds[bf16] = (time.perf_counter() - started) / len(data)

    steps_per_epoch = -(-n_train // recipe.batch_size)
    per_expert = (recipe.epochs * (steps_per_epoch * step_seconds + n_eval["val"] * eval_seconds[recipe.bf16])
                  + sum(n_eval.values()) * eval_seconds[False])
    image_bytes = (n_train + sum(n_eval.values())) * h * w * c
    if device.type == "cuda":
        peak = f"{_size(torch.cuda.max_memory_allocated(device) + image_bytes)} of GPU memory (allocator peak + images)"
    else:
        peak = f"{_size(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + image_bytes)} of RAM (process peak + images)"
    precision = "bf16 autocast" if recipe.bf16 else "fp32"
    flops = estimate_training_flops(state.backbone, (c, h, w), n_train, recipe.epochs)
    return [f"model {type(state.backbone).__name__}, {count_parameters(state.backbone):,} parameters",
            f"training cost: about {flops:.3g} FLOPs per expert ({recipe.epochs} epochs)",
            f"estimate on {device} ({precision}): {step_seconds * 1000:.1f} ms per training step of {batch} images "
            f"(measured, {len(timed) - 1} steps after a warm-up), {steps_per_epoch} steps x {recipe.epochs} epochs x "
            f"{experts} expert(s) + per-epoch val evaluation = about {_duration(per_expert * experts)}"
            + (" before torch.compile's speed-up" if recipe.compile else "") + f"; memory about {peak}"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.0f} MiB"
