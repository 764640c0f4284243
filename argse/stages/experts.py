"""The experts stage: train ce / logitadjust / balsoftmax on a splits run, calibrate, log.

One MLflow run per expert (tag ``argse.expert``), children of one parent run when ``--expert all``.
Each expert run leaves what the later stages read: ``model/`` (an ``mlflow.pytorch`` model taking raw
uint8 images, temperature included), ``logits/{tunev,val,test}.npz`` (calibrated float32 logits,
labels, indices into the held-out pool) and ``checkpoints/last.pt``. ``--resume RUN_ID`` continues a
killed run from its last checkpoint, in the same run.

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) the experts train with DistributedDataParallel
(gloo on CPU, nccl on CUDA), each rank on its shard of the on-device tensor; only rank 0 talks to
MLflow. ``--batch-size`` is the global batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import click
import mlflow
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from argse import ArgseError, ArgseUsageError, fmt_number, stage_registry, tracking
from argse import EXPERTS
from argse.config import ExpertsConfig
from argse.data.device import DeviceImages, normalize_stats
from argse.data.loaders import load_source
from argse.data.splits import EVAL_SPLITS, Splits
from argse.models.backbones import build_backbone, count_parameters, estimate_training_flops
from argse.models.experts import ExpertModel
from argse.presets import apply_portable_kernels
from argse.selective import ece
from argse.serving import save_expert
from argse.stage_registry import (
    CHECKPOINT,
    EXPERT_WEIGHTS,
    EXPERTS_STAGE,
    MODEL,
    TAG_CHANNELS_LAST,
    TAG_PRECISION,
    expert_run_tag,
    logits_path,
)
from argse.stages.splits import load_splits
from argse.tracking import integrity
from argse.training import utils as training_utils
from argse.training.calibration import fit_temperature, nll
from argse.training.experts import (
    CHECKPOINT_KEYS,
    EVAL_BATCH,
    ExpertTraining,
    accuracy_metrics,
    predict_logits,
    train,
)
from argse.training.losses import make_loss
from argse.training.utils import (
    autocast_context,
    free_cores,
    usable_cores,
    make_optimizer_and_scheduler,
    peak_lr,
    on_terminal,
    resolve_device,
    seed_everything,
)

log = logging.getLogger(__name__)

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


def log_expert_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({metric_name(k): v for k, v in metrics.items()}, step=step)


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


# -- the pieces of one expert's training ---------------------------------------------------------


@dataclasses.dataclass
class Data:
    """The splits and their images, ready for training and evaluation."""

    splits: Splits
    splits_run_id: str
    train: DeviceImages
    evaluation: dict[str, DeviceImages]


def load_data(splits: Splits, splits_run_id: str, cfg: ExpertsConfig, device: torch.device) -> Data:
    source = load_source(cfg.preset.source, cfg.data_dir)
    splits.check_source(source)
    train_images = splits.images(source, "train")
    mean, std = normalize_stats(train_images)
    augmentation = cfg.preset.augmentation

    channels_last = training_mode(cfg, device)[1]

    def holder(split: str, aug: str) -> DeviceImages:
        return DeviceImages(splits.images(source, split), splits.labels[split], mean=mean, std=std,
                            augmentation=aug, device=device, channels_last=channels_last)

    return Data(splits, splits_run_id, holder("train", augmentation),
                {split: holder(split, "none") for split in EVAL_SPLITS})


def load_checkpoint(run_id: str) -> dict | None:
    """The run's ``checkpoints/last.pt``, ``None`` when it has none; a corrupt file (unreadable, or not
    what the run logged) is an error that no resume can fix (:class:`tracking.RunBroken`: the run is
    then replaced, not resumed again)."""
    client = mlflow.MlflowClient()
    if not any(a.path == CHECKPOINT for a in client.list_artifacts(run_id, CHECKPOINT.rpartition("/")[0])):
        return None
    from argse.tracking.integrity import ArtifactChanged

    try:
        path = tracking.download(run_id, CHECKPOINT)
    except ArtifactChanged as exc:
        raise tracking.RunBroken(f"the checkpoint of run {run_id} is corrupt ({str(exc).removeprefix(f'run {run_id}: ')}); "
                                 "a fresh run (without --resume) starts over") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        problem = f"missing {', '.join(missing)}" if missing else ""
    except Exception as exc:
        problem = type(exc).__name__
    if problem:
        raise tracking.RunBroken(f"the checkpoint of run {run_id} is corrupt ({problem}); a fresh run (without "
                                 "--resume) starts over")
    return state


def training_mode(cfg: ExpertsConfig, device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) for this run (see :func:`argse.training.utils.training_mode`)."""
    return training_utils.training_mode(cfg.precision, device, cfg.preset.cpu_fast_path)


