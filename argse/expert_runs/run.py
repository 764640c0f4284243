"""One expert trained in its MLflow run: the recipe and images its config gives, the training's hooks
(per-epoch metrics, progress, checkpoints), then the calibrated logits and the model it logs.

What an expert run leaves for the later stages: ``model/`` (an ``mlflow.pytorch`` model taking raw
uint8 images, temperature included), ``logits/{tunev,val,test}.npz`` (calibrated float32 logits,
labels, indices into the held-out pool) and ``checkpoints/last.pt`` (a version per checkpoint, each
with its digest: ``argse.tracking.integrity``).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import click
import mlflow
import numpy as np
import torch
from tqdm import tqdm

from argse import figures, fmt_number
from argse.config import ExpertsConfig
from argse.data.device import SplitImages, split_images
from argse.data.stream import default_workers, folder_split_images
from argse.data.splits import EVAL_SPLITS, Splits
from argse.models.experts import ExpertModel
from argse.serving import save_expert
from argse.stage_registry import CHECKPOINT, EXPERT_WEIGHTS, MODEL, TAG_CHANNELS_LAST, TAG_PRECISION, logits_path
from argse.tracking import integrity
from argse.training.calibration import calibrate
from argse.training.distributed import Dist
from argse.training.experts import ExpertRecipe, ExpertTraining, accuracy_metrics, assemble, predict_logits, train
from argse.training.utils import on_terminal, peak_lr, training_mode

#: The sections of an expert run's metrics. The MLflow UI's chart view lists sections alphabetically,
#: so the per-epoch training curves are "epoch/" (first), the run's single values "final/" (the
#: accuracies per split and group, the temperature and the calibration), then "timing/".
SECTIONS = {"train_loss": "epoch/loss", "lr": "epoch/lr", "epoch_seconds": "timing/epoch_seconds",
            "images_per_second": "timing/images_per_second",
            "peak_gpu_memory_gb": "timing/peak_gpu_memory_gb", "temperature": "final/temperature"}


def metric_name(key: str) -> str:
    """The MLflow name of an expert run's metric ``key``: ``val_acc`` -> ``epoch/val_acc`` (per epoch),
    ``final_val_acc`` -> ``final/val_acc``, ``val_nll_after`` -> ``final/val_nll_after``."""
    if key in SECTIONS:
        return SECTIONS[key]
    if key.startswith("final_"):
        return "final/" + key.removeprefix("final_")
    if key.startswith(("val_nll_", "val_ece_")):
        return "final/" + key
    return "epoch/" + key


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({metric_name(k): v for k, v in metrics.items()}, step=step)


def recipe(cfg: ExpertsConfig, device: torch.device) -> ExpertRecipe:
    """How ``cfg``'s experts train on ``device``: its numbers, and the precision and memory layout
    ``--precision`` and the preset give there (:func:`argse.training.utils.training_mode`)."""
    bf16, channels_last = training_mode(cfg.precision, device, cfg.preset.cpu_fast_path)
    return ExpertRecipe(backbone=cfg.preset.backbone, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                        weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, la_tau=cfg.la_tau,
                        label_smoothing=cfg.label_smoothing, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed,
                        bf16=bf16, channels_last=channels_last, compile=cfg.compile,
                        in_channels=cfg.preset.image_shape[2], weights=cfg.weights)


def load_images(cfg: ExpertsConfig, splits: Splits, device: torch.device, *, copies: int = 1) -> SplitImages:
    """The images of ``splits`` on ``device``, read from ``cfg``'s data and augmented as its preset says.
    A folder's images are held in memory when ``copies`` of them (the experts trained at once) fit, else
    streamed, by a share of the cores' decoding processes (:meth:`argse.data.folder.FolderScan.storage`)."""
    channels_last = recipe(cfg, device).channels_last
    if cfg.folder is None:
        return split_images(splits, cfg.source(), augmentation=cfg.preset.augmentation, device=device,
                            channels_last=channels_last)
    size, _, channels = cfg.preset.image_shape
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    storage = cfg.folder.scan.storage(size, choice=cfg.folder.options.storage, available=free, copies=copies)
    workers = max(1, default_workers() // copies)
    click.echo(f"images {'held in memory' if storage.kind == 'memory' else 'streamed'}: {storage.reason}"
               + (f"; {workers} decoding process(es)" if storage.kind == "stream" else ""))
    return folder_split_images(splits, cfg.source(), image_size=size, channels=channels,
                               augmentation=cfg.preset.augmentation, stream=storage.kind == "stream", device=device,
                               channels_last=channels_last, workers=workers if storage.kind == "stream" else 0)


class TrainingLog:
    """The hooks :func:`argse.training.experts.train` calls on the main rank: each epoch's metrics
    logged (``step=epoch``) and shown (one bar per expert on a terminal, else one line per epoch), each
    checkpoint logged as a version of ``checkpoints/last.pt`` holding ``config`` beside the state."""

    def __init__(self, name: str, state: ExpertTraining, epochs: int, steps: int, config: dict, *, verbose: bool,
                 show: bool, position: int = 0):
        self.name, self.state, self.epochs, self.config, self.verbose = name, state, epochs, config, verbose
        self.bars = show and on_terminal()  # on a terminal: one bar per expert over all its steps
        self.bar = tqdm(total=(epochs - state.epoch) * steps, desc=name, leave=False, dynamic_ncols=True,
                        disable=not self.bars, position=position)
        self.folder = tempfile.TemporaryDirectory(prefix="argse-ckpt-")

    def on_step(self) -> None:
        self.bar.update()

    def on_epoch(self, epoch: int, row: dict[str, float]) -> None:
        log_metrics(row, step=epoch)
        progress = (f"epoch {epoch}/{self.epochs}: loss {fmt_number(row['train_loss'])}, val acc "
                    f"{fmt_number(row['val_acc'])}, balanced {fmt_number(row['val_balanced_acc'])}")
        self.bar.set_postfix_str(f"epoch {epoch}/{self.epochs}, val balanced acc {fmt_number(row['val_balanced_acc'])}",
                                 refresh=False)
        if not self.bars:
            click.echo(f"{self.name} {progress} ({row['epoch_seconds']:.1f} s)")
        elif self.verbose:
            tqdm.write(f"{self.name} {progress} ({row['epoch_seconds']:.1f} s)")

    def on_checkpoint(self, epoch: int) -> None:
        local = Path(self.folder.name) / CHECKPOINT
        local.parent.mkdir(exist_ok=True)
        torch.save(self.state.checkpoint(self.config), local)
        integrity.log_artifact(local, local.parent.name, version=f"epoch-{epoch}")

    def close(self) -> None:
        self.bar.close()
        self.folder.cleanup()


def train_and_log(name: str, cfg: ExpertsConfig, splits: Splits, splits_run_id: str | None, images: SplitImages,
                  device: torch.device, ddp: Dist, resume: dict | None, run_id: str | None, position: int = 0) -> None:
    """Train expert ``name`` in the active run (from the checkpoint ``resume``, when given), logging
    each epoch and checkpoint; then, on the main rank, calibrate it on val and log its logits and model.
    ``position``: the line of its progress bar on a terminal."""
    plan = recipe(cfg, device)
    local_batch = cfg.batch_size // ddp.world_size
    steps = images.train.num_batches(local_batch, drop_last=False, world_size=ddp.world_size)
    state = assemble(name, plan, splits.train_counts, steps_per_epoch=steps, device=device, ddp=ddp)
    if ddp.main:
        mlflow.set_tags({TAG_PRECISION: "bf16" if plan.bf16 else "fp32", TAG_CHANNELS_LAST: str(plan.channels_last)})
        mlflow.log_param("lr.peak", f"{peak_lr(cfg.lr, cfg.batch_size):g}")  # what epoch/lr peaks at
    if ddp.main and state.adapted is not None and resume is None:
        click.echo(f"{name}: starting from the weights {cfg.weights}"
                   + (f" ({'; '.join(state.adapted)})" if state.adapted else ""))
    if resume is not None:
        state.restore(resume)
        if ddp.main:
            click.echo(f"{name}: resuming run {run_id} after epoch {state.epoch}/{cfg.epochs}")

    val = images.evaluation["val"]

    def evaluate() -> dict[str, float]:  # watching training: in its precision
        logits = predict_logits(state.backbone, val, bf16=plan.bf16)
        return {f"val_{k}": v for k, v in accuracy_metrics(logits, val.labels, splits.class_to_group,
                                                             splits.group_names).items()}

    # The checkpoint's config names this expert and the splits run it read, however the run was started
    # ("latest", --expert all, --resume). (A resumed run continues exactly: the same weights, optimizer and
    # random state as a run never stopped; only pickle's sharing of objects makes the file's bytes differ.)
    saved_config = dataclasses.replace(cfg, expert=name, splits_run=splits_run_id).params()
    hooks = TrainingLog(name, state, cfg.epochs, steps, saved_config, verbose=cfg.verbose, show=ddp.main,
                        position=position)
    try:
        train(state, images.train, epochs=cfg.epochs, batch_size=local_batch, device=device, bf16=plan.bf16,
              checkpoint_every=cfg.checkpoint_every, rank=ddp.rank, world_size=ddp.world_size,
              evaluate=evaluate, on_step=hooks.on_step, on_epoch=hooks.on_epoch, on_checkpoint=hooks.on_checkpoint)
    finally:
        hooks.close()
    if not ddp.main:
        return
    if device.type == "cuda":
        log_metrics({"peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9})
    expert = ExpertModel(state.backbone, images.train.mean, images.train.std)
    metrics = log_calibrated(expert, splits, images, device)
    click.echo(f"{name}: run {run_id}, val balanced acc {fmt_number(metrics['final_val_balanced_acc'])} ("
               + ", ".join(f"{g} {fmt_number(metrics[f'final_val_acc_{g}'])}" for g in splits.group_names)
               + f"), temperature {fmt_number(metrics['temperature'])}")


def log_calibrated(expert: ExpertModel, splits: Splits, images: SplitImages, device: torch.device) -> dict[str, float]:
    """Fit the expert's temperature on val (:func:`argse.training.calibration.calibrate`); log the
    calibration and the final accuracies, the calibrated logits of every evaluation split, and the model."""
    backbone = expert.backbone.to(device)
    raw = {split: predict_logits(backbone, images.evaluation[split]) for split in EVAL_SPLITS}
    labels = {split: torch.as_tensor(splits.labels[split]) for split in EVAL_SPLITS}
    temperature, metrics = calibrate(raw, labels, splits.class_to_group, splits.group_names)
    expert.temperature.fill_(temperature)
    log_metrics(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        for split in EVAL_SPLITS:
            path = Path(tmp) / logits_path(split)
            path.parent.mkdir(exist_ok=True)
            np.savez(path, logits=(raw[split] / temperature).numpy().astype(np.float32),
                     labels=splits.labels[split], indices=splits.indices[split])
        save_expert(expert.cpu(), Path(tmp) / EXPERT_WEIGHTS)  # what a fit copies into its model
        integrity.log_artifacts(tmp)
    log_model(expert.cpu().eval(), images.evaluation["val"].examples(4).cpu().numpy())
    return metrics


def log_model(expert: ExpertModel, example: np.ndarray) -> None:
    """The expert as an ``mlflow.pytorch`` model of the active run (its code beside it), with its digests."""
    from mlflow.models import infer_signature

    from argse.serving import package_dir, pip_requirements

    with torch.no_grad():
        output = expert(torch.from_numpy(example)).numpy()
    # The code travels with the model (code_paths), so pickling the module is the readable choice;
    # MLflow's generic warning about pickle would only repeat that on every expert.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    info = mlflow.pytorch.log_model(
        expert, name=MODEL, signature=infer_signature(example, output), input_example=example,
        pip_requirements=pip_requirements(), code_paths=[package_dir()],
        serialization_format="pickle",  # a plain nn.Module on load (the default pt2 has no .eval())
    )
    integrity.record_model(info.model_uri)


def log_summary(ids: dict[str, str], splits: Splits) -> None:
    """On the ``--expert all`` run: per-group val accuracy of each expert, as metrics and a figure."""
    client = mlflow.MlflowClient()
    values = {}
    for name, run_id in ids.items():
        m = client.get_run(run_id).data.metrics
        values[name] = [m[metric_name(f"final_val_acc_{g}")] for g in splits.group_names]
        mlflow.log_metrics({f"{name}/val_balanced_acc": m[metric_name("final_val_balanced_acc")],
                            **{f"{name}/val_acc_{g}": m[metric_name(f"final_val_acc_{g}")] for g in splits.group_names}})
    fig = figures.bars_by_group(values, splits.group_names, "val accuracy (calibrated)", "experts: accuracy per group")
    mlflow.log_figure(fig, "val_accuracy_by_group.png")
    figures.close(fig)
