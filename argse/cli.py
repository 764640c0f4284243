"""The ``argse`` command: one sub-command per stage, the options they share, and error handling.

Errors reach the user as one line on stderr: exit 2 for bad usage, 1 for a failed stage. With
``--verbose`` the traceback follows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import traceback
from typing import Callable, Collection

import click

from argse import ArgseError, ArgseUsageError, __version__
from argse.presets import DATASETS as PRESETS_NAMES
from argse.presets import apply_portable_kernels
from argse.config import (
    BENCHMARK_REGISTER_NAME,
    EVAL_SPLITS,
    BenchmarkConfig,
    benchmark_pass_through,
    BOOLEAN_WORDS,
    NOT_GIVEN,
    ArgseConfig,
    EvaluateConfig,
    ExpertsConfig,
    GatingConfig,
    Option,
    PassThrough,
    PipelineConfig,
    SingleStageConfig,
    SplitsConfig,
    StageConfig,
    options,
    pipeline_options,
    show_value,
)

_STATE = {"verbose": False}


# -- options, derived from the config dataclasses ----------------------------------------------------


class OptionValue(click.ParamType):
    """An option's value read as its declaration says (:meth:`argse.config.Option.parse`): where the
    option may be left unset, ``preset``, ``none`` or an empty string leave it so (MLproject passes
    every parameter, as a string)."""

    def __init__(self, opt: Option, unset: bool):
        self.opt, self.unset = opt, unset  # unset: the option may be left unset (its default is None)
        kind = {int: "INTEGER", float: "FLOAT"}.get(opt.kind, "TEXT")
        self.name = f"{kind}|preset" if opt.preset else kind

    def convert(self, value, param, ctx):
        if self.unset and (value is None or str(value).strip().lower() in NOT_GIVEN):
            return None
        try:
            return self.opt.cast(value)
        except ArgseUsageError as exc:
            self.fail(str(exc), param, ctx)


OPTIONAL_TEXT = OptionValue(Option("text", str, None, "", None, None, False, False, None, None, None), unset=True)


def _set_verbose(ctx, param, value):
    if value:
        _STATE["verbose"] = True
        logging.getLogger("argse").setLevel(logging.DEBUG)
    return value


def click_option(opt: Option, *, name: str | None = None, default=dataclasses.MISSING, help: str | None = None):
    """The click option of a declared option (``name`` and ``default`` where the pipeline's differ).
    Switches are flags (``--dry-run``) that also take a value (``--dry-run false``, see :class:`Command`)."""
    name = name or opt.name
    flag = "--" + name.replace("_", "-")
    default = opt.default if default is dataclasses.MISSING else default
    help = help if help is not None else _help(opt)
    callback = _set_verbose if name == "verbose" else None
    if opt.kind is bool:
        return click.option(flag, name, is_flag=True, default=bool(default), help=help, callback=callback)
    if opt.choices is not None:
        kind = click.Choice(opt.choices)
    elif default is not None and opt.parse_text is None:
        kind = {int: click.INT, float: click.FLOAT}.get(opt.kind, click.STRING)
    else:
        kind = OptionValue(opt, unset=default is None)
    if opt.required:
        return click.option(flag, name, type=kind, required=True, metavar=opt.metavar, help=help)
    return click.option(flag, name, type=kind, default=default, show_default=default is not None,
                        metavar=opt.metavar, help=help)


def _help(opt: Option) -> str:
    """The declared help line, with each preset's value where a preset supplies the default."""
    return f"{opt.help.rstrip('.')} (default: preset; {opt.preset_values()})." if opt.preset else opt.help


def _pass_through_help(p: PassThrough) -> str:
    """``gating (selective), fit: Rejection cost ...``: which stage commands an option of the pipeline
    reaches, what it means there, and each stage's default where they differ."""
    where = p.where()
    if len({o.help for _, o in where}) == 1:
        text = f"{', '.join(label for label, _ in where)}: {_help(p.option)}"
    else:
        text = "; ".join(f"{label}: {_help(o).rstrip('.')}" for label, o in where) + "."
    if p.default is None and not p.option.preset and any(o.default is not None for _, o in where):
        text = text.rstrip(".") + " (default: each stage's own; " + ", ".join(
            f"{label} {show_value(o.default)}" for label, o in where if o.default is not None) + ")."
    return text


def config_options(cls: type) -> Callable:
    """Every option ``cls`` declares, as click options, in declaration order."""
    def decorate(f):
        for opt in reversed(options(cls)):
            f = click_option(opt)(f)
        return f
    return decorate


def pass_through_options(f):
    """The stage options ``argse pipeline`` passes on (:func:`argse.config.pipeline_options`)."""
    for p in reversed(pipeline_options()):
        f = click_option(p.option, name=p.name, default=p.default, help=_pass_through_help(p))(f)
    return f


def tracking_options(f):
    """``--tracking-uri`` and ``--experiment``: on the group and on every stage, so the original scripts
    (``python train_experts.py --experiment x``) work as the shims pass them. Not stage options:
    ``mlflow run`` sets both itself, so MLproject has no parameter for them."""
    f = click.option("--experiment", default=None, type=OPTIONAL_TEXT,
                     help="MLflow experiment (default: ar-gse/<dataset>, or MLFLOW_EXPERIMENT_NAME).")(f)
    f = click.option("--tracking-uri", default=None, type=OPTIONAL_TEXT,
                     help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")(f)
    return f


def switch_values(params: list[click.Parameter], args: list[str], stop: Collection[str] = ()) -> list[str]:
    """``--dry-run true`` -> ``--dry-run``, ``--dry-run false`` / ``--dry-run=false`` -> nothing: the
    values MLproject gives switches, read before click parses (a switch never takes the next word
    unless it is a boolean, so ``argse --verbose splits`` keeps its sub-command). Stops at ``stop``."""
    switches = {name for p in params if isinstance(p, click.Option) and p.is_flag for name in p.opts}
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in stop:
            return out + list(args[i:])
        name, eq, value = arg.partition("=")
        if name in switches and eq:
            if value.strip().lower() not in BOOLEAN_WORDS:
                raise click.UsageError(f"{name} is a switch: give it alone, or with true or false (got {value!r})")
            out += [name] if BOOLEAN_WORDS[value.strip().lower()] else []
            i += 1
        elif arg in switches and i + 1 < len(args) and args[i + 1].strip().lower() in BOOLEAN_WORDS:
            out += [arg] if BOOLEAN_WORDS[args[i + 1].strip().lower()] else []
            i += 2
        else:
            out.append(arg)
            i += 1
    return out


class Command(click.Command):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, switch_values(self.get_params(ctx), args))


class Group(click.Group):
    command_class = Command

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, switch_values(self.get_params(ctx), args, stop=self.commands))


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
    if cfg.preset.cpu_threads:
        import torch

        torch.set_num_threads(cfg.preset.cpu_threads)
    apply_portable_kernels(cfg.preset)
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


