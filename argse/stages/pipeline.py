"""The pipeline: splits -> experts -> gating (pretrain, selective) -> argse -> evaluate, as child runs
of one parent run tagged ``argse.stage=pipeline``, each handed the run ids it must consume.

Reuse: a stage is skipped when a FINISHED run of it has the same config hash (all params, upstream
run ids included) and the same code version. Stages before ``--start-from`` must be reusable; stages
from ``--start-from`` on are rerun when ``--force`` is given or ``--start-from`` is not ``data``.
An experts run with the same hash that did not finish (the pipeline was killed) is resumed from its
checkpoints, in the same runs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import click
import mlflow
from mlflow.tracking import MlflowClient

from argse import ArgseError, stage_registry, tracking
from argse.pipeline_config import PipelineConfig
from argse.stage_registry import PIPELINE_PLAN, PIPELINE_STEPS, PipelineStep
from argse.stages import reuse


@dataclass
class Step:
    """One stage of the plan: its config, the upstream ids its hash includes, and what happened."""

    plan: PipelineStep  # its name, stage and mode, from the stage registry
    config: object
    upstream: dict[str, str] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    action: str = ""  # reused, ran, resumed, would reuse, would run

    @property
    def name(self) -> str:  # splits, experts, gating-pretrain, gating-selective, argse, evaluate
        return self.plan.name

    @property
    def stage(self) -> str:  # the argse.stage tag
        return self.plan.stage.name

    @property
    def hash(self) -> str:
        return tracking.config_hash(self.stage, self.config.params(), self.upstream)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, experiment: str | None):
        self.cfg = cfg
        self.experiment = experiment
        self.configs = cfg.stage_configs()  # every step's config, from the options given to the pipeline
        self.start = PIPELINE_STEPS.index(cfg.start_from)
        self.stop = PIPELINE_STEPS.index(cfg.stop_at)
        self.steps: list[Step] = []
        # pipeline step -> the value its consumers record: its run id; for experts, the three expert
        # run ids (stage_registry.join_expert_runs)
        self.ids: dict[str, str] = {}

    # -- wiring: each stage's config gets the ids it consumes -----------------------------------

    def _wire(self, plan: PipelineStep) -> tuple[object, dict[str, str]]:
        """The stage's config with its upstream references set, and the upstream dict its hash uses
        (the same one the stage tags its run with): both from the inputs the registry declares."""
        handed = {i.option: self.ids.get(i.step) for i in plan.inputs if i.option}
        ids = {i.key: self.ids.get(i.step) for i in plan.inputs}
        return dataclasses.replace(self.configs[plan.name], **handed), plan.stage.upstream(plan.mode, **ids)

    # -- running ----------------------------------------------------------------------------------

    def execute(self, dry_run: bool) -> None:
        upstream_fresh = False  # once a stage runs, every later one must run too (new ids)
        for plan in PIPELINE_PLAN:
            name, stage, index = plan.name, plan.stage.name, PIPELINE_STEPS.index(plan.stage.step)
            if index > self.stop:
                break
            if upstream_fresh and dry_run:
                self.steps.append(Step(plan, self.configs[name], action="would run"))
                continue
            config, upstream = self._wire(plan)
            step = Step(plan, config, upstream, plan.lineage)
            self.steps.append(step)
            rerun = index >= self.start and (self.cfg.force or self.start > 0)
            cached = None if rerun else tracking.find_cached_run(
                stage, step.hash, tracking.code_version(), dataset=self.cfg.dataset, experiment=self.experiment,
                lineage=step.lineage)
            damaged = None if cached is None or dry_run else reuse.damage(plan.stage, cached)
            if damaged is not None:
                click.echo(f"{name}: run {cached.info.run_id} is not reused: {damaged}; running the stage again")
                cached = None
            if index < self.start and cached is None:
                raise ArgseError(
                    f"--start-from {self.cfg.start_from} needs a FINISHED {name} run with this configuration to "
                    f"reuse and there is none: run the pipeline without --start-from first")
            if cached is not None:
                step.run_id, step.action = cached.info.run_id, ("would reuse" if dry_run else "reused")
                self._record(plan, cached)
                if stage == "argse" and not dry_run:
                    self._repair_champion(config.register_name)
                continue
            if dry_run:
                step.action = "would run"
                upstream_fresh = True
                continue
            self._run_stage(step)
            upstream_fresh = True

    def _record(self, plan: PipelineStep, run) -> None:
        if plan.stage is stage_registry.EXPERTS_STAGE:
            self.ids[plan.name] = stage_registry.join_expert_runs(stage_registry.expert_runs_of_parent(run.data.tags))
        else:
            self.ids[plan.name] = run.info.run_id

    def _run_stage(self, step: Step) -> None:
        from argse.stages import argse as argse_stage
        from argse.stages import evaluate, experts, gating, splits

        started = time.perf_counter()
        client = MlflowClient()
        if step.stage == "experts":
            ids = self._resume_experts(step)
            if ids is None:
                ids = experts.run(step.config, experiment=self.experiment)
                step.action = "ran"
            step.run_id = ids["all"]
        else:
            module = {"splits": splits, "gating": gating, "argse": argse_stage, "evaluate": evaluate}[step.stage]
            step.run_id = module.run(step.config, experiment=self.experiment)
            step.action = "ran"
        self._record(step.plan, client.get_run(step.run_id))
        click.echo(f"{step.name}: {step.action} in {time.perf_counter() - started:.1f} s")

    def _repair_champion(self, name: str) -> None:
        """A reused fit may be the one whose process died before moving ``champion``: settle the alias
        on the best FINISHED version (it says so when it moved)."""
        from argse.registry import crown

        decision = crown(name)
        if decision.startswith("moved"):
            click.echo(f"argse: {decision}")

    def _resume_experts(self, step: Step) -> dict[str, str] | None:
        """Resume an unfinished experts run with this configuration that no live process works on;
        ``None`` (a fresh run is due) when there is none or it cannot be resumed. Says which, in one line."""
        from argse.stages import experts

        if self.cfg.force:
            return None
        unfinished, passed_over = tracking.find_resumable_run(
            "experts", step.hash, tracking.code_version(), dataset=self.cfg.dataset, experiment=self.experiment,
            lineage=step.lineage)
        if unfinished is None:
            if passed_over:
                click.echo(f"experts: not resuming {passed_over}; starting a new run")
            return None
        run_id = unfinished.info.run_id
        click.echo(f"experts: resuming unfinished run {run_id} from its checkpoints")
        try:
            ids = experts.run(dataclasses.replace(step.config, resume=run_id), experiment=self.experiment)
        except tracking.RunBroken as exc:
            click.echo(f"experts: run {run_id} cannot be resumed ({exc}); starting a fresh run")
            return None
        step.action = "resumed"
        return ids


def run(cfg: PipelineConfig, *, experiment: str | None = None) -> str | None:
    """Run the chain; return the pipeline run's id (``None`` for a dry run)."""
    pipeline = Pipeline(cfg, experiment)
    if cfg.dry_run:
        if os.environ.get("MLFLOW_RUN_ID"):
            # `mlflow run` made a run before this process started; say what it is.
            MlflowClient().set_tag(os.environ["MLFLOW_RUN_ID"], stage_registry.TAG_DRY_RUN, "true")
        pipeline.execute(dry_run=True)
        click.echo(f"pipeline plan for {cfg.dataset} (dry run: no run created; --start-from {cfg.start_from}, "
                   f"--stop-at {cfg.stop_at}{', --force' if cfg.force else ''})")
        for step in pipeline.steps:
            click.echo(f"  {step.name:<17} {step.action:<12} {step.run_id or ''}")
        return None

    started = time.perf_counter()
    with tracking.stage_run("pipeline", cfg.dataset, cfg.params(), experiment=experiment, run_name="pipeline") as parent:
        wait_for_twin(parent, cfg.dataset, experiment)
        pipeline.execute(dry_run=False)
        mlflow.set_tags({stage_registry.TAG_STEP + s.name: f"{s.action} {s.run_id}" for s in pipeline.steps})
        mlflow.log_metrics({"stages_reused": float(sum(s.action == "reused" for s in pipeline.steps)),
                            "stages_run": float(sum(s.action in ("ran", "resumed") for s in pipeline.steps)),
                            "seconds": time.perf_counter() - started})
        click.echo(f"pipeline run {parent.info.run_id} ({time.perf_counter() - started:.1f} s):")
        for step in pipeline.steps:
            click.echo(f"  {step.name:<17} {step.action:<8} {step.run_id}")
        _finale(pipeline)
        return parent.info.run_id


