"""The click adapter: each declared option (:mod:`argse.options`) as a click option, with its help,
its default and, where a preset supplies it, each preset's value; the pipeline's and the benchmark's
pass-through options; ``--tracking-uri`` / ``--experiment``; and switches that also take a value
(``--dry-run true``, as ``mlflow run`` passes them), read before click parses (:class:`Command`,
:class:`Group`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Collection

import click

from argse import ArgseUsageError, options
from argse.options import BOOLEAN_WORDS, NOT_GIVEN, Option, show_value
from argse.pipeline_config import BENCHMARK_REGISTER_NAME, PassThrough, benchmark_pass_through, pipeline_options


class OptionValue(click.ParamType):
    """An option's value read as its declaration says (:meth:`argse.options.Option.parse`): where the
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
    if value:  # the argse logger's level is what --verbose turned on (argse.cli.errors reads it)
        logging.getLogger("argse").setLevel(logging.DEBUG)
    return value


def click_option(opt: Option, *, name: str | None = None, default=dataclasses.MISSING, help: str | None = None):
    """The click option of a declared option (``name`` and ``default`` where the pipeline's differ).
    Switches are flags (``--dry-run``) that also take a value (``--dry-run false``, see :class:`Command`)."""
    name = name or opt.name
    flag = options.flag(name)
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
        for opt in reversed(options.options(cls)):
            f = click_option(opt)(f)
        return f
    return decorate


def pass_through_options(f):
    """The stage options ``argse pipeline`` passes on (:func:`argse.pipeline_config.pipeline_options`)."""
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


def benchmark_options(f):
    """The pipeline options ``argse benchmark`` passes to each pipeline (:func:`argse.pipeline_config.benchmark_pass_through`)."""
    for p in reversed(benchmark_pass_through()):
        text = _pass_through_help(p)
        if p.name == "register_name":
            text = f"fit: Registered model name (default {BENCHMARK_REGISTER_NAME.format(dataset='<dataset>')})."
        f = click_option(p.option, name=p.name, default=p.default, help=text)(f)
    return f
