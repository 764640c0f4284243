"""Reuse: a stage asked for what a FINISHED run already holds (same options, code and inputs) hands
over that run instead of making a new one, whether the pipeline asks or a stage is started alone
(``argse experts``, ``mlflow run . -e experts``). A run whose files changed since it logged them is not
reused."""

from __future__ import annotations

import os

import click
from mlflow.entities import Run

from argse import ArgseError, stage_registry, tracking
from argse.config import StageConfig


def damage(stage: stage_registry.Stage, run: Run) -> str | None:
    """Why ``run`` must not be reused (an artifact it logged has changed since), or None: every artifact
    of the run (and of an experts run's expert runs) against its recorded digest."""
    from argse.tracking.integrity import ArtifactChanged
    from argse.tracking.lookup import verify_run

    ids = [run.info.run_id]
    if stage is stage_registry.EXPERTS_STAGE:
        ids += [i for i in stage_registry.expert_runs_of_parent(run.data.tags).values() if i]
    for run_id in ids:
        try:
            verify_run(run_id)
        except ArtifactChanged as exc:
            return str(exc).removeprefix(f"run {run_id}: ")
        except ArgseError:  # logged before digests existed (or nothing to check): as it is
            continue
    return None


def finished_twin(cfg: StageConfig, upstream: dict[str, str], experiment: str | None) -> Run | None:
    """The newest FINISHED, undamaged run of ``cfg``'s stage with its options, this code and the inputs
    ``upstream`` (as the stage records them), if any."""
    stage = stage_registry.stage(cfg.STAGE)
    found = tracking.find_cached_run(stage.name, tracking.config_hash(stage.name, cfg.params(), upstream),
                                     tracking.code_version(), dataset=cfg.dataset, experiment=experiment)
    if found is not None and (why := damage(stage, found)) is not None:
        click.echo(f"{stage.command}: run {found.info.run_id} is not reused: {why}")
        return None
    return found


def reuse_alone(cfg: StageConfig, module, experiment: str | None) -> bool:
    """For a stage started alone: when a FINISHED run of it with these options, this code and the same
    inputs exists, say so in one line, leave ``mlflow run``'s own run as a launcher that names it, and
    return True (nothing runs). Under ``torchrun`` a stage always runs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    try:
        upstream = module.upstream(cfg, experiment)
    except ArgseError:  # an input is missing: the stage's own run says which, and fails
        return False
    found = finished_twin(cfg, upstream, experiment)
    if found is None:
        return False
    launched = os.environ.pop("MLFLOW_RUN_ID", None)
    stage = stage_registry.stage(cfg.STAGE)
    if launched and launched != found.info.run_id:
        tracking.point_launcher(launched, found, f"{stage.command} {cfg.dataset} reused a run of")
    click.echo(f"{stage.command}: reused FINISHED run {found.info.run_id} ({found.info.run_name}): the same options, "
               "code and inputs; nothing new was run (--rerun runs it again)")
    return True