def train_expert(name: str, cfg: ExpertsConfig, data: Data, device: torch.device, ddp: Dist,
                 resume: dict | None, run_id: str | None, position: int = 0) -> ExpertModel:
    """Set up one expert (its seed, backbone, loss, optimizer), train it with
    :func:`argse.training.experts.train`, logging per-epoch metrics and checkpoints (rank 0); return
    the model, uncalibrated. ``position``: the line of its progress bar on a terminal."""
    splits = data.splits
    seed_everything(cfg.seed + EXPERTS.index(name))
    backbone = build_backbone(cfg.preset.backbone, splits.num_classes).to(device)
    bf16, channels_last = training_mode(cfg, device)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    if ddp.main:
        mlflow.set_tags({TAG_PRECISION: "bf16" if bf16 else "fp32", TAG_CHANNELS_LAST: str(channels_last)})
        mlflow.log_param("lr.peak", f"{peak_lr(cfg.lr, cfg.batch_size):g}")  # what epoch/lr peaks at
    model: torch.nn.Module = backbone
    if ddp.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            backbone, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    local_batch = cfg.batch_size // ddp.world_size
    steps = data.train.num_batches(local_batch, drop_last=False, world_size=ddp.world_size)
    optimizer, scheduler = make_optimizer_and_scheduler(
        backbone, lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, epochs=cfg.epochs,
        steps_per_epoch=steps, warmup_epochs=min(cfg.warmup_epochs, cfg.epochs))
    state = ExpertTraining(
        backbone=backbone, model=model,
        criterion=make_loss(name, splits.train_counts, la_tau=cfg.la_tau, label_smoothing=cfg.label_smoothing).to(device),
        optimizer=optimizer, scheduler=scheduler,
        generator=torch.Generator().manual_seed(cfg.seed * 1000 + EXPERTS.index(name)))
    if resume is not None:
        state.restore(resume)
        if ddp.main:
            click.echo(f"{name}: resuming run {run_id} after epoch {state.epoch}/{cfg.epochs}")

    val = data.evaluation["val"]
    # On a terminal: one bar per expert over all its steps. Elsewhere (files, CI): one line per epoch.
    bars = ddp.main and on_terminal()
    bar = tqdm(total=(cfg.epochs - state.epoch) * steps, desc=name, leave=False, dynamic_ncols=True,
               disable=not bars, position=position)

    def evaluate() -> dict[str, float]:
        logits = predict_logits(backbone, val, bf16=bf16)  # watching training: its precision
        return {f"val_{k}": v for k, v in accuracy_metrics(logits, val.labels, splits.class_to_group,
                                                             splits.group_names).items()}

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        log_expert_metrics(row, step=epoch)
        progress = (f"epoch {epoch}/{cfg.epochs}: loss {fmt_number(row['train_loss'])}, val acc "
                    f"{fmt_number(row['val_acc'])}, balanced {fmt_number(row['val_balanced_acc'])}")
        bar.set_postfix_str(f"epoch {epoch}/{cfg.epochs}, val balanced acc {fmt_number(row['val_balanced_acc'])}",
                            refresh=False)
        if not bars:
            click.echo(f"{name} {progress} ({row['epoch_seconds']:.1f} s)")
        elif cfg.verbose:
            tqdm.write(f"{name} {progress} ({row['epoch_seconds']:.1f} s)")

    # The checkpoint's config names this expert and the splits run it read, however the run was started
    # ("latest", --expert all, --resume). (A resumed run continues exactly: the same weights, optimizer and
    # random state as a run never stopped; only pickle's sharing of objects makes the file's bytes differ.)
    saved_config = dataclasses.replace(cfg, expert=name, splits_run=data.splits_run_id).params()
    with tempfile.TemporaryDirectory(prefix="argse-ckpt-") as tmp:
        def on_checkpoint(epoch: int) -> None:
            local = Path(tmp) / CHECKPOINT
            local.parent.mkdir(exist_ok=True)
            torch.save(state.checkpoint(saved_config), local)
            integrity.log_artifact(local, local.parent.name, version=f"epoch-{epoch}")

        train(state, data.train, epochs=cfg.epochs, batch_size=local_batch, device=device, bf16=bf16,
              checkpoint_every=cfg.checkpoint_every, rank=ddp.rank, world_size=ddp.world_size,
              evaluate=evaluate, on_step=bar.update, on_epoch=on_epoch, on_checkpoint=on_checkpoint)
    bar.close()
    if device.type == "cuda" and ddp.main:
        log_expert_metrics({"peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9})
    return ExpertModel(backbone, data.train.mean, data.train.std)


def calibrate_and_log(name: str, expert: ExpertModel, data: Data, device: torch.device) -> dict[str, float]:
    """Fit the temperature on val, log logits of every evaluation split, and the model."""
    splits = data.splits
    backbone = expert.backbone.to(device)
    raw = {split: predict_logits(backbone, data.evaluation[split]) for split in EVAL_SPLITS}
    labels = {split: torch.as_tensor(splits.labels[split]) for split in EVAL_SPLITS}
    temperature = fit_temperature(raw["val"], labels["val"])
    expert.temperature.fill_(temperature)
    before, after = raw["val"], raw["val"] / temperature
    metrics = {
        "temperature": temperature,
        "val_nll_before": nll(before, labels["val"]), "val_nll_after": nll(after, labels["val"]),
        "val_ece_before": ece(before.softmax(1), labels["val"]), "val_ece_after": ece(after.softmax(1), labels["val"]),
    }
    for split in EVAL_SPLITS:
        acc = accuracy_metrics(raw[split], labels[split], splits.class_to_group, splits.group_names)
        metrics.update({f"final_{split}_{k}": v for k, v in acc.items()})
    log_expert_metrics(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        for split in EVAL_SPLITS:
            path = Path(tmp) / logits_path(split)
            path.parent.mkdir(exist_ok=True)
            np.savez(path, logits=(raw[split] / temperature).numpy().astype(np.float32),
                     labels=splits.labels[split], indices=splits.indices[split])
        save_expert(expert.cpu(), Path(tmp) / EXPERT_WEIGHTS)  # what a fit copies into its model
        integrity.log_artifacts(tmp)
    log_expert_model(expert.cpu().eval(), data)
    return metrics


def log_expert_model(expert: ExpertModel, data: Data) -> None:
    from mlflow.models import infer_signature

    example = data.evaluation["val"].images[:4].cpu().numpy()
    with torch.no_grad():
        output = expert(torch.from_numpy(example)).numpy()
    from argse.serving import package_dir, pip_requirements

    # The code travels with the model (code_paths), so pickling the module is the readable choice;
    # MLflow's generic warning about pickle would only repeat that on every expert.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    info = mlflow.pytorch.log_model(
        expert, name=MODEL, signature=infer_signature(example, output), input_example=example,
        pip_requirements=pip_requirements(), code_paths=[package_dir()],
        serialization_format="pickle",  # a plain nn.Module on load (the default pt2 has no .eval())
    )
    integrity.record_model(info.model_uri)


# -- the stage -----------------------------------------------------------------------------------


def _resolve_splits(cfg: ExpertsConfig, experiment: str | None) -> str:
    return tracking.resolve_upstream("splits", cfg.splits_run, dataset=cfg.dataset, experiment=experiment).info.run_id


def upstream(cfg: ExpertsConfig, experiment: str | None) -> dict[str, str]:
    """The runs an experts run of ``cfg`` reads, as its run records them: the splits run."""
    return EXPERTS_STAGE.upstream(splits=_resolve_splits(cfg, experiment))


def _config_from_run(run, cfg: ExpertsConfig) -> ExpertsConfig:
    """The configuration a run was started with, for ``--resume``: every hashed option from its params
    (:meth:`~argse.config.StageConfig.restore`), the expert and the splits run from its tags."""
    return dataclasses.replace(cfg.restore(run.data.params),
                               expert=run.data.tags.get(stage_registry.TAG_EXPERT, cfg.expert),
                               splits_run=run.data.tags.get(stage_registry.TAG_UPSTREAM + "splits", cfg.splits_run)).resolve()


def dry_run(cfg: ExpertsConfig, experiment: str | None) -> None:
    splits_run_id = _resolve_splits(cfg, experiment)
    splits = load_splits(splits_run_id)
    model = build_backbone(cfg.preset.backbone, splits.num_classes)
    h, w, c = cfg.preset.image_shape
    n_train = len(splits.indices["train"])
    flops = estimate_training_flops(model, (c, h, w), n_train, cfg.epochs)
    click.echo(cfg.dry_run_header("experts"))
    click.echo(f"  splits run: {splits_run_id} ({n_train} train images, {splits.num_classes} classes)")
    click.echo(f"  experts: {', '.join(cfg.experts())}; model {type(model).__name__}, "
               f"{count_parameters(model):,} parameters")
    click.echo(f"  training cost: about {flops:.3g} FLOPs per expert ({cfg.epochs} epochs)")
    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        raise ArgseUsageError(str(exc)) from None
    n_experts = len(cfg.experts())
    click.echo(f"  mode: {describe_mode(cfg, n_experts, device, Dist.from_env(), n_train)}")
    click.echo("  " + estimate(cfg, splits, device))


def estimate(cfg: ExpertsConfig, splits: Splits, device: torch.device, steps: int = 3) -> str:
    """Time and memory of the configured training on ``device``, projected from ``steps`` measured
    training steps (after one warm-up) of the real backbone at the real batch size, on random images
    of the dataset's shape through the real on-device augmentation, and one evaluation batch."""
    import resource

    h, w, c = cfg.preset.image_shape
    bf16, channels_last = training_mode(cfg, device)
    n_train, n_eval = len(splits.indices["train"]), {s: len(splits.indices[s]) for s in EVAL_SPLITS}
    batch = min(cfg.batch_size, n_train)
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, ((steps + 1) * batch, h, w, c), dtype=torch.uint8, generator=generator)
    labels = torch.arange(len(images)) % splits.num_classes
    data = DeviceImages(images, labels, mean=[0.5] * c, std=[0.25] * c, augmentation=cfg.preset.augmentation,
                        device=device, channels_last=channels_last)
    backbone = build_backbone(cfg.preset.backbone, splits.num_classes).to(device)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    criterion = make_loss("ce", splits.train_counts).to(device)
    optimizer, _ = make_optimizer_and_scheduler(backbone, lr=cfg.lr, batch_size=batch, weight_decay=cfg.weight_decay,
                                                epochs=1, steps_per_epoch=steps + 1, warmup_epochs=0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = []
    for x, y in data.batches(batch, shuffle=True, generator=generator, augment=True, drop_last=True):
        started = time.perf_counter()
        with autocast_context(device, enabled=bf16, cpu_bf16=bf16):
            loss = criterion(backbone(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        timed.append(time.perf_counter() - started)
    step_seconds = sum(timed[1:]) / max(len(timed) - 1, 1)
    eval_images = DeviceImages(images[:min(EVAL_BATCH, len(images))], labels[:min(EVAL_BATCH, len(images))],
                               mean=[0.5] * c, std=[0.25] * c, augmentation="none", device=device,
                               channels_last=channels_last)
    eval_seconds = {}  # per image: per-epoch val in training's precision, the final logits in float32
    for precision in {bf16, False}:
        predict_logits(backbone, eval_images, bf16=precision)  # warm-up
        started = time.perf_counter()
        predict_logits(backbone, eval_images, bf16=precision)
        sync()
        eval_seconds[precision] = (time.perf_counter() - started) / len(eval_images)

    steps_per_epoch = -(-n_train // cfg.batch_size)
    per_expert = (cfg.epochs * (steps_per_epoch * step_seconds + n_eval["val"] * eval_seconds[bf16])
                  + sum(n_eval.values()) * eval_seconds[False])
    experts = len(cfg.experts())
    image_bytes = (n_train + sum(n_eval.values())) * h * w * c
    if device.type == "cuda":
        peak = f"{_size(torch.cuda.max_memory_allocated(device) + image_bytes)} of GPU memory (allocator peak + images)"
    else:
        peak = f"{_size(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + image_bytes)} of RAM (process peak + images)"
    precision = "bf16 autocast" if bf16 else "fp32"
    return (f"estimate on {device} ({precision}): {step_seconds * 1000:.1f} ms per training step of {batch} images "
            f"(measured, {len(timed) - 1} steps after a warm-up), {steps_per_epoch} steps x {cfg.epochs} epochs x "
            f"{experts} expert(s) + per-epoch val evaluation = about {_duration(per_expert * experts)}"
            + (" before torch.compile's speed-up" if cfg.compile else "") + f"; memory about {peak}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.0f} MiB"


def run(cfg: ExpertsConfig, *, experiment: str | None = None) -> dict[str, str]:
    """Run the stage; return ``{expert: run_id}`` plus ``"all"``: the parent's id with ``--expert all``
    (empty for a dry run or on ranks other than 0)."""
    ddp = Dist.from_env()
    if ddp.world_size > 1 and cfg.resume:
        raise ArgseUsageError("--resume is not supported under torchrun; resume on one process")
    if not cfg.resume:  # a resumed run's experts are known once its run is read
        check_at_once(cfg, ddp)
    if cfg.dry_run:
        if ddp.main:
            dry_run(cfg, experiment)
        return {}
    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        raise ArgseUsageError(str(exc)) from None
    if ddp.world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", ddp.local_rank)
            torch.cuda.set_device(device)
        if cfg.batch_size % ddp.world_size:
            raise ArgseUsageError(f"--batch-size {cfg.batch_size} must be divisible by the {ddp.world_size} processes")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        if cfg.resume:
            return _resume(cfg, device, experiment)
        return _run(cfg, device, ddp, experiment)
    finally:
        if ddp.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _shared_splits(ddp: Dist, splits_run_id: str | None) -> tuple[Splits, str]:
    """Rank 0 downloads the splits it resolved; every rank gets them."""
    payload: list = [(load_splits(splits_run_id), splits_run_id) if ddp.main else None]
    if ddp.world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    return payload[0]


def _run(cfg: ExpertsConfig, device: torch.device, ddp: Dist, experiment: str | None) -> dict[str, str]:
    if not ddp.main:
        splits, splits_run_id = _shared_splits(ddp, None)
        data = load_data(splits, splits_run_id, cfg, device)
        for name in cfg.experts():
            train_expert(name, cfg, data, device, ddp, None, None)
        return {}
    single = len(cfg.experts()) == 1
    label = cfg.experts()[0] if single else "all"
    with tracking.stage_run("experts", cfg.dataset, cfg.params(), experiment=experiment,
                            run_name=f"expert-{label}" if single else "experts",
                            tags={stage_registry.TAG_EXPERT: label}, system_metrics=single) as outer:
        inputs = upstream(cfg, experiment)
        splits_run_id = inputs["splits_run"]
        tracking.set_upstream("experts", cfg.params(), inputs)
        splits, _ = _shared_splits(ddp, splits_run_id)
        if single:
            data = load_data(splits, splits_run_id, cfg, device)
            tracking.log_split_inputs(splits, ("train", "val", "tunev", "test"))
            _train_and_log(label, cfg, data, device, ddp, None, outer.info.run_id)
            return {label: outer.info.run_id}
        ids = _train_all(cfg, plan(cfg, []), splits, splits_run_id, inputs, device, ddp)
        click.echo(f"experts run {outer.info.run_id}: " + ", ".join(f"{n} {i}" for n, i in ids.items()))
        return {**ids, "all": outer.info.run_id}


@dataclasses.dataclass(frozen=True)
class Job:
    """What the stage does with one expert of an ``--expert all`` run."""

    name: str
    action: str  # "skip": its run FINISHED; "resume": continue its run from its checkpoint; "start": a new run
    run_id: str | None = None  # the run to skip or resume (None for start)


def plan(cfg: ExpertsConfig, children: list) -> list[Job]:
    """The one place that decides, per expert, whether to skip (its run FINISHED), resume (a run of it
    exists: from its checkpoint, or from the start in the same run when it has none) or start.
    ``children``: the child runs of the ``--expert all`` run (none for a new one), newest first."""
    jobs = []
    for name in cfg.experts():
        child = next((c for c in children if c.data.tags.get(stage_registry.TAG_EXPERT) == name), None)
        if child is None:
            jobs.append(Job(name, "start"))
        else:
            jobs.append(Job(name, "skip" if child.info.status == "FINISHED" else "resume", child.info.run_id))
    return jobs


#: Below this many training images per expert (images x epochs), starting three processes (each
#: imports torch and MLflow and reads the data, a few seconds) costs about what training at once
#: saves: digits-lt's experts see 9,000, fashion-mnist-lt's 300,000 (bench/experts_at_once.py).
AT_ONCE_MIN_IMAGES = 100_000


def at_once_impossible(cfg: ExpertsConfig, ddp: Dist) -> str | None:
    """Why this stage can never train its experts at once, or None."""
    if len(cfg.experts()) < 2:
        return f"--expert {cfg.expert} trains one expert"
    if ddp.world_size > 1:
        return f"under torchrun the {ddp.world_size} processes already train each expert together"
    if len(usable_cores()) < 2:
        return "this process may use 1 CPU core"
    return None


def check_at_once(cfg: ExpertsConfig, ddp: Dist) -> None:
    """``--at-once yes`` where at once can never run: a usage error, one line, before any run starts."""
    why = at_once_impossible(cfg, ddp) if cfg.at_once == "yes" else None
    if why is not None:
        raise ArgseUsageError(f"--at-once yes cannot run here: {why}; drop it or pass --at-once no")


def choose_mode(cfg: ExpertsConfig, n_train: int, device: torch.device, ddp: Dist,
                train_images: int) -> tuple[bool, str]:
    """Whether the stage trains its ``n_train`` experts at once (one process each) or one after another,
    and why, in a phrase (:func:`check_at_once` has refused ``--at-once yes`` where it can never run)."""
    if cfg.at_once == "no":
        return False, "--at-once no"
    impossible = at_once_impossible(cfg, ddp)
    if impossible is not None:
        return False, impossible
    if n_train < 2:
        return False, f"{n_train} expert left to train"
    if cfg.at_once == "auto" and device.type != "cpu":
        return False, f"on {device.type} the experts would share one device (at once not measured there)"
    if cfg.at_once == "auto" and train_images * cfg.epochs < AT_ONCE_MIN_IMAGES:
        return False, (f"{train_images * cfg.epochs:,} training images per expert: too little work to pay for "
                       f"starting {n_train} processes")
    cores, free = free_cores()  # half a second of sampling: only where the answer depends on it
    if cfg.at_once == "yes":
        return True, f"--at-once yes ({cores} cores, {free:.1f} free)"
    if free < 1.5:
        return False, f"{free:.1f} of {cores} cores free (other processes busy): at once would be no faster"
    return True, f"{cores} cores, {free:.1f} free"


def describe_mode(cfg: ExpertsConfig, n_experts: int, device: torch.device, ddp: Dist, train_images: int,
                  choice: tuple[bool, str] | None = None) -> str:
    """:func:`choose_mode` (or its ``choice``, already made) in words: ``at once, 3 processes of 1
    thread(s) (2 cores, 2.0 free)``."""
    at_once, why = choice or choose_mode(cfg, n_experts, device, ddp, train_images)
    how = f"at once, {n_experts} processes of {worker_threads(cfg, n_experts)} thread(s)" if at_once else "one after another"
    return f"{how} ({why})"


def worker_threads(cfg: ExpertsConfig, n_workers: int) -> int:
    """Torch threads per expert process: the preset's choice (one, where it found more threads slower
    on a shared machine), else an equal share of the cores."""
    return cfg.preset.cpu_threads or max(1, len(usable_cores()) // n_workers)


def _train_all(cfg: ExpertsConfig, jobs: list[Job], splits: Splits, splits_run_id: str, upstream: dict,
               device: torch.device, ddp: Dist) -> dict[str, str]:
    """Train the experts ``jobs`` asks for, at once or one after another (:func:`choose_mode`), inside
    the active ``--expert all`` run; tag it with the expert runs and log its summary."""
    todo = [job for job in jobs if job.action != "skip"]
    for job in jobs:
        if job.action == "skip":
            click.echo(f"{job.name}: run {job.run_id} already FINISHED")
    choice = choose_mode(cfg, len(todo), device, ddp, len(splits.indices["train"]))
    at_once = choice[0]
    if todo:  # the mode said is the mode taken: one sample of the free cores
        click.echo(f"experts: training {', '.join(job.name for job in todo)} "
                   f"{describe_mode(cfg, len(todo), device, ddp, len(splits.indices['train']), choice)}")
    ids = {job.name: job.run_id for job in jobs if job.action == "skip"}
    if at_once:
        ids.update(_train_at_once(cfg, todo, splits_run_id, upstream))
    elif todo:
        data = load_data(splits, splits_run_id, cfg, device)
        for job in todo:
            kwargs = {"resume_run_id": job.run_id} if job.action == "resume" else {"run_name": f"expert-{job.name}"}
            with tracking.stage_run("experts", cfg.dataset, dataclasses.replace(cfg, expert=job.name).params(),
                                    upstream=upstream, tags={stage_registry.TAG_EXPERT: job.name}, system_metrics=True,
                                    **kwargs) as active:
                state = load_checkpoint(active.info.run_id) if job.action == "resume" else None
                if job.action == "start":
                    tracking.log_split_inputs(splits, ("train", "val", "tunev", "test"))
                _train_and_log(job.name, cfg, data, device, ddp, state, active.info.run_id)
                ids[job.name] = active.info.run_id
    ids = {name: ids[name] for name in cfg.experts()}
    mlflow.set_tags({expert_run_tag(n): i for n, i in ids.items()})
    _log_summary(ids, splits)
    return ids


@dataclasses.dataclass(frozen=True)
class WorkerJob:
    """What one expert process needs: everything travels by value (the process is spawned)."""

    job: Job  # resume or start, with the run it works in
    cfg: ExpertsConfig
    splits_run_id: str
    upstream: dict
    tracking_uri: str
    threads: int
    position: int


def _train_at_once(cfg: ExpertsConfig, todo: list[Job], splits_run_id: str, upstream: dict) -> dict[str, str]:
    """One spawned process per expert, each in its own child run of the active run (created here, so
    that a killed stage leaves them under their parent to be resumed); wait for all. A process that
    fails or dies leaves its run FAILED and the stage fails with one line naming it, after the others
    finished (their runs are reused by the next attempt)."""
    import multiprocessing

    client = mlflow.MlflowClient()
    parent = mlflow.active_run()
    jobs = []
    for job in todo:
        if job.action == "start":
            run = client.create_run(parent.info.experiment_id, run_name=f"expert-{job.name}",
                                    tags={"mlflow.parentRunId": parent.info.run_id, stage_registry.TAG_EXPERT: job.name})
            job = Job(job.name, "start", run.info.run_id)
        jobs.append(job)
    threads = worker_threads(cfg, len(jobs))
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_expert_process, name=f"argse-expert-{job.name}", args=(
        WorkerJob(job, cfg, splits_run_id, dict(upstream), mlflow.get_tracking_uri(), threads, i),))
        for i, job in enumerate(jobs)]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join()
    except BaseException:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=30)
        raise
    failed = []
    for job, process in zip(jobs, processes):
        run = client.get_run(job.run_id)
        if run.info.status == "FINISHED":
            continue
        reason = run.data.tags.get(tracking.TAG_FAILURE) or f"its process ended with exit code {process.exitcode}"
        if run.info.status == "RUNNING":  # it died without ending its run
            client.set_tag(job.run_id, tracking.TAG_FAILURE, reason[:1000])
            client.set_terminated(job.run_id, "FAILED")
        failed.append(f"{job.name} (run {job.run_id}): {reason}")
    if failed:
        raise ArgseError("expert training failed: " + "; ".join(failed) + "; rerun the command to resume")
    return {job.name: job.run_id for job in jobs}


def _exit_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux), so that killing the stage, even
    with SIGKILL, stops its expert processes too."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _expert_process(work: WorkerJob) -> None:
    """The body of one expert process: train, calibrate and log one expert in its run."""
    _exit_with_parent()
    torch.set_num_threads(work.threads)
    apply_portable_kernels(work.cfg.preset)
    tracking.configure(work.tracking_uri)
    os.environ.pop("MLFLOW_RUN_ID", None)
    job, cfg = work.job, work.cfg
    try:
        with tracking.stage_run("experts", cfg.dataset, dataclasses.replace(cfg, expert=job.name).params(),
                                upstream=work.upstream, resume_run_id=job.run_id, tags={stage_registry.TAG_EXPERT: job.name},
                                system_metrics=True):
            device = resolve_device(cfg.device)
            splits = load_splits(work.splits_run_id)
            state = load_checkpoint(job.run_id) if job.action == "resume" else None
            if job.action == "start":
                tracking.log_split_inputs(splits, ("train", "val", "tunev", "test"))
            data = load_data(splits, work.splits_run_id, cfg, device)
            _train_and_log(job.name, cfg, data, device, Dist(), state, job.run_id, work.position)
    except BaseException as exc:  # recorded on the run; the stage reports it in one line
        log.debug("the %s expert failed: %s", job.name, exc, exc_info=True)
        sys.exit(1)


def _train_and_log(name: str, cfg: ExpertsConfig, data: Data, device: torch.device, ddp: Dist,
                   resume: dict | None, run_id: str, position: int = 0) -> None:
    expert = train_expert(name, cfg, data, device, ddp, resume, run_id, position)
    metrics = calibrate_and_log(name, expert, data, device)
    groups = data.splits.group_names
    click.echo(f"{name}: run {run_id}, val balanced acc {fmt_number(metrics['final_val_balanced_acc'])} ("
               + ", ".join(f"{g} {fmt_number(metrics[f'final_val_acc_{g}'])}" for g in groups)
               + f"), temperature {fmt_number(metrics['temperature'])}")


def _log_summary(ids: dict[str, str], splits: Splits) -> None:
    """On the parent run: per-group val accuracy of each expert, as metrics and a figure."""
    from argse import figures

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


def _resume(cfg: ExpertsConfig, device: torch.device, experiment: str | None) -> dict[str, str]:
    try:
        run = mlflow.MlflowClient().get_run(tracking.run_id_of(cfg.resume))
    except mlflow.exceptions.MlflowException:
        raise ArgseError(f"--resume {cfg.resume}: no such run on {mlflow.get_tracking_uri()}") from None
    tags = run.data.tags
    if tags.get(tracking.TAG_STAGE) != "experts":
        raise ArgseError(f"--resume {cfg.resume} is not an experts run (stage {tags.get(tracking.TAG_STAGE)})")
    if tags.get(tracking.TAG_DATASET) != cfg.dataset:
        raise ArgseError(f"--resume {cfg.resume} is a {tags.get(tracking.TAG_DATASET)} run: pass --dataset {tags.get(tracking.TAG_DATASET)}")
    if run.info.status != "FINISHED":
        why = tracking.claim(run.info.run_id)  # never two processes on one run
        if why is not None:
            raise ArgseError(f"not resuming run {run.info.run_id}: {why}")
    if tags.get(stage_registry.TAG_EXPERT) == "all":
        return _resume_all(run, cfg, device, experiment)
    if run.info.status == "FINISHED":
        click.echo(f"run {run.info.run_id} is already FINISHED; nothing to resume")
        return {tags[stage_registry.TAG_EXPERT]: run.info.run_id}
    cfg = _config_from_run(run, cfg)
    name = cfg.expert
    with tracking.stage_run("experts", cfg.dataset, cfg.params(), upstream=EXPERTS_STAGE.upstream(splits=cfg.splits_run),
                            resume_run_id=run.info.run_id, tags={stage_registry.TAG_EXPERT: name}, system_metrics=True):
        state = load_checkpoint(run.info.run_id)
        splits = load_splits(cfg.splits_run)
        data = load_data(splits, cfg.splits_run, cfg, device)
        _train_and_log(name, cfg, data, device, Dist(), state, run.info.run_id)
    return {name: run.info.run_id}


def _resume_all(parent, cfg: ExpertsConfig, device: torch.device, experiment: str | None) -> dict[str, str]:
    """Resume a ``--expert all`` parent: finished experts stay, a killed one continues from its
    checkpoint, a missing one starts (:func:`plan`), at once or one after another."""
    client = mlflow.MlflowClient()
    cfg = dataclasses.replace(_config_from_run(parent, cfg), expert="all").resolve()
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time DESC"])
    upstream = EXPERTS_STAGE.upstream(splits=cfg.splits_run)
    with tracking.stage_run("experts", cfg.dataset, cfg.params(), upstream=upstream,
                            resume_run_id=parent.info.run_id, tags={stage_registry.TAG_EXPERT: "all"}):
        splits = load_splits(cfg.splits_run)
        ids = _train_all(cfg, plan(cfg, children), splits, cfg.splits_run, upstream, device, Dist())
    return {**ids, "all": parent.info.run_id}


def load_expert_logits(run_id: str, split: str) -> dict[str, np.ndarray]:
    """``logits``, ``labels`` and ``indices`` of an expert run's ``logits/<split>.npz`` (:data:`LOGITS`)."""
    with np.load(tracking.download(run_id, logits_path(split))) as npz:
        return {key: npz[key] for key in ("logits", "labels", "indices")}


__all__ = ["run", "load_expert_logits", "accuracy_metrics", "ExpertModel"]
