"""Configuration: dataset presets and one dataclass per stage, built from the CLI.

A stage's dataclass holds every option it runs with, resolved (no ``None`` left where a preset
supplies the value). ``params()`` is what gets logged to MLflow and hashed for the cache; options
that change nothing about the result (``verbose``, ``dry_run``) are not part of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from argse import EXPERTS, OBJECTIVES, ArgseUsageError, stage_registry
from argse.data.splits import PRIORS


@dataclass(frozen=True)
class DatasetPreset:
    """What differs between the benchmarks: shapes, the long-tail profile and training defaults."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # H, W, C of the stored uint8 images
    imb_factor: float
    tunev_ratio: float
    val_ratio: float
    group_thresholds: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float
    warmup_epochs: int
    augmentation: str
    gating_epochs: int
    gating_batch_size: int
    cpu_threads: int = 0  # torch threads on the CPU; 0 keeps torch's default
    cpu_fast_path: bool = False  # channels_last, and bf16 autocast where the CPU has bf16 units
    longtail_order: str = "index"  # the head: class 0 ("index") or class C-1 ("reverse")


PRESETS: dict[str, DatasetPreset] = {
    # CIFAR-100-LT, imbalance factor 100: 500 -> 5 images per class, 10,847 in all. The 10,000
    # test images are split per class into tunev / val / test (30 / 20 / 50 images per class).
    "cifar100-lt": DatasetPreset(
        name="cifar100-lt", num_classes=100, image_shape=(32, 32, 3), imb_factor=100.0,
        tunev_ratio=0.3, val_ratio=0.2, group_thresholds=(20,), epochs=200, batch_size=128,
        lr=0.1, warmup_epochs=5, augmentation="cifar", gating_epochs=100, gating_batch_size=256,
        cpu_fast_path=True,  # bench/train_throughput.py: 1.2x from channels_last, 1.8x more from bf16
    ),
    # digits-lt: scikit-learn's bundled 8x8 digits (offline). Half of each class is held out for
    # evaluation; the other half is the pool the long-tailed train set is drawn from. IF=20 gives
    # 89 -> 4 images per class and a 5 head / 5 tail split at the default threshold of 20.
    "digits-lt": DatasetPreset(
        name="digits-lt", num_classes=10, image_shape=(8, 8, 1), imb_factor=20.0,
        tunev_ratio=0.3, val_ratio=0.2, group_thresholds=(20,), epochs=30, batch_size=64,
        lr=0.05, warmup_epochs=1, augmentation="digits", gating_epochs=60, gating_batch_size=128,
        # One thread: 15 ms a step whether or not another process holds a core; two threads are
        # 1.5x faster on an idle machine but 3.8x slower with one core busy (bench/digits_threads.py).
        cpu_threads=1,
    ),
    # fashion-mnist-lt: Fashion-MNIST's 60,000 train images at IF=100 with the long tail in reverse
    # label order (class 9 "Ankle boot" keeps 6000 images, class 0 "T-shirt/top" 60; 14,886 in all),
    # so the tail holds T-shirt/top, Trouser and Pullover, which are easy to confuse with Shirt,
    # Dress and Coat; in index order the tail would be Sneaker, Bag and Ankle boot, which every method
    # gets right. The 10,000 test images are split per class into tunev / val / test (300 / 200 / 500
    # per class). The threshold 200 gives 7 head / 3 tail classes (train counts 60, 100, 166 | 278 ...).
    "fashion-mnist-lt": DatasetPreset(
        name="fashion-mnist-lt", num_classes=10, image_shape=(28, 28, 1), imb_factor=100.0,
        tunev_ratio=0.3, val_ratio=0.2, group_thresholds=(200,), epochs=20, batch_size=128,
        lr=0.1, warmup_epochs=1, augmentation="fashion", gating_epochs=60, gating_batch_size=256,
        longtail_order="reverse",
        # bench/precision.py --dataset fashion-mnist-lt: bf16 + channels_last trains 1.76x faster than
        # fp32 (same accuracy). One thread: about 1,900 img/s, idle or not; two threads: about 3,000
        # on an idle CPU (4.5 s epochs) but 140-380 with another job on it (--busy), as on a shared
        # machine. One thread keeps the whole pipeline near 10 minutes either way.
        cpu_fast_path=True, cpu_threads=1,
    ),
}
DATASETS = tuple(PRESETS)


