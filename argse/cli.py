"""The ``argse`` command: one sub-command per stage, the options they share, and error handling.

Errors reach the user as one line on stderr: exit 2 for bad usage, 1 for a failed stage. With
``--verbose`` the traceback follows.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import click

from argse import ArgseError, ArgseUsageError
from argse.config import DATASETS, EXPERTS, PRESETS

_STATE = {"verbose": False}


class PresetOr(click.ParamType):
    """A number, or ``preset`` / empty for the dataset preset's value (MLproject passes strings)."""

    def __init__(self, kind: type):
        self.kind = kind
        self.name = f"{kind.__name__}|preset"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "preset", "none")):
            return None
        try:
            return self.kind(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a valid {self.kind.__name__} (or 'preset')", param, ctx)


class OptionalText(click.ParamType):
    """Text where an empty string or ``none`` means not given (for MLproject parameters)."""

    name = "text"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        return str(value)


PRESET_INT, PRESET_FLOAT, PRESET_TEXT, OPTIONAL_TEXT = PresetOr(int), PresetOr(float), PresetOr(str), OptionalText()


def preset_values(field: str) -> str:
    """Each dataset preset's value of ``field``, for help texts: ``cifar100-lt 100, digits-lt 20, ...``."""
    def show(value):
        return ",".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else value
    return ", ".join(f"{name} {show(getattr(p, field))}" for name, p in PRESETS.items())


def flag(name: str, **kwargs):
    """A switch that also takes an explicit value (``--dry-run`` or ``--dry-run false``), so MLproject
    entry points can pass it as a parameter."""
    return click.option(name, type=click.BOOL, is_flag=False, flag_value=True, default=False, **kwargs)


def _set_verbose(ctx, param, value):
    if value:
        _STATE["verbose"] = True
        logging.getLogger("argse").setLevel(logging.DEBUG)
    return value


def tracking_options(f):
    """``--tracking-uri``, ``--experiment`` and ``--verbose``: on the group and on every stage, so the
    seed's scripts (``python train_experts.py --verbose``) work as the shims pass them."""
    f = flag("--verbose", callback=_set_verbose, help="More output, and the traceback on errors.")(f)
    f = click.option("--experiment", default=None, type=OPTIONAL_TEXT,
                     help="MLflow experiment (default: ar-gse/<dataset>, or MLFLOW_EXPERIMENT_NAME).")(f)
    f = click.option("--tracking-uri", default=None, type=OPTIONAL_TEXT,
                     help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")(f)
    return f


def stage_options(f):
    """Options every stage shares."""
    f = flag("--dry-run", help="Print the resolved plan; create no run.")(f)
    f = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)(f)
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--data-dir", default="data", show_default=True,
                     help="Where datasets are read from (and CIFAR-100 / Fashion-MNIST downloaded to).")(f)
    f = click.option("--dataset", type=click.Choice(DATASETS), default="cifar100-lt", show_default=True)(f)
    return tracking_options(f)


def common(kwargs: dict) -> dict:
    """Set up tracking from the shared options; return the rest for the stage's config."""
    from argse import tracking

    ctx = click.get_current_context()
    group = ctx.find_root().params
    uri = kwargs.pop("tracking_uri", None) or group.get("tracking_uri")
    experiment = kwargs.pop("experiment", None) or group.get("experiment")
    kwargs["verbose"] = bool(kwargs.get("verbose") or group.get("verbose"))
    tracking.configure(uri)
    threads = PRESETS[kwargs["dataset"]].cpu_threads if kwargs.get("dataset") in PRESETS else 0
    if threads:
        import torch

        torch.set_num_threads(threads)
    if kwargs.get("dry_run") and os.environ.get("MLFLOW_RUN_ID"):
        # `mlflow run` made a run before this process started; a dry run leaves it empty: say so.
        from mlflow.tracking import MlflowClient

        MlflowClient().update_run(os.environ["MLFLOW_RUN_ID"],
                                  name=f"{tracking.top_level_name(ctx.info_name, kwargs['dataset'])}: dry run")
    if (kwargs.get("verbose") or kwargs.get("dry_run")) and os.environ.get("RANK", "0") == "0":
        for line in _system_lines(ctx.info_name, kwargs):
            click.echo(line)
    kwargs["_experiment"] = experiment
    return kwargs


