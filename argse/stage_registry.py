"""The stages as data: one declaration per stage of its names, its inputs and what it writes.

Each stage has a name (its ``argse.stage`` tag), a CLI command (``argse fit`` for the argse stage), an
MLproject entry point (``main`` for the pipeline) and a pipeline step (``--start-from`` /
``--stop-at``: data, experts, gating, argse, eval). The pipeline's order and wiring, the producer named
in a "run this first" error, and the tag and artifact names that one stage writes and another reads all
come from here. Pure data: this module imports nothing heavy, so the config, the tracking layer and the
stages can all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional

from argse import EXPERTS

# -- tags a stage writes for another to read ------------------------------------------------------

TAG_UPSTREAM = "argse.upstream."  # + an input's key (splits, experts, ...): the run id(s) consumed
TAG_EXPERT = "argse.expert"  # experts: which loss the run trains (ce, logitadjust, balsoftmax) or all
TAG_EXPERT_RUN = "argse.expert_run."  # + expert name, on an `--expert all` parent: that expert's run id
TAG_PRECISION = "argse.precision"  # experts: bf16 or fp32
TAG_CHANNELS_LAST = "argse.channels_last"  # experts: True or False
TAG_SPLITS_FINGERPRINT = "argse.splits_fingerprint"  # splits: the hash of the split indices
TAG_GATING_MODE = "argse.gating_mode"  # gating: pretrain or selective
TAG_REGISTERED_MODEL = "argse.registered_model"  # argse: <registered name>/<version>
TAG_CHAMPION_DECISION = "argse.champion_decision"  # argse: what became of the champion alias, one phrase
TAG_PROMOTED_FROM = "argse.promoted_from"  # argse: the teammate's fit run a maintainer's refit promoted
TAG_VERSION_RUN = "argse.run_id"  # on a model version: the argse run that registered it
TAG_VERSION_RISK = "argse.val_worst_l2r"  # on a model version: its run's val worst-group L2R risk
TAG_MODEL_URI = "argse.model_uri"  # evaluate: the model URI it evaluated
TAG_DRY_RUN = "argse.dry_run"  # pipeline: a run `mlflow run` made for a dry run
TAG_STEP = "argse.step."  # + pipeline step name, on the pipeline run: "<action> <run id>"
TAG_BENCHMARK_PIPELINE = "argse.benchmark.pipeline."  # + "seed<S>.<prior>", on a benchmark run: the pipeline it read
TAG_BENCHMARK_FAILED = "argse.benchmark.failed."  # + "seed<S>.<prior>", on a benchmark run: why that pipeline failed
TAG_BENCHMARK_ENGINE = "argse.benchmark.engine"  # on a benchmark run: where its pipelines ran (local, ray <address>)
TAG_RAY_NODE = "argse.ray.node"  # on every run a pipeline made on a Ray node: the node's id
TAG_RAY_NODE_IP = "argse.ray.node_ip"  # ... and its address

# -- artifact paths, relative to the run's artifact root -------------------------------------------

SPLITS_DIR = "splits"  # indices, labels, class counts, class_to_group, weights, fingerprint
LOGITS = "logits/{split}.npz"  # an expert's calibrated logits, labels and indices on one split
CHECKPOINT = "checkpoints/last.pt"  # an expert's last training checkpoint
EXPERT_WEIGHTS = "expert/weights.pt"  # an expert's calibrated weights, as the served model holds them (weights only)
MODEL = "model"  # an expert's mlflow.pytorch model; the argse run's pyfunc
GATE = "gating/gate.pt"  # the gate's state dict and config (feature statistics included)
GATE_META = "gating/config.json"  # the gate's config, its experts and splits run, the best epoch/round
GATE_RULE = "gating/rule.json"  # selective gating: the plug-in rule of the best round
RULE = "rule/rule.json"  # argse: the fitted plug-in rule
EG_HISTORY = "rule/eg_history.json"  # argse, worst objective: the exponentiated-gradient history
RESULTS_DIR = "results"  # evaluate: the comparison tables
RESULTS_TABLE = "table.csv"  # in RESULTS_DIR (and in --output-dir): one row a method, best first
COVERAGE_POINTS = "coverage_points.csv"  # in RESULTS_DIR: each method's errors at each target coverage
BENCHMARK_DIR = "benchmark"  # benchmark: the summary over seeds (table.csv, table.md, figures, logs)


def logits_path(split: str) -> str:
    """Where an expert run keeps its logits on ``split``."""
    return LOGITS.format(split=split)


def expert_run_tag(expert: str) -> str:
    """The tag of an ``--expert all`` parent that holds ``expert``'s run id."""
    return TAG_EXPERT_RUN + expert


