"""Configuration: one dataclass per stage, the one declaration of its options.

Each field of a stage's dataclass declares an option with :func:`argse.options.option`: its type (the annotation), its
default or the preset key whose value per dataset is the default, its help line, its choices, whether
it is a param (logged to MLflow and hashed for the cache; ``verbose``, ``dry_run``, ``resume`` and the
like are not), and how ``argse pipeline`` passes it on. Derived from that, never restated: the click
options of each stage command and of ``argse pipeline`` (:mod:`argse.cli`), ``params()`` and the config
hash, the resume restore (:meth:`StageConfig.restore`), the pipeline's stage configs
(:meth:`argse.pipeline_config.PipelineConfig.stage_configs`) and MLproject (``python -m argse.mlproject``).
A resolved config holds every option it runs with (no ``None`` left where a preset supplies the value).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

from argse import DEVICES, EXPERTS, OBJECTIVES, ArgseUsageError, stage_registry
from argse.data.splits import EVAL_SPLITS, PRIORS, heldout_parts
from argse.options import flag, option, options, parse_group_thresholds, resolve_coverage_grid
from argse.presets import DATASETS, PRESETS, DatasetPreset

#: The param that names a folder dataset's content: its file list, the card and the preset they give
#: (:attr:`argse.dataset_card.FolderDataset.digest`).
DATA_DIGEST = "data_digest"
#: The param that names the content of the experts' ``--weights`` file.
WEIGHTS_DIGEST = "weights_sha256"


def dataset_preset(dataset: str, data_dir: str) -> tuple[DatasetPreset, Any]:
    """The preset of a built-in dataset, or of the folder of images ``data_dir`` run as ``dataset``
    with the folder itself (:func:`argse.dataset_card.open_folder`); one line when it is neither."""
    if dataset in PRESETS:
        return PRESETS[dataset], None
    from argse.dataset_card import open_folder

    folder = open_folder(data_dir, dataset)
    return folder.preset, folder


# -- the stages' configs ----------------------------------------------------------------------------


@dataclass
class StageConfig:
    """Options every stage shares."""

    STAGE: ClassVar[str] = ""  # the stage registry's name of the stage this configures

    dataset: str = option("digits-lt", help=f"The benchmark: one of the dataset presets {', '.join(DATASETS)} (digits-lt "
                                            "runs offline in a minute), or the name a folder of your own images "
                                            "(--data-dir) is run under.")
    data_dir: str = option("data", help="Where datasets are read from (and CIFAR-100 / Fashion-MNIST downloaded to); for "
                                        "your own images, their folder: train/ and test/ class folders, or train.txt "
                                        "and test.txt list files.")
    seed: int = option(0, help="Random seed of the splits, the initialisation and the batches.")
    device: str = option("auto", choices=DEVICES,
                         help="Where expert training runs (auto: cuda when available); the other stages compute on the CPU.")
    verbose: bool = option(False, hashed=False, help="More output, and the traceback on errors.")
    dry_run: bool = option(False, hashed=False, pipeline=False, help="Print the resolved plan; create no run.")
    #: The dataset's preset, set where the config is resolved (not an option: it follows ``dataset``).
    preset: DatasetPreset | None = dataclasses.field(default=None, compare=False, repr=False)
    #: A folder of the user's images, scanned where the config is resolved (None for a built-in dataset).
    folder: Any = dataclasses.field(default=None, compare=False, repr=False)  # argse.dataset_card.FolderDataset

    def _resolved(self):
        """This config with its dataset's preset attached, preset-valued options filled from it, every
        value cast to its option's type and every choice checked: one usage error line for the first
        bad one."""
        p, folder = dataset_preset(self.dataset, self.data_dir)
        updates = {"preset": p, "folder": folder}
        if folder is not None:
            updates["data_dir"] = str(folder.scan.root)
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
        """The first lines of a dry run: what runs, that no run is created, every option and, for a
        folder of images, what its scan found."""
        return "\n".join([f"{title} (dry run: no run created)"]
                         + [f"  {key} = {value}" for key, value in self.params().items()]
                         + (self.folder.describe() if self.folder is not None else []))

    def params(self) -> dict[str, Any]:
        """The resolved options as MLflow params (what the config hash is computed over); for a folder
        of images also :data:`DATA_DIGEST`, so that another folder, a changed image or another card
        never shares a run."""
        out = {}
        for opt in options(type(self)):
            if opt.hashed:
                value = getattr(self, opt.name)
                out[opt.name] = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
        if self.folder is not None:
            out[DATA_DIGEST] = self.folder.digest
        return out

    def source(self):
        """The images the splits are drawn from: a built-in dataset's arrays
        (:func:`argse.data.loaders.load_source`) or the folder's files
        (:meth:`argse.data.folder.FolderScan.source`)."""
        if self.folder is not None:
            return self.folder.source()
        from argse.data.loaders import load_source

        return load_source(self.preset.source, self.data_dir)

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

    imb_factor: float | None = option(preset="imb_factor", help="Imbalance factor: largest over smallest train class "
                                                                "(a folder of images keeps its natural tail unless given).")
    tunev_ratio: float | None = option(preset="tunev_ratio", help="Share of each class's held-out images for tunev.")
    val_ratio: float | None = option(preset="val_ratio", help="Share of each class's held-out images for val.")
    group_thresholds: tuple[int, ...] | None = option(
        preset="group_thresholds", parse=parse_group_thresholds, metavar="N[,N...]",
        help="Train-count thresholds: 20 = head/tail, 100,20 = many/medium/few.")

    def resolve(self) -> "SplitsConfig":
        cfg = self._resolved()
        if cfg.imb_factor is not None and cfg.imb_factor < 1:
            raise ArgseUsageError(f"--imb-factor {cfg.imb_factor} must be >= 1 (1 means balanced)")
        for name in ("tunev_ratio", "val_ratio"):
            if not 0 < getattr(cfg, name) < 1:
                raise ArgseUsageError(f"{flag(name)} must lie strictly between 0 and 1")
        if cfg.tunev_ratio + cfg.val_ratio >= 1:
            raise ArgseUsageError(
                "--tunev-ratio plus --val-ratio must stay below 1 so the test split is not empty"
            )
        if cfg.folder is not None:
            cfg.check_heldout()
        return cfg

    def check_heldout(self) -> None:
        """A folder's held-out images must give every evaluation split some rows: one line otherwise."""
        import numpy as np

        source = self.source()
        parts = heldout_parts(source.heldout_labels, source.num_classes, self.tunev_ratio, self.val_ratio,
                              np.random.default_rng(0), source.heldout_test)
        empty = [name for name, rows in parts.items() if len(rows) == 0]
        if empty:
            counts = np.bincount(source.heldout_labels, minlength=source.num_classes)
            raise ArgseUsageError(
                f"{self.data_dir}: the {empty[0]} split would be empty: {counts.min()} to {counts.max()} held-out images "
                f"per class are too few for --tunev-ratio {self.tunev_ratio:g} and --val-ratio {self.val_ratio:g}; add "
                "test images (or a val/ pool, which tunev and val are drawn from), or raise the ratios")