def _system_lines(command: str, kwargs: dict) -> list[str]:
    """What ``--verbose`` and ``--dry-run`` say about the machine: versions, the resolved device and
    precision. Only expert training uses ``--device``; the other stages compute on the CPU."""
    import torch

    from argse.config import ExpertsConfig
    from argse.training.utils import describe_system, resolve_device, training_mode

    if command not in ("experts", "pipeline"):
        return describe_system(torch.device("cpu"), False, scope="this stage computes on the CPU")
    try:
        device = resolve_device(kwargs["device"])
    except ValueError as exc:
        raise ArgseUsageError(str(exc)) from None
    # The pipeline trains its experts at ExpertsConfig's default precision.
    precision = kwargs.get("precision", ExpertsConfig.precision)
    bf16, _ = training_mode(precision, device, PRESETS[kwargs["dataset"]].cpu_fast_path)
    return describe_system(device, bf16, device_option=kwargs["device"], precision_option=precision,
                           scope="expert training runs there, the other stages on the CPU" if command == "pipeline" else "")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@tracking_options
def cli(tracking_uri, experiment, verbose):
    """AR-GSE: long-tailed selective classification, one MLflow-tracked stage per command."""


@cli.command()
@stage_options
@click.option("--imb-factor", type=PRESET_FLOAT, default=None, help=f"Imbalance factor (default: preset; {preset_values('imb_factor')}).")
@click.option("--tunev-ratio", type=PRESET_FLOAT, default=None, help="Share of each class's held-out images for tunev.")
@click.option("--val-ratio", type=PRESET_FLOAT, default=None, help="Share of each class's held-out images for val.")
@click.option("--group-thresholds", type=PRESET_TEXT, default=None,
              help="Train-count thresholds: 20 = head/tail, 100,20 = many/medium/few "
                   f"(default: preset; {preset_values('group_thresholds')}).")
def splits(**kwargs):
    """Create the long-tailed train set and the disjoint tunev / val / test splits."""
    from argse.config import SplitsConfig
    from argse.stages import splits as stage

    kwargs = common(kwargs)
    experiment = kwargs.pop("_experiment")
    stage.run(SplitsConfig(**kwargs).resolve(), experiment=experiment)


@cli.command()
@stage_options
@click.option("--expert", type=click.Choice(list(EXPERTS) + ["all"]), default="all", show_default=True)
@click.option("--epochs", type=PRESET_INT, default=None, help=f"Training epochs (default: preset; {preset_values('epochs')}).")
@click.option("--lr", type=PRESET_FLOAT, default=None, help="Base learning rate at batch 128 (default: preset).")
@click.option("--batch-size", type=PRESET_INT, default=None, help=f"Batch size (default: preset; {preset_values('batch_size')}).")
@click.option("--la-tau", type=float, default=1.0, show_default=True, help="LogitAdjust temperature tau.")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--warmup-epochs", type=PRESET_INT, default=None, help="Linear warm-up epochs (default: preset).")
@click.option("--checkpoint-every", type=int, default=10, show_default=True, help="Epochs between checkpoints.")
@flag("--compile", help="torch.compile the model.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 autocast on CUDA, and on CPUs with bf16 units for the presets "
                   f"{', '.join(n for n, p in PRESETS.items() if p.cpu_fast_path)}; else fp32.")
@click.option("--splits-run", default="latest", show_default=True, help="latest, a run id or runs:/<id>/splits.")
@click.option("--resume", type=OPTIONAL_TEXT, default=None, metavar="RUN_ID",
              help="Continue this expert run from its last checkpoint.")
def experts(**kwargs):
    """Train the long-tail experts (ce, logitadjust, balsoftmax) on a splits run."""
    from argse.config import ExpertsConfig
    from argse.stages import experts as stage

    kwargs = common(kwargs)
    experiment = kwargs.pop("_experiment")
    stage.run(ExpertsConfig(**kwargs).resolve(), experiment=experiment)


