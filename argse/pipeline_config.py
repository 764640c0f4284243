"""The configs of the commands that chain the stages: ``argse pipeline`` (its own options, and the
stage options it passes on, derived from the stage configs: :func:`pipeline_options`) and
``argse benchmark`` (the pipeline over several seeds and test priors). Neither restates a stage's
option: a stage option reaches them from its one declaration in :mod:`argse.config`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from argse import ENGINES, ArgseUsageError, stage_registry
from argse.config import STAGE_CONFIGS, StageConfig
from argse.data.splits import PRIORS
from argse.options import Option, flag, option, options, parse_priors, parse_seeds, show_value

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
        return flag(self.name)

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
            raise ArgseUsageError(f"argse pipeline has no option {flag(unknown[0])}")
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


#: The pipeline options the benchmark sets itself for each pipeline it starts, in place of the
#: pipeline's own: one pipeline per seed (``--seeds``) and test prior (``--test-prior``, a list here).
BENCHMARK_OWN = ("test_prior",)


def benchmark_pass_through() -> tuple[PassThrough, ...]:
    """The pipeline options ``argse benchmark`` passes to every pipeline as ``argse pipeline`` takes them."""
    return tuple(p for p in pipeline_options() if p.name not in BENCHMARK_OWN)


#: Where the benchmark's pipelines register their models unless --register-name names another: a model
#: of their own, so that seeds fitted on other splits never compete with (nor move) the champion of
#: ``ar-gse-<dataset>``, the quickstart's.
BENCHMARK_REGISTER_NAME = "ar-gse-{dataset}-benchmark"


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
            raise ArgseUsageError(f"argse benchmark has no option {flag(unknown[0])}")
        for seed in cfg.seeds:  # every pipeline's options are checked before anything runs
            for prior in cfg.test_prior:
                cfg.pipeline_config(seed, prior)
        cfg._check_summary_coverages()
        return cfg

    def _check_summary_coverages(self) -> None:
        """The summary reports every seed's errors at the coverages :data:`argse.selective.seeds.METRICS`
        names (``..._at0.8``): a grid without one of them would fail only after every pipeline ran."""
        from argse.selective.seeds import METRICS

        grid = self.pipeline_config(self.seeds[0], self.test_prior[0]).stage_configs()["evaluate"].coverages()
        needed = sorted({float(m.rpartition("_at")[2]) for m in METRICS if "_at" in m}, reverse=True)
        missing = [tau for tau in needed if not any(abs(tau - c) < 1e-9 for c in grid)]
        if missing:
            raise ArgseUsageError(
                f"--coverage-grid {','.join(f'{c:g}' for c in grid)} lacks {', '.join(f'{t:g}' for t in missing)}: the "
                f"benchmark's summary reports each seed's errors at {', '.join(f'{t:g}' for t in needed)}; add them")

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
            args += [flag(name), show_value(value)]
        return args + (["--verbose"] if self.verbose else [])

    def params(self) -> dict[str, Any]:
        out = super().params()
        for name, value in self.stage_options.items():
            if value is not None:
                out[name] = show_value(value)
        return out


__all__ = ["PassThrough", "pipeline_options", "PipelineConfig", "BenchmarkConfig", "benchmark_pass_through",
           "BENCHMARK_REGISTER_NAME"]