#: ``--at-once``: how the experts stage trains several experts (see :func:`argse.expert_runs.at_once.choose_mode`).
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
    weights: str | None = option(metavar="FILE|NAME", help="Trained weights each expert starts from: a local state "
                                 "dict (torch.save), or a torchvision weights name such as IMAGENET1K_V2 (downloaded; "
                                 "ResNet-18/50 only). The classifier is trained anew where the classes differ.")
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
        if cfg.weights and not Path(cfg.weights).expanduser().is_file():
            from argse.models.backbones import torchvision_weights

            torchvision_weights(cfg.preset.backbone, cfg.weights)  # a name torchvision knows, or one line
        return cfg

    def params(self) -> dict[str, Any]:
        """The stage's params, with the sha256 of a ``--weights`` file (:data:`WEIGHTS_DIGEST`): other
        weights under the same name never share a run."""
        out = super().params()
        if self.weights and Path(self.weights).expanduser().is_file():
            from argse.tracking.integrity import sha256

            out[WEIGHTS_DIGEST] = sha256(Path(self.weights).expanduser())
        return out


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


__all__ = ["StageConfig", "SingleStageConfig", "SplitsConfig", "ExpertsConfig", "GatingConfig", "ArgseConfig",
           "EvaluateConfig", "STAGE_CONFIGS"]