@cli.command()
@stage_options
@click.option("--mode", type=click.Choice(["pretrain", "selective"]), required=True)
@click.option("--experts-run", default="latest", show_default=True,
              help="latest, an `--expert all` run id, or the three expert run ids separated by commas.")
@click.option("--pretrain-run", default="latest", show_default=True, help="Selective mode: the pretrain run to start from.")
@click.option("--test-prior", type=click.Choice(["lt", "balanced"]), default="lt", show_default=True,
              help="Label prior the selective risk is measured under.")
@click.option("--epochs", type=PRESET_INT, default=None, help="Pretrain epochs (default: preset).")
@click.option("--batch-size", type=PRESET_INT, default=None, help="Batch size (default: preset).")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--load-balance", type=float, default=0.01, show_default=True, help="Weight of the load-balancing term.")
@click.option("--patience", type=int, default=10, show_default=True, help="Early-stopping patience in epochs.")
@click.option("--objective", type=click.Choice(["balanced", "worst"]), default="worst", show_default=True,
              help="Selective mode: the L2R risk the rounds optimise.")
@click.option("--cost", type=float, default=0.2, show_default=True, help="Selective mode: rejection cost c.")
@click.option("--rounds", type=int, default=4, show_default=True, help="Selective mode: alternation rounds.")
@click.option("--epochs-per-round", type=int, default=10, show_default=True)
def gating(**kwargs):
    """Train the gating network over the experts' calibrated posteriors."""
    from argse.config import GatingConfig
    from argse.stages import gating as stage

    kwargs = common(kwargs)
    experiment = kwargs.pop("_experiment")
    stage.run(GatingConfig(**kwargs).resolve(), experiment=experiment)


@cli.command("fit")
@stage_options
@click.option("--gating-run", default="latest", show_default=True, help="latest, a gating run id or runs:/<id>/gating.")
@click.option("--objective", type=click.Choice(["balanced", "worst"]), default="worst", show_default=True)
@click.option("--cost", type=PRESET_FLOAT, default=None, help="Rejection cost c (default: chosen by --target-coverage).")
@click.option("--target-coverage", type=PRESET_FLOAT, default=None,
              help="Pick the cost whose rule accepts this share of val (default 0.8 when --cost is not given).")
@click.option("--test-prior", type=click.Choice(["lt", "balanced"]), default="lt", show_default=True)
@click.option("--rounds", type=int, default=20, show_default=True, help="Exponentiated-gradient rounds (worst).")
@click.option("--step", type=float, default=2.0, show_default=True, help="Exponentiated-gradient step size (worst).")
@click.option("--n-starts", type=int, default=12, show_default=True, help="Starting points of the fixed point.")
@click.option("--group-thresholds-mode", type=click.Choice(["global", "per-group"]), default="global", show_default=True,
              help="per-group: one threshold per predicted group, each reaching --target-coverage.")
@click.option("--register-name", type=OPTIONAL_TEXT, default=None, help="Registered model name (default ar-gse-<dataset>).")
def fit(**kwargs):
    """Fit the AR-GSE rejector on the gated mixture; log, register and maybe crown the model."""
    from argse.config import ArgseConfig
    from argse.stages import argse as stage

    kwargs = common(kwargs)
    experiment = kwargs.pop("_experiment")
    stage.run(ArgseConfig(**kwargs).resolve(), experiment=experiment)


@cli.command()
@stage_options
@click.option("--model-uri", default="latest", show_default=True,
              help="latest (newest FINISHED argse run), an argse run id, runs:/<id>/model or models:/<name>@<alias>.")
@click.option("--split", type=click.Choice(["test", "val", "tunev"]), default="test", show_default=True,
              help="The split to report (the seed's `--dataset` of evaluate_argse.py).")
@click.option("--test-prior", type=click.Choice(["lt", "balanced"]), default="lt", show_default=True,
              help="Label prior every metric is computed under.")
@click.option("--coverage-grid", default="default", show_default=True,
              help="Target coverages of the coverage-matched comparison, comma-separated in (0, 1]; "
                   "default: 1, 0.95, ..., 0.2.")
@click.option("--n-boot", type=int, default=200, show_default=True, help="Bootstrap resamples for the AURC intervals.")
@click.option("--check-images", type=int, default=64, show_default=True,
              help="Images on which the logged model must agree with its logits (0: skip).")
