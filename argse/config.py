"""Configuration: dataset presets and one dataclass per stage, the one declaration of its options.

Each field of a stage's dataclass declares an option with :func:`option`: its type (the annotation), its
default or the preset key whose value per dataset is the default, its help line, its choices, whether
it is a param (logged to MLflow and hashed for the cache; ``verbose``, ``dry_run``, ``resume`` and the
like are not), and how ``argse pipeline`` passes it on. Derived from that, never restated: the click
options of each stage command and of ``argse pipeline`` (:mod:`argse.cli`), ``params()`` and the config
hash, the resume restore (:meth:`StageConfig.restore`), the pipeline's stage configs
(:meth:`PipelineConfig.stage_configs`) and MLproject (``python -m argse.mlproject``).
A resolved config holds every option it runs with (no ``None`` left where a preset supplies the value).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping

from argse import DEVICES, ENGINES, EXPERTS, OBJECTIVES, ArgseUsageError, stage_registry
from argse.data.splits import EVAL_SPLITS, PRIORS
from argse.presets import DATASETS, PRESETS, DatasetPreset, preset


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


# -- how a field declares an option -----------------------------------------------------------------

BOOLEAN_WORDS = {"1": True, "true": True, "t": True, "yes": True, "y": True, "on": True,
                 "0": False, "false": False, "f": False, "no": False, "n": False, "off": False}
NOT_GIVEN = ("", "none", "preset")  # how MLproject's -P (and a logged param) spell an option left unset


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
        return "--" + self.name.replace("_", "-")

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


# -- the stages' configs ----------------------------------------------------------------------------


@dataclass
class StageConfig:
    """Options every stage shares."""

    STAGE: ClassVar[str] = ""  # the stage registry's name of the stage this configures

    dataset: str = option("digits-lt", choices=DATASETS,
                          help="The benchmark: one of the dataset presets (digits-lt runs offline in a minute).")
    data_dir: str = option("data", help="Where datasets are read from (and CIFAR-100 / Fashion-MNIST downloaded to).")
    seed: int = option(0, help="Random seed of the splits, the initialisation and the batches.")
    device: str = option("auto", choices=DEVICES,
                         help="Where expert training runs (auto: cuda when available); the other stages compute on the CPU.")
    verbose: bool = option(False, hashed=False, help="More output, and the traceback on errors.")
    dry_run: bool = option(False, hashed=False, pipeline=False, help="Print the resolved plan; create no run.")
    #: The dataset's preset, set where the config is resolved (not an option: it follows ``dataset``).
    preset: DatasetPreset | None = dataclasses.field(default=None, compare=False, repr=False)

    def _resolved(self):
        """This config with its dataset's preset attached, preset-valued options filled from it, every
        value cast to its option's type and every choice checked: one usage error line for the first
        bad one."""
        p = preset(self.dataset)
        updates = {"preset": p}
        for opt in options(type(self)):
            value = getattr(self, opt.name)
            if value is None and opt.preset:
                value = getattr(p, opt.preset)
            updates[opt.name] = opt.cast(value)
        cfg = dataclasses.replace(self, **updates)
        for opt in options(type(self)):
            value = getattr(cfg, opt.name)
            if opt.choices is not None and value not in opt.choices:
                raise ArgseUsageError(f"{opt.flag} {value!r}: choose one of {', '.join(map(str, opt.choices))}")
        return cfg

    def dry_run_header(self, title: str) -> str:
        """The first lines of a dry run: what runs, that no run is created, and every option."""
        return "\n".join([f"{title} (dry run: no run created)"]
                         + [f"  {key} = {value}" for key, value in self.params().items()])

    def params(self) -> dict[str, Any]:
        """The resolved options as MLflow params (what the config hash is computed over)."""
        out = {}
        for opt in options(type(self)):
            if opt.hashed:
                value = getattr(self, opt.name)
                out[opt.name] = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
        return out

    def restore(self, params: Mapping[str, str]):
        """This config with every hashed option set to what a run logged (``<name>.resolved`` where
        ``mlflow run`` had logged the raw value first); an option the run did not log keeps its value."""
        updates = {}
        for opt in options(type(self)):
            text = params.get(f"{opt.name}.resolved", params.get(opt.name))
            if opt.hashed and text is not None:
                updates[opt.name] = opt.parse(text)
        return dataclasses.replace(self, **updates)


@dataclass
class SingleStageConfig(StageConfig):
    """Options of a stage started on its own (``argse experts``, ``mlflow run . -e experts``), which
    the pipeline and the benchmark decide for themselves."""

    rerun: bool = option(False, hashed=False, pipeline=False,
                         help="Run the stage even when a FINISHED run with the same options, code and inputs exists "
                              "(by default that run is reused and nothing new is run).")


@dataclass
class SplitsConfig(SingleStageConfig):
    STAGE: ClassVar[str] = "splits"

    imb_factor: float | None = option(preset="imb_factor", help="Imbalance factor: largest over smallest train class.")
    tunev_ratio: float | None = option(preset="tunev_ratio", help="Share of each class's held-out images for tunev.")
    val_ratio: float | None = option(preset="val_ratio", help="Share of each class's held-out images for val.")
    group_thresholds: tuple[int, ...] | None = option(
        preset="group_thresholds", parse=parse_group_thresholds, metavar="N[,N...]",
        help="Train-count thresholds: 20 = head/tail, 100,20 = many/medium/few.")

    def resolve(self) -> "SplitsConfig":
        cfg = self._resolved()
        if cfg.imb_factor < 1:
            raise ArgseUsageError(f"--imb-factor {cfg.imb_factor} must be >= 1 (1 means balanced)")
        for name in ("tunev_ratio", "val_ratio"):
            if not 0 < getattr(cfg, name) < 1:
                raise ArgseUsageError(f"--{name.replace('_', '-')} must lie strictly between 0 and 1")
        if cfg.tunev_ratio + cfg.val_ratio >= 1:
            raise ArgseUsageError(
                "--tunev-ratio plus --val-ratio must stay below 1 so the test split is not empty"
            )
        return cfg


#: ``--at-once``: how the experts stage trains several experts (see :func:`argse.stages.experts.choose_mode`).
AT_ONCE = ("auto", "yes", "no")


@dataclass
class ExpertsConfig(SingleStageConfig):
    STAGE: ClassVar[str] = "experts"

    expert: str = option("all", choices=EXPERTS + ("all",), pipeline=False, help="The expert to train, or all three.")
    epochs: int | None = option(preset="epochs", help="Training epochs.")
    lr: float | None = option(preset="lr", help="Learning rate at batch 128; the schedule peaks at lr x batch size / 128 (param lr.peak).")
    batch_size: int | None = option(preset="batch_size", help="Batch size.")
    la_tau: float = option(1.0, help="LogitAdjust temperature tau.")
    label_smoothing: float = option(0.0, help="Label smoothing of the experts' cross-entropy (0: none).")
    weight_decay: float = option(5e-4, help="SGD weight decay.")
    warmup_epochs: int | None = option(preset="warmup_epochs", help="Linear learning-rate warm-up epochs.")
    checkpoint_every: int = option(5, help="Epochs between checkpoints (a resume continues from the last).")
    compile: bool = option(False, help="torch.compile the model.")
    precision: str = option("auto", choices=("auto", "fp32", "bf16"),
                            help="auto: bf16 autocast on CUDA, and on CPUs with bf16 units for the presets "
                                 f"{', '.join(n for n, p in PRESETS.items() if p.cpu_fast_path)}; else fp32.")
    splits_run: str = option("latest", help="The splits run: latest, a run id or runs:/<id>/splits.")
    resume: str | None = option(hashed=False, pipeline=False, metavar="RUN_ID",
                                help="Continue this expert run (or --expert all run) from its last checkpoint.")
    at_once: str = option("auto", choices=AT_ONCE, hashed=False,
                          help="Train the experts at once, one process each (yes), one after another (no), or "
                               "at once where that is faster (auto: a CPU with two or more free cores and at "
                               "least 100,000 training images per expert); the results are the same.")

    def experts(self) -> tuple[str, ...]:
        return EXPERTS if self.expert == "all" else (self.expert,)

    def resolve(self) -> "ExpertsConfig":
        if self.expert != "all" and self.expert not in EXPERTS:
            raise ArgseUsageError(
                f"unknown expert {self.expert!r}: choose one of {', '.join(EXPERTS)} or all"
            )
        cfg = self._resolved()
        if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
            raise ArgseUsageError("--epochs and --batch-size must be >= 1 and --lr > 0")
        if cfg.checkpoint_every < 1:
            raise ArgseUsageError("--checkpoint-every must be >= 1")
        if not 0 <= cfg.label_smoothing < 1:
            raise ArgseUsageError(f"--label-smoothing {cfg.label_smoothing:g} must lie in [0, 1) (0: none)")
        return cfg


@dataclass
class GatingConfig(SingleStageConfig):
    STAGE: ClassVar[str] = "gating"

    mode: str = option(stage_registry.GATING_STAGE.modes[0], choices=stage_registry.GATING_STAGE.modes, required=True,
                       help="pretrain: mixture NLL; selective: from a pretrain run, on the L2R risk.")
    experts_run: str = option("latest", help="latest, an `--expert all` run id, or the three expert run ids separated by commas.")
    pretrain_run: str = option("latest", mode="selective", help="The pretrain run to start from.")
    test_prior: str = option("lt", choices=PRIORS, help="Label prior the selective risk is measured under.")
    epochs: int | None = option(preset="gating_epochs", pipeline="gating_epochs", help="Pretrain epochs.")
    batch_size: int | None = option(preset="gating_batch_size", pipeline="gating_batch_size", help="Gate batch size.")
    lr: float = option(1e-3, pipeline="gating_lr", help="Gate learning rate (Adam).")
    weight_decay: float = option(1e-4, pipeline="gating_weight_decay", help="Gate weight decay.")
    load_balance: float = option(0.01, help="Weight of the load-balancing term.")
    patience: int = option(10, help="Early-stopping patience in epochs.")
    objective: str = option("worst", choices=OBJECTIVES, mode="selective", help="The L2R risk the rounds optimise.")
    cost: float = option(0.2, mode="selective", help="Rejection cost c the gate is trained for.")
    rounds: int = option(2, mode="selective", pipeline="selective_rounds", help="Alternation rounds.")
    epochs_per_round: int = option(5, mode="selective", help="Gate epochs per alternation round.")

    def resolve(self) -> "GatingConfig":
        cfg = self._resolved()
        if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.rounds < 1 or cfg.epochs_per_round < 1:
            raise ArgseUsageError("--epochs, --batch-size, --rounds and --epochs-per-round must be >= 1 and --lr > 0")
        if cfg.cost < 0:
            raise ArgseUsageError("--cost must be >= 0")
        return cfg


@dataclass
class ArgseConfig(SingleStageConfig):
    STAGE: ClassVar[str] = "argse"

    gating_run: str = option("latest", help="The selective gating run: latest, a run id or runs:/<id>/gating.")
    objective: str = option("worst", choices=OBJECTIVES, help="balanced: Algorithm 1; worst: exponentiated gradient over it.")
    cost: float | None = option(help="Rejection cost c (default: the cost chosen by --target-coverage).")
    target_coverage: float | None = option(
        help="Pick the cost whose rule accepts this share of val (default 0.8 when --cost is not given).")
    test_prior: str = option("lt", choices=PRIORS, help="Label prior the L2R risk is measured under.")
    rounds: int = option(20, pipeline="eg_rounds", help="Exponentiated-gradient rounds (worst).")
    step: float = option(2.0, pipeline="eg_step",
                         help="Exponentiated-gradient step size (worst); a fit at coverage tau uses step / tau.")
    n_starts: int = option(12, help="Starting points of the (alpha, mu) fixed point.")
    group_thresholds_mode: str = option("global", choices=("global", "per-group"),
                                        help="per-group: one threshold per predicted group, each reaching --target-coverage.")
    register_name: str | None = option(help="Registered model name (default ar-gse-<dataset>).")

    def resolve(self) -> "ArgseConfig":
        cfg = self._resolved()
        if cfg.cost is not None and cfg.target_coverage is not None:
            raise ArgseUsageError("give --cost or --target-coverage, not both")
        target = cfg.target_coverage
        if cfg.cost is None and target is None:
            target = 0.8
        if target is not None and not 0 < target <= 1:
            raise ArgseUsageError(f"--target-coverage {target} must lie in (0, 1]")
        if cfg.cost is not None and cfg.cost < 0:
            raise ArgseUsageError("--cost must be >= 0")
        if cfg.group_thresholds_mode == "per-group" and target is None:
            raise ArgseUsageError("--group-thresholds-mode per-group needs --target-coverage (each group's coverage)")
        if cfg.rounds < 1 or cfg.step <= 0 or cfg.n_starts < 1:
            raise ArgseUsageError("--rounds and --n-starts must be >= 1 and --step > 0")
        return dataclasses.replace(cfg, target_coverage=target,
                                   register_name=cfg.register_name or f"ar-gse-{cfg.dataset}")


@dataclass
class EvaluateConfig(SingleStageConfig):
    STAGE: ClassVar[str] = "evaluate"

    model_uri: str = option("latest", help="latest (newest FINISHED argse run), an argse run id, runs:/<id>/model "
                                           "or models:/<name>@<alias>.")
    split: str = option("test", choices=EVAL_SPLITS, help="The split to report (the original evaluate_argse.py's `--dataset`).")
    test_prior: str = option("lt", choices=PRIORS, help="Label prior every metric is computed under.")
    coverage_grid: str = option("default", parse=resolve_coverage_grid,
                                help="Target coverages of the coverage-matched comparison, comma-separated in "
                                     "(0, 1]; default: 1, 0.95, ..., 0.2.")
    n_boot: int = option(200, help="Bootstrap resamples for the AURC intervals.")
    check_images: int = option(64, help="Images on which the logged model must agree with its logits (0: skip).")
    save_results: bool = option(False, hashed=False, help="Also write the tables to --output-dir.")
    output_dir: str = option("results", hashed=False, help="Where --save-results writes the tables.")

    def resolve(self) -> "EvaluateConfig":
        cfg = self._resolved()
        if cfg.n_boot < 1 or cfg.check_images < 0:
            raise ArgseUsageError("--n-boot must be >= 1 and --check-images >= 0")
        return cfg

    def coverages(self) -> tuple[float, ...]:
        """The target coverages of the coverage-matched comparison, descending."""
        return tuple(float(v) for v in self.coverage_grid.split(","))


STAGE_CONFIGS: Mapping[str, type[StageConfig]] = MappingProxyType(
    {cls.STAGE: cls for cls in (SplitsConfig, ExpertsConfig, GatingConfig, ArgseConfig, EvaluateConfig)})


# -- the pipeline: its own options, and the stage options it passes on ------------------------------


@dataclass(frozen=True)
class PassThrough:
    """An option of ``argse pipeline`` that sets a stage field: in every pipeline step whose stage
    declares a field under this pipeline name (``--cost``: selective gating and the fit)."""

    name: str
    targets: tuple[tuple[str, Option], ...]  # (pipeline step, the stage's option)

    @property
    def option(self) -> Option:
        """The first target's option: type, choices, preset and parsing (the same for every target)."""
        return self.targets[0][1]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        """The stages' common default; ``None`` (each stage keeps its own) where they differ."""
        defaults = {(o.default, o.preset) for _, o in self.targets}
        return self.option.default if len(defaults) == 1 else None

    def where(self) -> list[tuple[str, Option]]:
        """``[(label, option)]``: the commands it reaches (``gating (selective)``, ``fit``), once each."""
        out: dict[str, Option] = {}
        for step, opt in self.targets:
            stage = next(p.stage for p in stage_registry.PIPELINE_PLAN if p.name == step)
            out.setdefault(stage.command + (f" ({opt.mode})" if opt.mode else ""), opt)
        return list(out.items())