def expert_runs_of_parent(tags: Mapping[str, str]) -> dict[str, Optional[str]]:
    """``{expert: run id}`` from the tags of an ``--expert all`` parent (``None`` where one is missing)."""
    return {name: tags.get(expert_run_tag(name)) for name in EXPERTS}


def join_expert_runs(ids: Mapping[str, str]) -> str:
    """The value of ``argse.upstream.experts``: the expert run ids in EXPERTS order, comma-separated."""
    return ",".join(ids[name] for name in EXPERTS)


def split_expert_runs(value: str) -> Optional[dict[str, str]]:
    """``{expert: run id}`` from an ``argse.upstream.experts`` value; ``None`` when it holds no full set."""
    ids = [i for i in (value or "").split(",") if i]
    return dict(zip(EXPERTS, ids)) if len(ids) == len(EXPERTS) else None


# -- the stages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    """An upstream run a stage consumes: tagged ``argse.upstream.<key>``, hashed as ``<key>_run``."""

    key: str
    step: str  # the pipeline step (a PipelineStep name) whose run it is
    option: Optional[str] = None  # the config field through which the pipeline hands the id over
    mode: Optional[str] = None  # read only in this mode of the stage

    @property
    def hash_key(self) -> str:
        return f"{self.key}_run"


@dataclass(frozen=True)
class Stage:
    name: str  # the argse.stage tag
    command: str  # `argse <command>`
    entry_point: str  # `mlflow run . -e <entry_point>`
    step: Optional[str]  # the pipeline's --start-from / --stop-at name; None for the pipeline itself
    reads: tuple[Input, ...] = ()
    tags: tuple[str, ...] = ()  # stage-specific tags it writes (beside argse.stage, argse.dataset, argse.upstream.*, ...)
    artifacts: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()  # the values of --mode, each tagged TAG_GATING_MODE; the first is the default

    def inputs(self, mode: Optional[str] = None) -> tuple[Input, ...]:
        """The inputs a run of this stage in ``mode`` consumes."""
        return tuple(i for i in self.reads if i.mode is None or i.mode == mode)

    def upstream(self, mode: Optional[str] = None, **ids: Optional[str]) -> dict[str, Optional[str]]:
        """The upstream mapping a run tags and hashes (``{"splits_run": id, ...}``) from the run ids of
        its inputs by key; exactly the declared inputs, or a ValueError naming the difference."""
        keys = [i.key for i in self.inputs(mode)]
        if sorted(ids) != sorted(keys):
            raise ValueError(f"the {self.name} stage{f' ({mode})' if mode else ''} reads {', '.join(keys) or 'nothing'}; "
                             f"got {', '.join(sorted(ids)) or 'nothing'}")
        return {f"{key}_run": ids[key] for key in keys}

    def producer(self, lineage: Optional[Mapping[str, str]] = None) -> str:
        """The command that makes a run of this stage (with ``lineage``'s mode, else the first)."""
        mode = (lineage or {}).get(TAG_GATING_MODE) or (self.modes[0] if self.modes else None)
        return f"argse {self.command}" + (f" --mode {mode}" if mode else "")


