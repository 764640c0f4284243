"""``argse experts --resume RUN_ID``: which run continues, with which options (:func:`read`).

The run is an expert's (it continues from its last checkpoint) or the parent of an ``--expert all``
run (finished experts stay, a killed one resumes, a missing one starts:
:func:`argse.expert_runs.at_once.plan` reads its children). Either continues in the same run, with
the options it was started with. A run live in another process, or one that failed for a reason a
resume cannot fix, is refused with one line; the stage then trains as it would a fresh run.
"""

from __future__ import annotations

import dataclasses

import mlflow
from mlflow.entities import Run

from argse import ArgseError, stage_registry, tracking
from argse.config import ExpertsConfig


@dataclasses.dataclass(frozen=True)
class Resumed:
    """A run to continue: the run, the options it was started with, and (a parent's) its children."""

    run: Run
    cfg: ExpertsConfig
    children: list  # the child runs of an --expert all parent, newest first; none for an expert's run

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def finished(self) -> bool:
        """An expert's run that FINISHED: nothing to resume."""
        return self.run.info.status == "FINISHED" and self.cfg.expert != "all"


def config_from_run(run: Run, cfg: ExpertsConfig) -> ExpertsConfig:
    """The configuration a run was started with, for ``--resume``: every hashed option from its params
    (:meth:`~argse.config.StageConfig.restore`), the expert and the splits run from its tags."""
    return dataclasses.replace(cfg.restore(run.data.params),
                               expert=run.data.tags.get(stage_registry.TAG_EXPERT, cfg.expert),
                               splits_run=run.data.tags.get(stage_registry.TAG_UPSTREAM + "splits", cfg.splits_run)).resolve()


def read(cfg: ExpertsConfig, experiment: str | None) -> Resumed:
    """The experts run ``cfg.resume`` names, taken over by this process unless it FINISHED."""
    run = tracking.resolve_upstream("experts", cfg.resume, dataset=cfg.dataset, experiment=experiment,
                                    unfinished=True)
    if run.info.status != "FINISHED":
        why = tracking.claim(run.info.run_id)  # never two processes on one run
        if why is not None:
            raise ArgseError(f"not resuming run {run.info.run_id}: {why}")
    restored = config_from_run(run, cfg)
    if restored.expert != "all":
        return Resumed(run, restored, [])
    children = mlflow.MlflowClient().search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
        order_by=["attributes.start_time DESC"])
    return Resumed(run, restored, children)