@functools.cache
def pipeline_options() -> tuple[PassThrough, ...]:
    """Every stage option the pipeline passes on, by pipeline name, in stage order.

    A stage field reaches the pipeline under its own name, shared with every other stage declaring a
    field of that name (``--seed``, ``--test-prior``, ``--objective``, ``--cost``), or under the
    pipeline name it declares (``option(pipeline=...)``) where another stage's field of the same name
    means something else: ``gating_`` for the gate's training (``--gating-epochs``,
    ``--gating-batch-size``, ``--gating-lr``, ``--gating-weight-decay``), ``--selective-rounds`` for
    the selective gate's rounds, ``eg_`` for the fit's exponentiated gradient (``--eg-rounds``,
    ``--eg-step``). The pipeline sets the rest itself: the shared options (its own), each stage's
    upstream run (the registry's inputs), the gating mode, and fields declared ``pipeline=False``.
    """
    shared = {opt.name for opt in options(StageConfig)}
    found: dict[str, list[tuple[str, Option]]] = {}
    for plan in stage_registry.PIPELINE_PLAN:
        stage = plan.stage
        set_here = {i.option for i in stage.reads if i.option} | ({"mode"} if stage.modes else set())
        for opt in options(STAGE_CONFIGS[stage.name]):
            if opt.name in shared or opt.name in set_here or opt.pipeline is False:
                continue
            if opt.mode is not None and opt.mode != plan.mode:
                continue
            name = opt.pipeline if isinstance(opt.pipeline, str) else opt.name
            found.setdefault(name, []).append((plan.name, opt))
    return tuple(PassThrough(name, tuple(targets)) for name, targets in found.items())