def benchmark_options(f):
    """The pipeline options ``argse benchmark`` passes to each pipeline (:func:`argse.config.benchmark_pass_through`)."""
    for p in reversed(benchmark_pass_through()):
        text = _pass_through_help(p)
        if p.name == "register_name":
            text = f"fit: Registered model name (default {BENCHMARK_REGISTER_NAME.format(dataset='<dataset>')})."
        f = click_option(p.option, name=p.name, default=p.default, help=text)(f)
    return f


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
    from argse.tracking.integrity import verify_run

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
    from argse.stages.argse import crown_by_hand

    tracking.configure(tracking_uri or click.get_current_context().find_root().params.get("tracking_uri"))
    click.echo(crown_by_hand(ref))


@cli.command()
@click.option("--dataset", type=click.Choice(list(PRESETS_NAMES)), default=None,
              help="Only this dataset's runs (default: every argse run in every experiment).")
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


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _server_problem(exc: BaseException) -> str | None:
    """The one line for a failure that is the tracking server's (unreachable, frozen, its database
    down, credentials refused), also when a stage wrapped it in its own message; else ``None``."""
    if "argse.tracking" not in sys.modules:  # failed before any tracking happened
        return None
    from argse import tracking

    return tracking.server_problem(exc)


def _verbose_requested(args: list[str]) -> bool:
    """Whether ``--verbose`` is on, before click parses (errors while parsing need to know)."""
    for i, arg in enumerate(args):
        if arg == "--verbose":
            following = args[i + 1].lower() if i + 1 < len(args) else ""
            return following not in ("false", "0", "no", "off", "f", "n")
    return False