#: A pipeline waits this long after its run exists before it looks for a twin, so that two started at
#: the same moment (two machines on one team server) both see each other and agree who goes first.
TWIN_SETTLE_S = 1.0


def live_twins(run, dataset: str, experiment: str | None) -> list:
    """The live pipeline runs with the configuration hash and code of ``run`` that started before it
    (ties broken by run id): another process is working on the same stages right now."""
    tags = run.data.tags
    exp_ids = tracking.search_experiment_ids(dataset, experiment)
    found = MlflowClient().search_runs(exp_ids, filter_string=(
        f"tags.\"{tracking.TAG_STAGE}\" = 'pipeline' and tags.\"{tracking.TAG_HASH}\" = '{tags[tracking.TAG_HASH]}' "
        f"and tags.\"{tracking.TAG_CODE}\" = '{tags[tracking.TAG_CODE]}' and attributes.status = 'RUNNING'"))
    mine = (run.info.start_time, run.info.run_id)
    return [r for r in found if (r.info.start_time, r.info.run_id) < mine and tracking.liveness(r).alive]


def wait_for_twin(parent, dataset: str, experiment: str | None) -> None:
    """Wait while a twin (:func:`live_twins`) works, so that this pipeline then reuses what it made
    instead of training the same stages a second time; a twin that dies stops the wait (its unfinished
    experts are then resumed here). Said in one line."""
    time.sleep(TWIN_SETTLE_S)
    client = MlflowClient()
    said = False
    while True:
        run = client.get_run(parent.info.run_id)
        twins = live_twins(run, dataset, experiment)
        if not twins:
            return
        if not said:
            click.echo(f"pipeline: run {twins[0].info.run_id} with this configuration is live and started first; "
                       "waiting for it, then reusing its stages")
            said = True
        time.sleep(tracking.HEARTBEAT_S)


