"""The experts stage: train ce / logitadjust / balsoftmax on a splits run, calibrate, log.

The stage wires: it resolves the splits run (or, for ``--resume RUN_ID``, the run to continue and
the options it was started with: :mod:`argse.expert_runs.resume`), opens its run and hands the
training below (:func:`argse.expert_runs.at_once.train_experts`). One MLflow run per expert (tag
``argse.expert``), children of one parent run when ``--expert all``, trained one after another or at
once in spawned processes; each expert is trained by :mod:`argse.training.experts`, then calibrated
and logged by :mod:`argse.expert_runs.run`, which says what an expert run leaves for the later stages.

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) the experts train with DistributedDataParallel
(:mod:`argse.training.distributed`): only rank 0 talks to MLflow; ``--batch-size`` is the global batch.
"""

from __future__ import annotations

import click

from argse import ArgseUsageError, stage_registry, tracking
from argse.config import ExpertsConfig
from argse.expert_runs import resume
from argse.expert_runs.at_once import check_at_once, describe, train_experts
from argse.stage_registry import EXPERTS_STAGE
from argse.training import distributed
from argse.training.distributed import Dist
from argse.training.utils import resolve_device


def upstream(cfg: ExpertsConfig, experiment: str | None) -> dict[str, str]:
    """The runs an experts run of ``cfg`` reads, as its run records them: the splits run."""
    splits = tracking.resolve_upstream("splits", cfg.splits_run, dataset=cfg.dataset, experiment=experiment)
    return EXPERTS_STAGE.upstream(splits=splits.info.run_id)


def run(cfg: ExpertsConfig, *, experiment: str | None = None) -> dict[str, str]:
    """Run the stage; return ``{expert: run_id}`` plus ``"all"``: the parent's id with ``--expert all``
    (empty for a dry run or on ranks other than 0)."""
    ddp = Dist.from_env()
    if ddp.world_size > 1 and cfg.resume:
        raise ArgseUsageError("--resume is not supported under torchrun; resume on one process")
    if not cfg.resume:  # a resumed run's experts are known once its run is read
        check_at_once(cfg, ddp)
    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        raise ArgseUsageError(str(exc)) from None
    if cfg.dry_run:
        if ddp.main:
            splits_run_id = upstream(cfg, experiment)["splits_run"]
            lines = describe(cfg, splits_run_id, device)
            click.echo("\n".join([cfg.dry_run_header("experts"), *("  " + line for line in lines)]))
        return {}
    if ddp.world_size > 1 and cfg.batch_size % ddp.world_size:
        raise ArgseUsageError(f"--batch-size {cfg.batch_size} must be divisible by the {ddp.world_size} processes")
    resumed = resume.read(cfg, experiment) if cfg.resume else None
    if resumed is not None:
        cfg = resumed.cfg
        if resumed.finished:
            click.echo(f"run {resumed.run_id} is already FINISHED; nothing to resume")
            return {cfg.expert: resumed.run_id}
    device = distributed.start(ddp, device)
    try:
        if not ddp.main:
            return train_experts(cfg, None, device, ddp)
        single = len(cfg.experts()) == 1
        label = cfg.experts()[0] if single else "all"
        with tracking.stage_run("experts", cfg.dataset, cfg.params(), experiment=experiment,
                                run_name=f"expert-{label}" if single else "experts", tags={stage_registry.TAG_EXPERT: label},
                                resume_run_id=resumed and resumed.run_id, system_metrics=single) as outer:
            inputs = upstream(cfg, experiment)
            tracking.set_upstream("experts", cfg.params(), inputs)
            ids = train_experts(cfg, inputs, device, ddp, outer.info.run_id, resumed)
    finally:
        distributed.stop(ddp)
    if single:
        return ids
    click.echo(f"experts run {outer.info.run_id}: " + ", ".join(f"{n} {i}" for n, i in ids.items()))
    return {**ids, "all": outer.info.run_id}
