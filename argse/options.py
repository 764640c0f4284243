"""Options: how a stage config's field declares one (:func:`option`), the declaration read back
(:class:`Option`, :func:`options`), and how a value given as text (a command line, MLproject's
``-P``, a logged param) is read (:meth:`Option.parse` and the parsers of the options whose type alone
does not say: group thresholds, the coverage grid, seeds, priors). The configs themselves are in
:mod:`argse.config`; the click options derive from these declarations (:mod:`argse.cli.click_options`).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, Callable

from argse import ArgseUsageError
from argse.data.splits import PRIORS
from argse.presets import PRESETS

# -- how a field declares an option -----------------------------------------------------------------

BOOLEAN_WORDS = {"1": True, "true": True, "t": True, "yes": True, "y": True, "on": True,
                 "0": False, "false": False, "f": False, "no": False, "n": False, "off": False}
NOT_GIVEN = ("", "none", "preset")  # how MLproject's -P (and a logged param) spell an option left unset


def flag(name: str) -> str:
    """The command-line flag of the option (or pipeline option) called ``name``: ``--imb-factor``."""
    return "--" + name.replace("_", "-")


def option(default: Any = None, *, help: str, preset: str | None = None, choices: tuple | None = None,
           hashed: bool = True, pipeline: bool | str = True, mode: str | None = None,
           parse: Callable[[str], Any] | None = None, metavar: str | None = None, required: bool = False) -> Any:
    """Declare a stage option as a dataclass field; everything else about the option derives from this.

    ``default``: its value when not given; ``None`` with ``preset`` set means the dataset preset's
    field of that name supplies it (:class:`DatasetPreset`). ``help``: the one help line (the default
    and each preset's value are appended where the option is shown). ``choices``: the allowed values.
    ``hashed``: whether the value is a param (logged to MLflow, in the config hash, restored by a
    resume); presentational options (``verbose``, ``dry_run``, ``resume``, ``output_dir``) are not.
    ``pipeline``: ``True`` when ``argse pipeline`` passes an option of the field's own name on to this
    stage, a name when the pipeline names it otherwise (the stages' fields named alike that mean
    different things), ``False`` when the pipeline sets the field itself. ``mode``: the stage mode
    the option only matters in (the pipeline passes it to that mode's run only). ``parse``: how a
    value given as text is read when the type alone does not say. ``required``: the command wants it
    spelled out (``argse gating --mode``; MLproject gives the parameter no default), though the
    dataclass keeps ``default`` for code that builds the config.
    """
    if preset is not None and default is not None:
        raise TypeError("an option has a default or a preset key, not both")
    return dataclasses.field(default=default, metadata={
        "help": help, "preset": preset, "choices": tuple(choices) if choices is not None else None,
        "hashed": hashed, "pipeline": pipeline, "mode": mode, "parse": parse, "metavar": metavar,
        "required": required})


@dataclass(frozen=True)
class Option:
    """One declared option, read back from its field."""

    name: str
    kind: type  # int, float, str, bool or tuple
    default: Any
    help: str
    preset: str | None
    choices: tuple | None
    hashed: bool
    pipeline: bool | str
    mode: str | None
    parse_text: Callable[[str], Any] | None
    metavar: str | None
    required: bool = False

    @property
    def flag(self) -> str:
        return flag(self.name)

    def preset_values(self) -> str:
        """``cifar100-lt 200, digits-lt 30, fashion-mnist-lt 20``: each preset's value of this option."""
        return ", ".join(f"{name} {show_value(getattr(p, self.preset))}" for name, p in PRESETS.items())

    def parse(self, text: Any) -> Any:
        """A value given as text (a CLI or MLproject string, a logged param) read as this option's type;
        ``""``, ``none`` and ``preset`` mean not given where the option may be left unset."""
        if isinstance(text, str) and text.strip().lower() in NOT_GIVEN and (self.default is None or self.preset):
            return None
        return self.cast(text)

    def cast(self, value: Any) -> Any:
        """``value`` as this option's type, or a one-line usage error naming the option."""
        if value is None:
            return None
        try:
            if self.parse_text is not None:
                return self.parse_text(value)
            if self.kind is bool:
                if isinstance(value, str):
                    return BOOLEAN_WORDS[value.strip().lower()]
                return bool(value)
            if self.kind is int and isinstance(value, str):
                number = float(value)
                if number != int(number):
                    raise ValueError
                return int(number)
            return self.kind(value)
        except (KeyError, TypeError, ValueError):
            kind = "true or false" if self.kind is bool else f"a {self.kind.__name__}"
            raise ArgseUsageError(f"{self.flag} {value!r} is not {kind}") from None


def _kind(annotation: Any) -> type:
    """int / float / str / bool / tuple from a field's type (``int | None`` -> int)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return tuple
    if args:
        return _kind(args[0])
    return annotation


@functools.cache
def options(cls: type) -> tuple[Option, ...]:
    """The options a config dataclass declares, in field order (its base's first)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue  # not an option (PipelineConfig's internal fields)
        m = f.metadata
        out.append(Option(f.name, _kind(hints[f.name]), f.default, m["help"], m["preset"], m["choices"],
                          m["hashed"], m["pipeline"], m["mode"], m["parse"], m["metavar"], m["required"]))
    return tuple(out)


def show_value(value: Any) -> str:
    """How a default is written in help texts and MLproject: ``0.0005``, ``20``, ``100,20``, ``true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


# -- values that their type alone does not describe -------------------------------------------------


def parse_group_thresholds(text: str | tuple[int, ...]) -> tuple[int, ...]:
    """``"100,20"`` -> ``(100, 20)``: strictly decreasing positive train-count thresholds."""
    if isinstance(text, tuple):
        values = text
    else:
        try:
            values = tuple(int(v) for v in str(text).split(",") if v.strip())
        except ValueError:
            raise ArgseUsageError(
                f"--group-thresholds {text!r} is not a comma-separated list of integers "
                "(e.g. 20 for head/tail, 100,20 for many/medium/few)"
            ) from None
    if not values or any(v <= 0 for v in values) or list(values) != sorted(set(values), reverse=True):
        raise ArgseUsageError(
            f"--group-thresholds {text!r} must be positive and strictly decreasing "
            "(e.g. 20 for head/tail, 100,20 for many/medium/few)"
        )
    return values


def resolve_coverage_grid(text: str) -> str:
    """``--coverage-grid``: ``default`` (1, 0.95, ..., 0.2) or comma-separated coverages in (0, 1], at
    least two distinct; returned in one canonical spelling (descending, no repeats), or a one-line error."""
    from argse.selective.matched import COVERAGES, check_coverages

    text = str(text).strip()
    if text == "default":
        grid = COVERAGES
    else:
        try:
            grid = check_coverages([v for v in text.split(",") if v.strip()])
        except ValueError as exc:
            raise ArgseUsageError(
                f"--coverage-grid {text!r}: {str(exc).rstrip('.')}; give comma-separated coverages in (0, 1], "
                "e.g. 1,0.9,0.8,0.7,0.6,0.5, or default"
            ) from None
    return ",".join(f"{v:g}" for v in grid)


def parse_seeds(text: str | tuple[int, ...]) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``: distinct non-negative integers, at least one."""
    if isinstance(text, tuple):
        values = list(text)
    else:
        parts = [v.strip() for v in str(text).split(",")]
        if not any(parts):
            raise ArgseUsageError("it is empty: give one or more seeds, e.g. 0,1,2")
        bad = [v for v in parts if not v.isdigit()]
        if bad:
            raise ArgseUsageError(f"{bad[0]!r} is not a non-negative integer: give seeds like 0,1,2")
        values = [int(v) for v in parts]
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ArgseUsageError(f"seed {repeated[0]} is given twice: give each seed once")
    if any(v < 0 for v in values):
        raise ArgseUsageError("seeds are non-negative integers, e.g. 0,1,2")
    return tuple(values)


def parse_priors(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """``"lt,balanced"`` -> ``("lt", "balanced")``: known target priors, each once."""
    values = list(text) if isinstance(text, tuple) else [v.strip() for v in str(text).split(",") if v.strip()]
    unknown = [v for v in values if v not in PRIORS]
    if not values or unknown:
        raise ArgseUsageError(f"{text!r}: choose one or more of {', '.join(PRIORS)}, separated by commas")
    if len(set(values)) < len(values):
        raise ArgseUsageError(f"{text!r} names a prior twice")
    return tuple(values)