def _finale(pipeline: Pipeline) -> None:
    """Name the pipeline run by what it did; the evaluate table (also when it was reused), the
    registry's state, the verdict a person asks for (which model is registered and why, and how it
    compares with what they would use otherwise), logged as the run's headline metrics, and how to
    serve the model and look at it all."""
    client = MlflowClient()
    client.update_run(mlflow.active_run().info.run_id,
                      name=f"{tracking.top_level_name('pipeline', pipeline.cfg.dataset)}: {_what_ran(pipeline.steps)}")
    evaluate_id = pipeline.ids.get("evaluate")
    table = None
    if evaluate_id:
        import pandas as pd

        table = pd.read_csv(tracking.download(evaluate_id, f"{stage_registry.RESULTS_DIR}/{stage_registry.RESULTS_TABLE}"))
        if any(s.name == "evaluate" and s.action == "reused" for s in pipeline.steps):
            from argse.stages.evaluate import summary_markdown

            click.echo(f"evaluate run {evaluate_id} (reused):")
            click.echo(summary_markdown(table))
    register_name = pipeline.configs["argse"].register_name
    argse_step = next((s for s in pipeline.steps if s.name == "argse" and s.run_id), None)
    if argse_step is not None and argse_step.action == "reused":
        click.echo(f"argse run {argse_step.run_id} (reused): nothing registered; "
                   + _registry_state(client, argse_step.run_id, register_name))
    elif argse_step is not None:
        decision = client.get_run(argse_step.run_id).data.tags.get(stage_registry.TAG_CHAMPION_DECISION, "")
        if decision:
            click.echo(f"argse run {argse_step.run_id}: {decision}")
    if table is not None and argse_step is not None:
        for line in verdict(pipeline, table, client, argse_step.run_id):
            click.echo(line)
    uri = tracking.absolute_uri(mlflow.get_tracking_uri())
    home = tracking.home_experiment(pipeline.cfg.dataset, pipeline.experiment)
    if argse_step is not None:
        click.echo(f"the model: models:/{register_name}@champion; serve it (from any folder):")
        click.echo(f"  MLFLOW_TRACKING_URI={uri} mlflow models serve -m models:/{register_name}@champion "
                   "--env-manager local --host 127.0.0.1 --port 5001")
    experiment_id = mlflow.active_run().info.experiment_id
    if uri.startswith("http"):
        click.echo(f"see the runs: {tracking.runs_page(experiment_id, uri)} (the run list of {home})")
    else:
        click.echo(f"see the runs: mlflow ui --backend-store-uri {uri}  (then open {tracking.runs_page(experiment_id)}: "
                   f"the run list of {home})")


