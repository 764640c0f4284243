"""Training one expert: its recipe, its assembly, the training step and the epoch loop, pure torch
(no MLflow, no click, no config).

`ExpertRecipe` holds the resolved numbers an expert trains with; `assemble` builds from it what one
expert carries from epoch to epoch and what its checkpoint stores (`ExpertTraining`: the model, the
loss, the optimizer and its schedule, the batch generator and the last finished epoch). `train_step`
is the one training step; `train` runs the remaining epochs of it on the training images (held on the
device or streamed from their files: any `argse.data.device.ImageBatches`); the
caller learns of each epoch through `on_epoch(epoch, row)` (train loss, learning rate, seconds, images
per second, and whatever `evaluate()` returns) and of each checkpoint through `on_checkpoint(epoch)`,
and logs them as it likes. Under DistributedDataParallel every rank calls `train`; only the main rank
evaluates and gets the callbacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from argse import EXPERTS
from argse.data.device import ImageBatches
from argse.models.backbones import build_backbone, load_weights, pretrained_state_dict
from argse.training import distributed
from argse.training.losses import make_loss
from argse.training.utils import (
    autocast_context,
    capture_rng_state,
    make_optimizer_and_scheduler,
    restore_rng_state,
    seed_everything,
)

#: The parts a checkpoint of `ExpertTraining.checkpoint` holds.
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "rng", "config")
EVAL_BATCH = 1024


@dataclass(frozen=True)
class ExpertRecipe:
    """How an expert trains, resolved: the network, the schedule and the precision it runs in."""

    backbone: str  # a name of argse.models.backbones.BACKBONES
    epochs: int
    lr: float  # at batch 128; the schedule peaks at lr x batch_size / 128
    batch_size: int  # the global batch (each of N DDP processes takes batch_size / N)
    weight_decay: float
    warmup_epochs: int
    la_tau: float
    label_smoothing: float
    checkpoint_every: int
    seed: int
    bf16: bool  # bf16 autocast
    channels_last: bool
    compile: bool = False  # torch.compile the model
    in_channels: int | None = None  # of the images (None: the network's own default)
    weights: str | None = None  # trained weights to start from (argse.models.backbones.pretrained_state_dict)


@dataclass
class ExpertTraining:
    """One expert's training state. `backbone` is the module whose weights are saved; `model` is what
    the steps call (the backbone itself, or its DistributedDataParallel / compiled wrapper)."""

    backbone: nn.Module
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    epoch: int = 0  #: the last finished epoch
    #: What loading the recipe's trained weights adapted (None: it starts from a random initialisation).
    adapted: list[str] | None = None

    def checkpoint(self, config: dict[str, Any]) -> dict[str, Any]:
        """Everything a resume needs to continue exactly, with the run's `config` beside it."""
        return {"model": self.backbone.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
                "rng": capture_rng_state(self.generator), "config": config}

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a `checkpoint` (model, optimizer, schedule, random state and epoch)."""
        missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
        if missing:
            raise ValueError(f"the checkpoint misses {', '.join(missing)}.")
        self.backbone.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng_state(checkpoint["rng"], self.generator)
        self.epoch = int(checkpoint["epoch"])


def assemble(name: str, recipe: ExpertRecipe, train_counts: np.ndarray, *, steps_per_epoch: int,
             device: torch.device, ddp: distributed.Dist = distributed.Dist()) -> ExpertTraining:
    """Expert ``name`` (a loss of :data:`argse.EXPERTS`) ready to train for ``steps_per_epoch`` steps
    an epoch: every random generator seeded from the recipe's seed and the expert, its backbone on
    ``device`` (channels_last where the recipe says; wrapped for DDP, compiled), its loss on
    ``train_counts`` (the train images per class), SGD with its schedule, and the batch generator."""
    index = EXPERTS.index(name)
    seed_everything(recipe.seed + index)
    backbone = build_backbone(recipe.backbone, len(train_counts), in_channels=recipe.in_channels)
    adapted = load_weights(backbone, pretrained_state_dict(recipe.backbone, recipe.weights)) if recipe.weights else None
    backbone = backbone.to(device)
    if recipe.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    model = distributed.wrap(ddp, backbone, device)
    if recipe.compile:
        model = torch.compile(model)
    optimizer, scheduler = make_optimizer_and_scheduler(
        backbone, lr=recipe.lr, batch_size=recipe.batch_size, weight_decay=recipe.weight_decay,
        epochs=recipe.epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=min(recipe.warmup_epochs, recipe.epochs))
    criterion = make_loss(name, train_counts, la_tau=recipe.la_tau, label_smoothing=recipe.label_smoothing).to(device)
    return ExpertTraining(backbone=backbone, model=model, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
                          generator=torch.Generator().manual_seed(recipe.seed * 1000 + index), adapted=adapted)


def train_step(state: ExpertTraining, x: torch.Tensor, y: torch.Tensor, *, device: torch.device,
               bf16: bool = False) -> torch.Tensor:
    """One step on the batch ``(x, y)``: the loss (in bf16 autocast when ``bf16``), its gradient, one
    optimizer and one schedule step. Returns the batch's mean loss, detached."""
    with autocast_context(device, enabled=bf16, cpu_bf16=bf16):
        loss = state.criterion(state.model(x).float(), y)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    return loss.detach()