def preset(dataset: str) -> DatasetPreset:
    """The preset of a benchmark, or a one-line error listing the known ones."""
    try:
        return PRESETS[dataset]
    except KeyError:
        raise ArgseUsageError(
            f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}"
        ) from None


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
    from argse.selective.compare import COVERAGES, check_coverages

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


@dataclass
class StageConfig:
    """Options every stage shares."""

    dataset: str = "cifar100-lt"
    data_dir: str = "data"
    seed: int = 0
    device: str = "auto"
    verbose: bool = False
    dry_run: bool = False

    # Options that do not change a stage's result: neither logged as params nor hashed.
    _PRESENTATIONAL = ("verbose", "dry_run")

    def _check_choices(self, **choices: tuple[str, ...]) -> None:
        """One usage error for the first option whose value is not among its choices."""
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ArgseUsageError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(allowed)}")

    def dry_run_header(self, title: str) -> str:
        """The first lines of a dry run: what runs, that no run is created, and every option."""
        return "\n".join([f"{title} (dry run: no run created)"]
                         + [f"  {key} = {value}" for key, value in self.params().items()])

    def params(self) -> dict[str, Any]:
        """The resolved options as MLflow params (what the config hash is computed over)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in self._PRESENTATIONAL or f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, (tuple, list)):
                value = ",".join(str(v) for v in value)
            out[f.name] = value
        return out


@dataclass
class SplitsConfig(StageConfig):
    imb_factor: float | None = None
    tunev_ratio: float | None = None
    val_ratio: float | None = None
    group_thresholds: tuple[int, ...] | None = None

    def resolve(self) -> "SplitsConfig":
        p = preset(self.dataset)
        cfg = dataclasses.replace(
            self,
            imb_factor=p.imb_factor if self.imb_factor is None else float(self.imb_factor),
            tunev_ratio=p.tunev_ratio if self.tunev_ratio is None else float(self.tunev_ratio),
            val_ratio=p.val_ratio if self.val_ratio is None else float(self.val_ratio),
            group_thresholds=parse_group_thresholds(self.group_thresholds or p.group_thresholds),
        )
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


@dataclass
class ExpertsConfig(StageConfig):
    expert: str = "all"
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    la_tau: float = 1.0
    weight_decay: float = 5e-4
    warmup_epochs: int | None = None
    checkpoint_every: int = 10
    compile: bool = False
    precision: str = "auto"
    splits_run: str = "latest"
    resume: str | None = None
    _PRESENTATIONAL = ("verbose", "dry_run", "resume")

    def experts(self) -> tuple[str, ...]:
        return EXPERTS if self.expert == "all" else (self.expert,)

    def resolve(self) -> "ExpertsConfig":
        p = preset(self.dataset)
        if self.expert != "all" and self.expert not in EXPERTS:
            raise ArgseUsageError(
                f"unknown expert {self.expert!r}: choose one of {', '.join(EXPERTS)} or all"
            )
        cfg = dataclasses.replace(
            self,
            epochs=p.epochs if self.epochs is None else int(self.epochs),
            lr=p.lr if self.lr is None else float(self.lr),
            batch_size=p.batch_size if self.batch_size is None else int(self.batch_size),
            warmup_epochs=p.warmup_epochs if self.warmup_epochs is None else int(self.warmup_epochs),
        )
        if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
            raise ArgseUsageError("--epochs and --batch-size must be >= 1 and --lr > 0")
        if cfg.checkpoint_every < 1:
            raise ArgseUsageError("--checkpoint-every must be >= 1")
        cfg._check_choices(precision=("auto", "fp32", "bf16"))
        return cfg


@dataclass
class GatingConfig(StageConfig):
    mode: str = "pretrain"
    experts_run: str = "latest"
    pretrain_run: str = "latest"
    test_prior: str = "lt"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-4
    load_balance: float = 0.01
    patience: int = 10
    objective: str = "worst"
    cost: float = 0.2
    rounds: int = 4
    epochs_per_round: int = 10

    def resolve(self) -> "GatingConfig":
        p = preset(self.dataset)
        self._check_choices(mode=("pretrain", "selective"), objective=OBJECTIVES, test_prior=PRIORS)
        cfg = dataclasses.replace(
            self,
            epochs=p.gating_epochs if self.epochs is None else int(self.epochs),
            batch_size=p.gating_batch_size if self.batch_size is None else int(self.batch_size),
        )
        if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.rounds < 1 or cfg.epochs_per_round < 1:
            raise ArgseUsageError("--epochs, --batch-size, --rounds and --epochs-per-round must be >= 1 and --lr > 0")
        if cfg.cost < 0:
            raise ArgseUsageError("--cost must be >= 0")
        return cfg


@dataclass
class ArgseConfig(StageConfig):
    gating_run: str = "latest"
    objective: str = "worst"
    cost: float | None = None
    target_coverage: float | None = None
    test_prior: str = "lt"
    rounds: int = 20
    step: float = 2.0
    n_starts: int = 12
    group_thresholds_mode: str = "global"
    register_name: str | None = None

    def resolve(self) -> "ArgseConfig":
        preset(self.dataset)
        self._check_choices(objective=OBJECTIVES, group_thresholds_mode=("global", "per-group"), test_prior=PRIORS)
        if self.cost is not None and self.target_coverage is not None:
            raise ArgseUsageError("give --cost or --target-coverage, not both")
        target = self.target_coverage
        if self.cost is None and target is None:
            target = 0.8
        if target is not None and not 0 < target <= 1:
            raise ArgseUsageError(f"--target-coverage {target} must lie in (0, 1]")
        if self.cost is not None and self.cost < 0:
            raise ArgseUsageError("--cost must be >= 0")
        if self.group_thresholds_mode == "per-group" and target is None:
            raise ArgseUsageError("--group-thresholds-mode per-group needs --target-coverage (each group's coverage)")
        if self.rounds < 1 or self.step <= 0 or self.n_starts < 1:
            raise ArgseUsageError("--rounds and --n-starts must be >= 1 and --step > 0")
        return dataclasses.replace(self, target_coverage=target,
                                   register_name=self.register_name or f"ar-gse-{self.dataset}")


@dataclass
class EvaluateConfig(StageConfig):
    model_uri: str = "latest"
    split: str = "test"
    test_prior: str = "lt"
    coverage_grid: str = "default"
    n_boot: int = 200
    check_images: int = 64
    save_results: bool = False
    output_dir: str = "results"
    _PRESENTATIONAL = ("verbose", "dry_run", "save_results", "output_dir")

    def resolve(self) -> "EvaluateConfig":
        preset(self.dataset)
        self._check_choices(split=("test", "val", "tunev"), test_prior=PRIORS)
        if self.n_boot < 1 or self.check_images < 0:
            raise ArgseUsageError("--n-boot must be >= 1 and --check-images >= 0")
        return dataclasses.replace(self, coverage_grid=resolve_coverage_grid(self.coverage_grid))

    def coverages(self) -> tuple[float, ...]:
        """The target coverages of the coverage-matched comparison, descending."""
        return tuple(float(v) for v in self.coverage_grid.split(","))


PIPELINE_STEPS = stage_registry.PIPELINE_STEPS  # --start-from / --stop-at names, in order


@dataclass
class PipelineConfig(StageConfig):
    """The chain's options: what passes through to each stage, and where to start and stop."""

    start_from: str = "data"
    stop_at: str = "eval"
    force: bool = False
    imb_factor: float | None = None
    group_thresholds: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    la_tau: float = 1.0
    checkpoint_every: int = 5
    gating_epochs: int | None = None
    selective_rounds: int = 2
    epochs_per_round: int = 5
    objective: str = "worst"
    cost: float | None = None
    target_coverage: float | None = None
    test_prior: str = "lt"
    eg_rounds: int = 20
    register_name: str | None = None
    split: str = "test"
    coverage_grid: str = "default"
    n_boot: int = 200
    _PRESENTATIONAL = ("verbose", "dry_run", "force")

    def resolve(self) -> "PipelineConfig":
        preset(self.dataset)
        self._check_choices(start_from=PIPELINE_STEPS, stop_at=PIPELINE_STEPS, objective=OBJECTIVES,
                            test_prior=PRIORS, split=("test", "val", "tunev"))
        if PIPELINE_STEPS.index(self.start_from) > PIPELINE_STEPS.index(self.stop_at):
            raise ArgseUsageError(f"--start-from {self.start_from} comes after --stop-at {self.stop_at}")
        return dataclasses.replace(self, coverage_grid=resolve_coverage_grid(self.coverage_grid))


__all__ = [
    "DATASETS", "EXPERTS", "OBJECTIVES", "DatasetPreset", "PRESETS", "preset",
    "parse_group_thresholds", "StageConfig", "SplitsConfig", "ExpertsConfig", "GatingConfig", "ArgseConfig", "EvaluateConfig", "PipelineConfig", "PIPELINE_STEPS",
]