SPLITS_STAGE = Stage("splits", command="splits", entry_point="splits", step="data",
               tags=(TAG_SPLITS_FINGERPRINT,), artifacts=(SPLITS_DIR,))
EXPERTS_STAGE = Stage(
    "experts", command="experts", entry_point="experts", step="experts",
    reads=(Input("splits", "splits", option="splits_run"),),
    tags=(TAG_EXPERT, TAG_EXPERT_RUN, TAG_PRECISION, TAG_CHANNELS_LAST),
    artifacts=(MODEL, LOGITS, CHECKPOINT, EXPERT_WEIGHTS))
GATING_STAGE = Stage(
    "gating", command="gating", entry_point="gating", step="gating",
    reads=(Input("experts", "experts", option="experts_run"), Input("splits", "splits"),
           Input("pretrain", "gating-pretrain", option="pretrain_run", mode="selective")),
    tags=(TAG_GATING_MODE,), artifacts=(GATE, GATE_META, GATE_RULE), modes=("pretrain", "selective"))
ARGSE_STAGE = Stage(
    "argse", command="fit", entry_point="argse", step="argse",
    reads=(Input("gating", "gating-selective", option="gating_run"), Input("experts", "experts"),
           Input("splits", "splits")),
    tags=(TAG_REGISTERED_MODEL, TAG_CHAMPION_DECISION, TAG_VERSION_RUN, TAG_VERSION_RISK, TAG_PROMOTED_FROM),
    artifacts=(MODEL, RULE, EG_HISTORY))
EVALUATE_STAGE = Stage(
    "evaluate", command="evaluate", entry_point="evaluate", step="eval",
    reads=(Input("argse", "argse", option="model_uri"), Input("gating", "gating-selective"),
           Input("experts", "experts"), Input("splits", "splits")),
    tags=(TAG_MODEL_URI,), artifacts=(f"{RESULTS_DIR}/{RESULTS_TABLE}",))
PIPELINE_STAGE = Stage("pipeline", command="pipeline", entry_point="main", step=None,
                       tags=(TAG_DRY_RUN, TAG_STEP, TAG_RAY_NODE, TAG_RAY_NODE_IP))
BENCHMARK_STAGE = Stage("benchmark", command="benchmark", entry_point="benchmark", step=None,
                        tags=(TAG_BENCHMARK_PIPELINE, TAG_BENCHMARK_FAILED, TAG_BENCHMARK_ENGINE),
                        artifacts=(f"{BENCHMARK_DIR}/{RESULTS_TABLE}",))

STAGES: Mapping[str, Stage] = MappingProxyType(
    {s.name: s for s in (SPLITS_STAGE, EXPERTS_STAGE, GATING_STAGE, ARGSE_STAGE, EVALUATE_STAGE, PIPELINE_STAGE,
                         BENCHMARK_STAGE)})
PIPELINE_STEPS = tuple(s.step for s in STAGES.values() if s.step)  # data, experts, gating, argse, eval


def stage(name: str) -> Stage:
    """The stage called ``name`` (its argse.stage tag); a ValueError for a name no stage has."""
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"no stage {name!r}: the stages are {', '.join(STAGES)}") from None


@dataclass(frozen=True)
class PipelineStep:
    """One run the pipeline makes: the stage, its mode, and the tags a reusable run must carry."""

    name: str  # splits, experts, gating-pretrain, gating-selective, argse, evaluate
    stage: Stage
    mode: Optional[str] = None

    @property
    def lineage(self) -> dict[str, str]:
        if self.stage is EXPERTS_STAGE:
            return {TAG_EXPERT: "all"}  # the pipeline trains every expert under one parent run
        return {TAG_GATING_MODE: self.mode} if self.mode else {}

    @property
    def inputs(self) -> tuple[Input, ...]:
        return self.stage.inputs(self.mode)


PIPELINE_PLAN = tuple(
    PipelineStep(f"{s.name}-{mode}" if mode else s.name, s, mode)
    for s in STAGES.values() if s.step for mode in (s.modes or (None,)))
