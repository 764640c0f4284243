"""The ``argse`` command's group and commands: one per stage (its options derived from its config,
:mod:`argse.cli.click_options`), each building its config and running its stage module, and the
tools (``verify``, ``status``, ``team``) that make no run.
"""

from __future__ import annotations

import os

import click

from argse import ArgseUsageError, __version__
from argse.cli.click_options import (
    Group,
    benchmark_options,
    click_option,
    config_options,
    pass_through_options,
    tracking_options,
)
from argse.config import (
    ArgseConfig,
    EvaluateConfig,
    ExpertsConfig,
    GatingConfig,
    SingleStageConfig,
    SplitsConfig,
    StageConfig,
)
from argse.options import options
from argse.pipeline_config import BenchmarkConfig, PipelineConfig, benchmark_pass_through, pipeline_options
from argse.presets import DATASETS as PRESETS_NAMES
from argse.presets import apply_compute_policy


def common(kwargs: dict) -> dict:
    """Set up tracking from the shared options; return the rest for the stage's config."""
    from argse import tracking

    ctx = click.get_current_context()
    group = ctx.find_root().params
    uri = kwargs.pop("tracking_uri", None) or group.get("tracking_uri")
    experiment = kwargs.pop("experiment", None) or group.get("experiment")
    kwargs["verbose"] = bool(kwargs.get("verbose") or group.get("verbose"))
    tracking.configure(uri)
    if kwargs.get("dry_run") and os.environ.get("MLFLOW_RUN_ID"):
        # `mlflow run` made a run before this process started; a dry run leaves it empty: say so.
        from mlflow.tracking import MlflowClient

        MlflowClient().update_run(os.environ["MLFLOW_RUN_ID"],
                                  name=f"{tracking.top_level_name(ctx.info_name, kwargs['dataset'])}: dry run")
    kwargs["_experiment"] = experiment
    return kwargs


def _system_lines(command: str, cfg: StageConfig) -> list[str]:
    """What ``--verbose`` and ``--dry-run`` say about the machine: versions, the resolved device and
    precision. Only expert training uses ``--device``; the other stages compute on the CPU."""
    import torch

    from argse.training.utils import describe_system, resolve_device, training_mode

    experts = cfg if isinstance(cfg, ExpertsConfig) else (
        cfg.stage_configs()["experts"] if isinstance(cfg, PipelineConfig) else None)
    if experts is None:
        return describe_system(torch.device("cpu"), False, scope="this stage computes on the CPU")
    try:
        device = resolve_device(experts.device)
    except ValueError as exc:
        raise ArgseUsageError(str(exc)) from None
    bf16, _ = training_mode(experts.precision, device, experts.preset.cpu_fast_path)
    return describe_system(device, bf16, device_option=experts.device, precision_option=experts.precision,
                           scope="expert training runs there, the other stages on the CPU" if command == "pipeline" else "")


def _run(cls: type, module: str, kwargs: dict, **extra) -> None:
    """Build the stage's config from its options, apply its dataset's CPU thread policy, and run the
    stage module ``argse.stages.<module>``."""
    import importlib

    from argse import stages
    from argse.stages.reuse import reuse_alone

    kwargs = common(kwargs)
    experiment = kwargs.pop("_experiment")
    cfg = cls(**kwargs, **extra).resolve()
    apply_compute_policy(cfg.preset)
    if (cfg.verbose or cfg.dry_run) and os.environ.get("RANK", "0") == "0":
        for line in _system_lines(click.get_current_context().info_name, cfg):
            click.echo(line)
    stage = importlib.import_module(f".{module}", package=stages.__name__)
    alone = isinstance(cfg, SingleStageConfig) and not (cfg.dry_run or cfg.rerun or getattr(cfg, "resume", None))
    if alone and reuse_alone(cfg, stage, experiment):
        return
    stage.run(cfg, experiment=experiment)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="argse", message="%(prog)s %(version)s")
@tracking_options
@click_option(options(StageConfig)[[o.name for o in options(StageConfig)].index("verbose")])
def cli(tracking_uri, experiment, verbose):
    """AR-GSE: long-tailed selective classification, one MLflow-tracked stage per command."""


@cli.command()
@config_options(SplitsConfig)
@tracking_options
def splits(**kwargs):
    """Create the long-tailed train set and the disjoint tunev / val / test splits."""
    _run(SplitsConfig, "splits", kwargs)


@cli.command()
@config_options(ExpertsConfig)
@tracking_options
def experts(**kwargs):
    """Train the long-tail experts (ce, logitadjust, balsoftmax) on a splits run."""
    _run(ExpertsConfig, "experts", kwargs)


@cli.command()
@config_options(GatingConfig)
@tracking_options
def gating(**kwargs):
    """Train the gating network over the experts' calibrated posteriors."""
    _run(GatingConfig, "gating", kwargs)