def train(
    state: ExpertTraining,
    data: ImageBatches,
    *,
    epochs: int,
    batch_size: int,
    device: torch.device,
    bf16: bool = False,
    checkpoint_every: int = 5,
    rank: int = 0,
    world_size: int = 1,
    evaluate: Optional[Callable[[], dict[str, float]]] = None,
    on_step: Optional[Callable[[], None]] = None,
    on_epoch: Optional[Callable[[int, dict[str, float]], None]] = None,
    on_checkpoint: Optional[Callable[[int], None]] = None,
) -> ExpertTraining:
    """Train from `state.epoch + 1` to `epochs`: each epoch one shuffled pass over `data` in batches of
    `batch_size` (this rank's share of the global batch), with the data's augmentation, one
    :func:`train_step` per batch. After each epoch the main rank (rank 0) calls `evaluate()` and
    `on_epoch(epoch, row)`; every `checkpoint_every` epochs and after the last one it calls
    `on_checkpoint(epoch)` (with `state.epoch` already at that epoch). `on_step()` is called after
    every step, on every rank. Returns `state`."""
    main = rank == 0
    for epoch in range(state.epoch + 1, epochs + 1):
        state.model.train()
        started = time.perf_counter()
        total_loss, seen = torch.zeros((), device=device), 0
        batches = data.batches(batch_size, shuffle=True, generator=state.generator, augment=True,
                               drop_last=False, rank=rank, world_size=world_size)
        for x, y in batches:
            total_loss += train_step(state, x, y, device=device, bf16=bf16) * len(y)
            seen += len(y)
            if on_step is not None:
                on_step()
        seconds = time.perf_counter() - started
        state.epoch = epoch
        if not main:
            continue
        row = {"train_loss": float(total_loss) / max(seen, 1), "lr": state.scheduler.get_last_lr()[0],
               "epoch_seconds": seconds, "images_per_second": seen * world_size / seconds}
        if evaluate is not None:
            row.update(evaluate())
        if on_epoch is not None:
            on_epoch(epoch, row)
        if on_checkpoint is not None and (epoch % checkpoint_every == 0 or epoch == epochs):
            on_checkpoint(epoch)
    return state


@torch.no_grad()
def predict_logits(model: nn.Module, images: ImageBatches, bf16: bool = False) -> torch.Tensor:
    """Raw logits of every image, in order (float32 on the CPU). In float32 unless `bf16` (autocast,
    as training computes): the logged logits are computed in float32, so they are what the logged
    model computes; the per-epoch val metrics, which only watch training, in training's precision."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with autocast_context(device, enabled=bf16, cpu_bf16=bf16):
        out = [model(x).float().cpu() for x, _ in images.eval_batches(EVAL_BATCH)]
    model.train(was_training)
    return torch.cat(out)


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, class_to_group: np.ndarray,
                     group_names: tuple[str, ...]) -> dict[str, float]:
    """Accuracy, balanced (mean per-class) accuracy and per-group accuracy (mean over the group's classes)."""
    labels = labels.cpu()
    correct = (logits.argmax(1) == labels).double()
    num_classes = len(class_to_group)
    per_class = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, correct)
    per_class /= torch.bincount(labels, minlength=num_classes).clamp_min(1).double()
    out = {"acc": float(correct.mean()), "balanced_acc": float(per_class.mean())}
    for k, name in enumerate(group_names):
        out[f"acc_{name}"] = float(per_class[torch.as_tensor(class_to_group == k)].mean())
    return out