@flag("--save-results", help="Also write the tables to --output-dir.")
@click.option("--output-dir", default="results", show_default=True)
def evaluate(**kwargs):
    """Compare AR-GSE with its baselines on one split; log tables, metrics and RC figures."""
    from argse.config import EvaluateConfig
    from argse.stages import evaluate as stage

    kwargs = common(kwargs)
    experiment = kwargs.pop("_experiment")
    stage.run(EvaluateConfig(**kwargs).resolve(), experiment=experiment)


@cli.command()
@stage_options
@click.option("--start-from", type=click.Choice(["data", "experts", "gating", "argse", "eval"]), default="data",
              show_default=True, help="Reuse the stages before this one; rerun it and the rest.")
@click.option("--stop-at", type=click.Choice(["data", "experts", "gating", "argse", "eval"]), default="eval",
              show_default=True)
@flag("--force", help="Rerun every stage from --start-from even when an identical finished run exists.")
@click.option("--imb-factor", type=PRESET_FLOAT, default=None, help="splits: imbalance factor (default: preset).")
@click.option("--group-thresholds", type=PRESET_TEXT, default=None, help="splits: train-count thresholds (default: preset).")
@click.option("--epochs", type=PRESET_INT, default=None, help="experts: epochs (default: preset).")
@click.option("--batch-size", type=PRESET_INT, default=None, help="experts: batch size (default: preset).")
@click.option("--lr", type=PRESET_FLOAT, default=None, help="experts: learning rate (default: preset).")
@click.option("--la-tau", type=float, default=1.0, show_default=True, help="experts: LogitAdjust tau.")
@click.option("--checkpoint-every", type=int, default=5, show_default=True, help="experts: epochs between checkpoints.")
@click.option("--gating-epochs", type=PRESET_INT, default=None, help="gating pretrain: epochs (default: preset).")
@click.option("--selective-rounds", type=int, default=2, show_default=True, help="gating selective: rounds.")
@click.option("--epochs-per-round", type=int, default=5, show_default=True, help="gating selective: epochs per round.")
@click.option("--objective", type=click.Choice(["balanced", "worst"]), default="worst", show_default=True)
@click.option("--cost", type=PRESET_FLOAT, default=None, help="argse: rejection cost (default: by --target-coverage).")
@click.option("--target-coverage", type=PRESET_FLOAT, default=None, help="argse: val coverage (default 0.8).")
@click.option("--test-prior", type=click.Choice(["lt", "balanced"]), default="lt", show_default=True)
@click.option("--eg-rounds", type=int, default=20, show_default=True, help="argse: exponentiated-gradient rounds.")
@click.option("--register-name", type=OPTIONAL_TEXT, default=None, help="argse: registered model name.")
@click.option("--split", type=click.Choice(["test", "val", "tunev"]), default="test", show_default=True,
              help="evaluate: the split to report.")
@click.option("--coverage-grid", default="default", show_default=True,
              help="evaluate: target coverages, comma-separated in (0, 1] (default: 1, 0.95, ..., 0.2).")
@click.option("--n-boot", type=int, default=200, show_default=True, help="evaluate: bootstrap resamples.")
def pipeline(**kwargs):
    """Run splits -> experts -> gating -> argse -> evaluate, reusing identical finished stages."""
    from argse.config import PipelineConfig
    from argse.stages import pipeline as stage

    kwargs = common(kwargs)
    experiment = kwargs.pop("_experiment")
    stage.run(PipelineConfig(**kwargs).resolve(), experiment=experiment)


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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the CLI and turns every failure into one line and an exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("argse").setLevel(logging.INFO)
    # Connection retries are reported once, as the one-line error; not as urllib3's warnings.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    args = sys.argv[1:] if argv is None else list(argv)
    _STATE["verbose"] = _verbose_requested(args)
    code = 0
    try:
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


def shim(command: str) -> None:
    """What the seed's script names (``entrypoints/*.py``) run: ``argse <command> <their args>``."""
    main([command, *sys.argv[1:]])


__all__ = ["cli", "main", "shim", "stage_options", "tracking_options", "common"]