@cli.command("fit")
@config_options(ArgseConfig)
@tracking_options
def fit(**kwargs):
    """Fit the AR-GSE rejector on the gated mixture; log, register and maybe crown the model."""
    _run(ArgseConfig, "argse", kwargs)


@cli.command()
@config_options(EvaluateConfig)
@tracking_options
def evaluate(**kwargs):
    """Compare AR-GSE with its baselines on one split; log tables, metrics and RC figures."""
    _run(EvaluateConfig, "evaluate", kwargs)


@cli.command()
@config_options(PipelineConfig)
@pass_through_options
@tracking_options
def pipeline(**kwargs):
    """Run splits -> experts -> gating -> argse -> evaluate, reusing identical finished stages.

    A stage option reaches every stage that declares it (--cost: the selective gate and the fit); an
    option left at its default leaves each stage at its own default."""
    given = {p.name: kwargs.pop(p.name) for p in pipeline_options()}
    _run(PipelineConfig, "pipeline", kwargs, stage_options=given)


@cli.command()
@config_options(BenchmarkConfig)
@benchmark_options
@tracking_options
def benchmark(**kwargs):
    """Run the pipeline for several seeds (and test priors) side by side; summarise them in one run.

    Every pipeline option reaches each pipeline as `argse pipeline` takes it; a pipeline that finished
    with the same options is reused."""
    given = {p.name: kwargs.pop(p.name) for p in benchmark_pass_through()}
    _run(BenchmarkConfig, "benchmark", kwargs, stage_options=given)


#: Commands that are tools, not stages (they make no run).
TOOLS = ("status", "verify", "crown", "team")


@cli.command()
@click.argument("ref")
@tracking_options
def verify(ref, tracking_uri, experiment):
    """Check a run's artifacts (a model: models:/<name>@<alias>) against the digests the run recorded.

    REF is a run id, runs:/<id>/..., or models:/<name>@<alias> (the fit run of that version). Run it
    before serving a model someone else could have changed."""
    from argse import tracking
    from argse.tracking.lookup import verify_run

    tracking.configure(tracking_uri or click.get_current_context().find_root().params.get("tracking_uri"))
    run_id = tracking.run_id_of(ref)
    checked = verify_run(run_id)
    click.echo(f"run {run_id}: {len(checked)} file(s) are what the run logged ({', '.join(checked[:4])}"
               + (f", ... {len(checked) - 4} more)" if len(checked) > 4 else ")"))


@cli.command()
@click.argument("ref")
@tracking_options
def crown(ref, tracking_uri, experiment):
    """Make a registered version champion by hand: REF is models:/<name>/<version>.

    For a version the criterion does not compare with the champion (fitted on other splits, for
    another objective or prior): from then on the versions comparable with it compete. Its run must be
    a FINISHED fit whose files are what it logged."""
    from argse import tracking
    from argse.registry import crown_by_hand

    tracking.configure(tracking_uri or click.get_current_context().find_root().params.get("tracking_uri"))
    click.echo(crown_by_hand(ref))


@cli.command()
@click.option("--dataset", default=None, help=f"Only this dataset's runs ({', '.join(PRESETS_NAMES)}, or a folder's "
              "name; default: every argse run in every experiment).")
@click.option("--reap", is_flag=True, help="Mark FAILED the RUNNING runs whose process is gone.")
@tracking_options
def status(dataset, reap, tracking_uri, experiment):
    """List the RUNNING argse runs: owner, heartbeat age, live or dead; --reap marks the dead FAILED.

    A run is dead when its process is gone from this host, or when its heartbeat (every 5 s) is older
    than 60 s, wherever it ran: the wait a kill -9 on another machine costs."""
    from argse import tracking
    from argse.tracking.owners import mark_if_dead, running_runs

    ctx = click.get_current_context().find_root().params
    tracking.configure(tracking_uri or ctx.get("tracking_uri"))
    runs = running_runs(dataset, experiment or ctx.get("experiment"))
    if not runs:
        click.echo("no RUNNING argse run" + (f" for {dataset}" if dataset else ""))
        return
    for run in runs:
        life = tracking.liveness(run)
        tags = run.data.tags
        state = "live" if life.alive else "dead"
        if reap and not life.alive and mark_if_dead(run):
            state = "dead, marked FAILED"
        click.echo(f"{run.info.run_id}  {tags.get(tracking.TAG_STAGE, '?'):<9} {tags.get(tracking.TAG_DATASET, '?'):<17} "
                   f"{state:<20} {life}")


def _team():
    from argse.team import team_cli

    return team_cli


cli.add_command(_team(), "team")


__all__ = ["cli", "common", "TOOLS"]