@dataclass
class PipelineConfig(StageConfig):
    """The chain's own options (where to start and stop) and the stage options given to it
    (``stage_options``, by pipeline name, see :func:`pipeline_options`); the stages' configs derive
    from both (:meth:`stage_configs`): nothing here restates a stage's option."""

    STAGE: ClassVar[str] = "pipeline"

    start_from: str = option("data", choices=stage_registry.PIPELINE_STEPS, help="Reuse the stages before this step; rerun it and the rest.")
    stop_at: str = option("eval", choices=stage_registry.PIPELINE_STEPS, help="The last step to run.")
    force: bool = option(False, hashed=False,
                         help="Rerun every stage from --start-from even when an identical finished run exists.")
    stage_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def resolve(self) -> "PipelineConfig":
        cfg = self._resolved()
        known = {p.name: p for p in pipeline_options()}
        unknown = sorted(set(cfg.stage_options) - set(known))
        if unknown:
            raise ArgseUsageError(f"argse pipeline has no option --{unknown[0].replace('_', '-')}")
        steps = stage_registry.PIPELINE_STEPS
        if steps.index(cfg.start_from) > steps.index(cfg.stop_at):
            raise ArgseUsageError(f"--start-from {cfg.start_from} comes after --stop-at {cfg.stop_at}")
        cfg.stage_configs()  # every stage option is checked before anything runs
        return cfg

    def stage_configs(self) -> dict[str, StageConfig]:
        """The resolved config of every pipeline step (``splits`` ... ``evaluate``): the shared options,
        the step's mode, and each stage option given to the pipeline; the rest at the stage's default."""
        shared = {opt.name: getattr(self, opt.name) for opt in options(StageConfig) if opt.pipeline is not False}
        given: dict[str, dict[str, Any]] = {}
        for p in pipeline_options():
            value = self.stage_options.get(p.name)
            for step, opt in p.targets:
                if value is not None:
                    given.setdefault(step, {})[opt.name] = value
        out = {}
        for plan in stage_registry.PIPELINE_PLAN:
            mode = {"mode": plan.mode} if plan.mode else {}
            out[plan.name] = STAGE_CONFIGS[plan.stage.name](**shared, **mode, **given.get(plan.name, {})).resolve()
        return out

    def params(self) -> dict[str, Any]:
        """The pipeline's own options and the stage options given to it (each stage run logs all of its own)."""
        out = super().params()
        for name, value in self.stage_options.items():
            if value is not None:
                out[name] = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
        return out


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


