"""Training the experts of a stage's run (:func:`train_experts`): one expert in that run, or the
children of an ``--expert all`` run: which to skip, resume or start (:func:`plan`), trained one after
another in this process or at once, one spawned process each (:func:`choose_mode` decides, and says
why), each in its own child run with its own seed, optimizer, schedule, batch order, checkpoints and
resume, so the results are bitwise those of training them one after another. :func:`describe` says
all that (and what it will cost) for ``--dry-run``.

A process that fails or dies leaves its run FAILED, and the stage fails with one line naming it after
the others finished (their runs are reused by the next attempt). Killing the stage kills its expert
processes too (:mod:`argse.training.processes`); the next run resumes each from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import click
import mlflow
import torch

from argse import ArgseError, ArgseUsageError, stage_registry, tracking
from argse.artifacts import load_checkpoint, load_splits
from argse.config import ExpertsConfig
from argse.data.splits import Splits
from argse.expert_runs.resume import Resumed
from argse.expert_runs.run import load_images, log_summary, recipe, train_and_log
from argse.presets import apply_portable_kernels
from argse.training import distributed
from argse.training.distributed import Dist
from argse.training.estimate import estimate
from argse.training.processes import run_all
from argse.training.utils import free_cores, resolve_device, usable_cores

log = logging.getLogger(__name__)

#: Below this many training images per expert (images x epochs), starting three processes (each
#: imports torch and MLflow and reads the data, a few seconds) costs about what training at once
#: saves: digits-lt's experts see 9,000, fashion-mnist-lt's 300,000 (bench/experts_at_once.py).
AT_ONCE_MIN_IMAGES = 100_000


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


# -- at once, or one after another ------------------------------------------------------------------


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


# -- training -------------------------------------------------------------------------------------


def train_experts(cfg: ExpertsConfig, upstream: dict | None, device: torch.device, ddp: Dist,
                  run_id: str | None = None, resumed: Resumed | None = None) -> dict[str, str]:
    """Train ``cfg``'s experts on the splits run ``upstream`` names, in the active run ``run_id``: one
    expert in it (from its checkpoint when ``resumed``), or all as its children (:func:`train_all`; a
    resumed parent's children as :func:`plan` says). Under torchrun the other ranks (no run, no
    ``upstream``) train every expert alongside rank 0, on the splits it read; they return nothing."""
    single = len(cfg.experts()) == 1
    state = load_checkpoint(run_id) if resumed and single else None
    splits_run_id = upstream["splits_run"] if ddp.main else None
    splits, splits_run_id = distributed.from_main(ddp, (load_splits(splits_run_id), splits_run_id) if ddp.main else None)
    if ddp.main and not single:
        return train_all(cfg, plan(cfg, resumed.children if resumed else []), splits, splits_run_id, upstream, device, ddp)
    images = load_images(cfg, splits, device)
    for name in cfg.experts():
        if ddp.main and not resumed:
            tracking.log_split_inputs(splits, ("train", "val", "tunev", "test"))
        train_and_log(name, cfg, splits, splits_run_id, images, device, ddp, state, run_id)
    return {cfg.expert: run_id} if ddp.main else {}


def describe(cfg: ExpertsConfig, splits_run_id: str, device: torch.device) -> list[str]:
    """What ``--dry-run`` says: the splits run, the experts and their network, the training's FLOPs,
    the mode (at once or one after another, and why) and its cost on ``device``, measured."""
    splits = load_splits(splits_run_id)
    how = recipe(cfg, device)
    n_train = len(splits.indices["train"])
    network, cost, timing = estimate(how, splits, image_shape=cfg.preset.image_shape,
                                     augmentation=cfg.preset.augmentation, device=device, experts=len(cfg.experts()))
    return [f"splits run: {splits_run_id} ({n_train} train images, {splits.num_classes} classes)",
            f"experts: {', '.join(cfg.experts())}; {network}", cost,
            f"mode: {describe_mode(cfg, len(cfg.experts()), device, Dist.from_env(), n_train)}", timing]


def train_all(cfg: ExpertsConfig, jobs: list[Job], splits: Splits, splits_run_id: str, upstream: dict,
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
        images = load_images(cfg, splits, device)
        for job in todo:
            kwargs = {"resume_run_id": job.run_id} if job.action == "resume" else {"run_name": f"expert-{job.name}"}
            with tracking.stage_run("experts", cfg.dataset, dataclasses.replace(cfg, expert=job.name).params(),
                                    upstream=upstream, tags={stage_registry.TAG_EXPERT: job.name}, system_metrics=True,
                                    **kwargs) as active:
                state = load_checkpoint(active.info.run_id) if job.action == "resume" else None
                if job.action == "start":
                    tracking.log_split_inputs(splits, ("train", "val", "tunev", "test"))
                train_and_log(job.name, cfg, splits, splits_run_id, images, device, ddp, state, active.info.run_id)
                ids[job.name] = active.info.run_id
    ids = {name: ids[name] for name in cfg.experts()}
    mlflow.set_tags({stage_registry.expert_run_tag(n): i for n, i in ids.items()})
    log_summary(ids, splits)
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
    works = [WorkerJob(job, cfg, splits_run_id, dict(upstream), mlflow.get_tracking_uri(), threads, i)
             for i, job in enumerate(jobs)]
    exit_codes = run_all(expert_process, works, [f"argse-expert-{job.name}" for job in jobs])
    failed = []
    for job, exit_code in zip(jobs, exit_codes):
        run = client.get_run(job.run_id)
        if run.info.status == "FINISHED":
            continue
        reason = run.data.tags.get(tracking.TAG_FAILURE) or f"its process ended with exit code {exit_code}"
        if run.info.status == "RUNNING":  # it died without ending its run
            client.set_tag(job.run_id, tracking.TAG_FAILURE, reason[:1000])
            client.set_terminated(job.run_id, "FAILED")
        failed.append(f"{job.name} (run {job.run_id}): {reason}")
    if failed:
        raise ArgseError("expert training failed: " + "; ".join(failed) + "; rerun the command to resume")
    return {job.name: job.run_id for job in jobs}


def expert_process(work: WorkerJob) -> None:
    """The body of one expert process: train, calibrate and log one expert in its run."""
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
            images = load_images(cfg, splits, device, copies=len(cfg.experts()))
            train_and_log(job.name, cfg, splits, work.splits_run_id, images, device, Dist(), state, job.run_id,
                          work.position)
    except BaseException as exc:  # recorded on the run; the stage reports it in one line
        log.debug("the %s expert failed: %s", job.name, exc, exc_info=True)
        sys.exit(1)