#: The run list's headline columns show about 14 characters of a metric's name (MLflow 3.17, Chromium):
#: the names differ within them. The area first (``worst/``, ``balanced/``: the run's charts group by it),
#: then whose: the registered model, the best Chow rule, the best single-expert plug-in.
HEADLINE_WHO = {"registered": "registered", "best_chow": "chow", "best_expert_plugin": "expert"}


def headline_metrics(head) -> dict[str, float]:
    """The pipeline run's headline metrics from :func:`argse.selective.compare.headline`'s rows, named
    ``<area>/<who>`` (:data:`HEADLINE_WHO`): ``worst/registered``, ``worst/chow``, ``balanced/expert``, ..."""
    from argse.selective.compare import AREAS

    metrics = {}
    for area in AREAS:
        short = area.removeprefix("aurc_")
        rows = {"registered": head.registered, "best_chow": head.best_chow.get(area),
                "best_expert_plugin": head.best_expert_plugin.get(area)}
        metrics.update({f"{short}/{HEADLINE_WHO[who]}": float(row[area]) for who, row in rows.items()
                        if row is not None})
    return metrics


def verdict(pipeline: Pipeline, table, client: MlflowClient, argse_run_id: str) -> list[str]:
    """The lines that say what the pipeline registered and why, and how its test areas compare with the
    best Chow row and the best single-expert plug-in; the same numbers become the pipeline run's
    headline metrics (:func:`headline_metrics`), so the run list can rank pipelines."""
    from argse import EXPERTS
    from argse.selective.compare import headline

    objective = pipeline.configs["argse"].objective
    head = headline(table, objective, EXPERTS)
    mlflow.log_metrics(headline_metrics(head))
    gating = client.get_run(pipeline.ids["gating-selective"]).data.metrics
    if gating.get("final_kept_uniform", 0.0) == 1.0:
        lo, hi = gating.get("final_gate_minus_uniform_val_aurc_lo"), gating.get("final_gate_minus_uniform_val_aurc_hi")
        why = ("the gate did not beat the plain average of the experts on val"
               + (f" (95% interval of its AURC difference [{lo:.4f}, {hi:.4f}], not below 0)" if hi is not None else "")
               + ", so the model is the plain average")
    else:
        why = "the gate beat the plain average of the experts on val beyond its noise, so the model is the gated mixture"
    prior = pipeline.configs["evaluate"].test_prior
    lines = [f"verdict: {why}, with the plug-in rule for the {objective} error."]
    for area, label in (("aurc_worst", "worst-group"), ("aurc_balanced", "balanced")):
        parts = [f"{head.registered[area]:.4f}"]
        if area in head.best_chow:
            parts.append(f"best Chow {head.best_chow[area][area]:.4f} ({head.best_chow[area]['method']})")
        if area in head.best_expert_plugin:
            row = head.best_expert_plugin[area]
            parts.append(f"best single-expert plug-in {row[area]:.4f} ({row['method']})")
        lines.append(f"  {label} error area on test ({prior} prior), lower is better: registered model "
                     + "; ".join(parts))
    return lines


def _what_ran(steps: list[Step]) -> str:
    """``ran splits..evaluate``; ``reused splits..experts, ran gating-pretrain..evaluate``."""
    spans: list[list[str]] = []  # [action, first step, last step]
    for step in steps:
        if spans and spans[-1][0] == step.action:
            spans[-1][2] = step.name
        else:
            spans.append([step.action, step.name, step.name])
    return ", ".join(f"{action} {first}" + (f"..{last}" if last != first else "") for action, first, last in spans)


def _registry_state(client: MlflowClient, run_id: str, name: str) -> str:
    """Which version of ``name`` holds this run's model, and where ``champion`` points."""
    from mlflow.exceptions import MlflowException

    from argse.registry import CHAMPION

    mine = client.get_run(run_id).data.tags.get(stage_registry.TAG_REGISTERED_MODEL, "").rpartition("/")[2]
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return f"{name} has no {CHAMPION}" + (f"; this run's model is v{mine}" if mine else "")
    if champion.run_id == run_id:
        return f"{name}@{CHAMPION} is v{champion.version}, this run's model"
    return (f"{name}@{CHAMPION} is v{champion.version} (run {champion.run_id})"
            + (f"; this run's model is v{mine}" if mine else ""))