def main(argv: list[str] | None = None, translate: Callable[[list[str]], list[str]] | None = None) -> None:
    """Console entry point: runs the CLI and turns every failure into one line and an exit code.
    ``translate`` rewrites the arguments first (the original scripts' spellings, :func:`shim`), inside that handling."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("argse").setLevel(logging.INFO)
    # Connection retries are reported once, as the one-line error; not as urllib3's warnings.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    args = sys.argv[1:] if argv is None else list(argv)
    _STATE["verbose"] = _verbose_requested(args)
    code = 0
    try:
        if translate is not None:
            args = translate(args)
        cli.main(args=args, prog_name="argse", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        code = 130
    except click.ClickException as exc:
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        code = 130
    except ArgseError as exc:
        if _STATE["verbose"]:
            traceback.print_exc()
        click.echo(f"error: {_server_problem(exc) or _one_line(exc)}", err=True)
        code = exc.exit_code
    except Exception as exc:  # anything else: still one line, the traceback on request
        if _STATE["verbose"]:
            traceback.print_exc()
        problem = _server_problem(exc)
        if problem:
            click.echo(f"error: {problem}", err=True)
        else:
            hint = "" if _STATE["verbose"] else " (rerun with --verbose for the traceback)"
            click.echo(f"error: {type(exc).__name__}: {_one_line(exc)}{hint}", err=True)
        code = 1
    sys.exit(code)


def original_evaluate_args(args: list[str]) -> list[str]:
    """The original ``evaluate_argse.py`` spellings: ``--dataset {test,val,tunev}`` names the split to
    evaluate (benchmark names and split names do not overlap, so ``--dataset digits-lt`` still names
    the benchmark), and ``--checkpoint`` the model (a run id or model URI)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        if name == "--dataset" and value in EVAL_SPLITS:
            out += ["--split", value]
            i += 1 if eq else 2
        elif name == "--checkpoint":
            out.append("--model-uri" + (f"={value}" if eq else ""))
            i += 1
        else:
            out.append(args[i])
            i += 1
    return out


def original_fit_args(args: list[str]) -> list[str]:
    """The original ``train_argse.py --resume``. A fit keeps no checkpoint: it takes seconds, from the
    gating and expert runs it reads. Resuming refits from the newest FINISHED selective gating run (and
    the expert runs that run read), named in one line, or says in one line that there is none."""
    if "--resume" not in args:
        return args
    from argse import stage_registry, tracking

    rest = [a for a in args if a != "--resume"]
    if any(a.partition("=")[0] == "--gating-run" for a in rest):
        raise ArgseUsageError("--resume refits from the newest finished selective gating run: leave out --gating-run")
    given = cli.commands["fit"].make_context("fit", switch_values(cli.commands["fit"].params, list(rest)),
                                             resilient_parsing=True).params
    tracking.configure(given.get("tracking_uri"))
    try:
        run = tracking.resolve_upstream("gating", "latest", dataset=given["dataset"], experiment=given.get("experiment"),
                                        lineage={stage_registry.TAG_GATING_MODE: "selective"})
    except ArgseError as exc:
        raise ArgseError(f"--resume: nothing to resume: {_one_line(exc)}") from None
    click.echo(f"--resume: refitting from the newest finished selective gating run {run.info.run_id} "
               "and the expert runs it read (a fit keeps no checkpoint)")
    return ["--gating-run", run.info.run_id, *rest]


ORIGINAL_ARGS = {"evaluate": original_evaluate_args, "fit": original_fit_args}


def shim(command: str, argv: list[str] | None = None) -> None:
    """What the original scripts' names (``entrypoints/*.py``) run: ``argse <command> <their args>``, the
    original scripts' own spellings read as they meant them (:data:`ORIGINAL_ARGS`)."""
    translate = ORIGINAL_ARGS.get(command)
    main([command, *(sys.argv[1:] if argv is None else argv)],
         translate=(lambda args: [args[0], *translate(args[1:])]) if translate else None)


__all__ = ["cli", "main", "shim", "config_options", "pass_through_options", "tracking_options", "common"]