#: Where the benchmark's pipelines register their models unless --register-name names another: a model
#: of their own, so that seeds fitted on other splits never compete with (nor move) the champion of
#: ``ar-gse-<dataset>``, the quickstart's.
BENCHMARK_REGISTER_NAME = "ar-gse-{dataset}-benchmark"

#: The pipeline options the benchmark sets itself for each pipeline it starts, in place of the
#: pipeline's own: one pipeline per seed (``--seeds``) and test prior (``--test-prior``, a list here).
BENCHMARK_OWN = ("test_prior",)


def benchmark_pass_through() -> tuple[PassThrough, ...]:
    """The pipeline options ``argse benchmark`` passes to every pipeline as ``argse pipeline`` takes them."""
    return tuple(p for p in pipeline_options() if p.name not in BENCHMARK_OWN)


@dataclass
class BenchmarkConfig(StageConfig):
    """``argse benchmark``: the pipeline over several seeds (and test priors), side by side, and one
    summary run. Its own options, and the pipeline options given to it (``stage_options``), which reach
    every pipeline as ``argse pipeline`` takes them (:func:`benchmark_pass_through`)."""

    STAGE: ClassVar[str] = "benchmark"

    seed: int = 0  # not an option here: --seeds
    seeds: tuple[int, ...] = option("0,1,2", parse=parse_seeds, metavar="S[,S...]",
                                    help="The seeds, one pipeline each (splits, initialisation, batches).")
    test_prior: tuple[str, ...] = option("lt", parse=parse_priors, metavar="PRIOR[,PRIOR...]",
                                         help=f"The target label priors, one pipeline each per seed ({', '.join(PRIORS)}).")
    workers: int | None = option(hashed=False, help="Pipelines run side by side (default: what the machine's "
                                                   "cores and memory fit; --dry-run says which).")
    engine: str = option("local", choices=ENGINES, hashed=False,
                         help="Where the pipelines run: local (processes of this machine) or ray (one task each on a "
                              "Ray cluster; the extra: pip install -e \".[ray]\"; docs/cluster.md).")
    ray_address: str | None = option(hashed=False, metavar="HOST:PORT",
                                     help="--engine ray: the head node's address (default: RAY_ADDRESS, else the "
                                          "cluster this machine joined with `ray start`).")
    force: bool = option(False, hashed=False, help="Rerun every pipeline even when an identical one finished.")
    stage_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def resolve(self) -> "BenchmarkConfig":
        cfg = self._resolved()
        if cfg.workers is not None and cfg.workers < 1:
            raise ArgseUsageError(f"--workers {cfg.workers} must be >= 1 (or left out: what the machine fits)")
        if cfg.ray_address and cfg.engine != "ray":
            raise ArgseUsageError(f"--ray-address is for --engine ray (the engine is {cfg.engine}): add --engine ray")
        known = {p.name for p in benchmark_pass_through()}
        unknown = sorted(set(cfg.stage_options) - known)
        if unknown:
            raise ArgseUsageError(f"argse benchmark has no option --{unknown[0].replace('_', '-')}")
        for seed in cfg.seeds:  # every pipeline's options are checked before anything runs
            for prior in cfg.test_prior:
                cfg.pipeline_config(seed, prior)
        return cfg

    def pipeline_config(self, seed: int, prior: str) -> "PipelineConfig":
        """The resolved config of the pipeline of one seed and prior (registering in the benchmark's
        own model unless --register-name names one: :data:`BENCHMARK_REGISTER_NAME`)."""
        given = {k: v for k, v in self.stage_options.items() if v is not None}
        given.setdefault("register_name", BENCHMARK_REGISTER_NAME.format(dataset=self.dataset))
        return PipelineConfig(dataset=self.dataset, data_dir=self.data_dir, seed=seed, device=self.device,
                              verbose=self.verbose, stage_options={**given, "test_prior": prior}).resolve()

    def pipeline_args(self, seed: int, prior: str) -> list[str]:
        """``argse pipeline`` arguments that give :meth:`pipeline_config`."""
        cfg = self.pipeline_config(seed, prior)
        args = ["--dataset", cfg.dataset, "--data-dir", cfg.data_dir, "--seed", str(seed), "--device", cfg.device]
        for name, value in cfg.stage_options.items():
            args += ["--" + name.replace("_", "-"), show_value(value)]
        return args + (["--verbose"] if self.verbose else [])

    def params(self) -> dict[str, Any]:
        out = super().params()
        for name, value in self.stage_options.items():
            if value is not None:
                out[name] = show_value(value)
        return out


__all__ = [
    "option", "options", "Option", "parse_group_thresholds",
    "StageConfig", "SingleStageConfig", "SplitsConfig", "ExpertsConfig", "GatingConfig", "ArgseConfig", "EvaluateConfig", "PipelineConfig",
    "PassThrough", "pipeline_options", "STAGE_CONFIGS", "BenchmarkConfig", "benchmark_pass_through", "parse_seeds",
    "parse_priors", "BENCHMARK_REGISTER_NAME",
]
