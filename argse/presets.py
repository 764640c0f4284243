"""The dataset presets: everything that differs between the built-in benchmarks, declared once.

Free of heavy imports (no torch, numpy or MLflow), so that the launcher (:mod:`argse.__main__`) can read
a preset before torch is imported: a preset's ``portable_kernels`` is a choice of CPU kernels that only
the environment torch starts in can make.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetPreset:
    """Everything that differs between the benchmarks: where the images come from, their shape, the
    long-tail profile, the expert network, the augmentation, the training defaults and the CPU policy.
    Looked up once, where a config is resolved (:meth:`StageConfig._resolved`); the stages, ``data/``
    and ``models/`` read the resolved config's ``preset``."""

    name: str
    source: str  # the loader of its images (argse.data.loaders.LOADERS)
    backbone: str  # its expert network (argse.models.backbones.BACKBONES)
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
    #: The same numbers, bit for bit, on any x86 CPU: every process of a stage on this preset uses
    #: torch's and MKL's portable CPU kernels (see :data:`PORTABLE_KERNELS`), at a cost measured by
    #: bench/portable_kernels.py. For the quickstart, whose table the README quotes.
    portable_kernels: bool = False


PRESETS: dict[str, DatasetPreset] = {
    # CIFAR-100-LT, imbalance factor 100: 500 -> 5 images per class, 10,847 in all. The 10,000
    # test images are split per class into tunev / val / test (30 / 20 / 50 images per class).
    "cifar100-lt": DatasetPreset(
        name="cifar100-lt", source="cifar100", backbone="resnet32", num_classes=100, image_shape=(32, 32, 3), imb_factor=100.0,
        tunev_ratio=0.3, val_ratio=0.2, group_thresholds=(20,), epochs=200, batch_size=128,
        lr=0.1, warmup_epochs=5, augmentation="cifar", gating_epochs=100, gating_batch_size=256,
        cpu_fast_path=True,  # bench/train_throughput.py: 1.2x from channels_last, 1.8x more from bf16
    ),
    # digits-lt: scikit-learn's bundled 8x8 digits (offline). Half of each class is held out for
    # evaluation; the other half is the pool the long-tailed train set is drawn from. IF=20 gives
    # 87 -> 4 images per class (87 is the pool's smallest class) and a 5 head / 5 tail split at the
    # default threshold of 20. Portable kernels: its README table is what any x86 CPU prints.
    "digits-lt": DatasetPreset(
        name="digits-lt", source="digits", backbone="digits-net", num_classes=10, image_shape=(8, 8, 1), imb_factor=20.0,
        tunev_ratio=0.3, val_ratio=0.2, group_thresholds=(20,), epochs=30, batch_size=64,
        lr=0.05, warmup_epochs=1, augmentation="digits", gating_epochs=60, gating_batch_size=128,
        # One thread: 15 ms a step whether or not another process holds a core; two threads are
        # 1.5x faster on an idle machine but 3.8x slower with one core busy (bench/digits_threads.py).
        cpu_threads=1, portable_kernels=True,
    ),
    # fashion-mnist-lt: Fashion-MNIST's 60,000 train images at IF=100 with the long tail in reverse
    # label order (class 9 "Ankle boot" keeps 6000 images, class 0 "T-shirt/top" 60; 14,886 in all),
    # so the tail holds T-shirt/top, Trouser and Pullover, which are easy to confuse with Shirt,
    # Dress and Coat; in index order the tail would be Sneaker, Bag and Ankle boot, which every method
    # gets right. The 10,000 test images are split per class into tunev / val / test (300 / 200 / 500
    # per class). The threshold 200 gives 7 head / 3 tail classes (train counts 60, 100, 166 | 278 ...).
    "fashion-mnist-lt": DatasetPreset(
        name="fashion-mnist-lt", source="fashion-mnist", backbone="resnet8-grey", num_classes=10, image_shape=(28, 28, 1), imb_factor=100.0,
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


#: What ``portable_kernels`` sets before torch is imported: torch's ATen kernels without the CPU's vector
#: extensions, and MKL's conditional numerical reproducibility at its portable code path (one result on
#: every x86 CPU). The oneDNN convolutions are switched off after import (:func:`apply_portable_kernels`).
#: Measured: a digits-lt pipeline gives the same table, byte for byte, with every library capped at AVX2
#: (``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``, ``OPENBLAS_CORETYPE``, ``NPY_DISABLE_CPU_FEATURES``)
#: as on an AVX-512 CPU; without these settings the two differ (tests/test_portable_kernels.py).
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}


def dataset_in_argv(argv: list[str], default: str = "digits-lt", *, folders: bool = True) -> str:
    """The dataset a command line names (``--dataset X`` or ``--dataset=X``), read before the command is
    parsed, so before torch is imported: the first value that is a preset's name, else (``folders``) the
    first value given, a folder of the user's images, which no preset describes, else ``default``. The
    original ``evaluate_argse.py`` spells a split ``--dataset test``; its shim reads with
    ``folders=False``, so a split name never stands for a dataset."""
    given = []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == "--dataset" and not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if name == "--dataset" and value in PRESETS:
            return value
        if name == "--dataset" and value and not value.startswith("-"):
            given.append(value)
    return given[0] if given and folders else default


#: ``ARGSE_PORTABLE_KERNELS=0`` in the environment: the CPU's own kernels even where the preset asks for
#: portable ones (faster; the last digits then vary by CPU). bench/portable_kernels.py times both.
SWITCH = "ARGSE_PORTABLE_KERNELS"


def wants_portable_kernels(p: DatasetPreset | None) -> bool:
    """Whether a process working on preset ``p`` computes with portable kernels."""
    return p is not None and p.portable_kernels and os.environ.get(SWITCH, "1") != "0"


def set_portable_environment(dataset: str) -> bool:
    """Set :data:`PORTABLE_KERNELS` in this process's environment (inherited by the processes it starts)
    when ``dataset``'s preset asks for portable kernels; whether it did. Takes effect only where torch
    has not been imported yet."""
    if not wants_portable_kernels(PRESETS.get(dataset)):
        return False
    os.environ.update(PORTABLE_KERNELS)
    return True


def apply_compute_policy(p: DatasetPreset) -> None:
    """What a process computing a stage of preset ``p`` sets once torch is imported: the preset's CPU
    threads and :func:`apply_portable_kernels`. Every process that fits or checks a stage's numbers
    applies it (the stages through the CLI, a maintainer's promotion), since the thread count changes
    the order of float sums and a fit's search can turn that into another rule."""
    if p.cpu_threads:
        import torch

        torch.set_num_threads(p.cpu_threads)
    apply_portable_kernels(p)


def apply_portable_kernels(p: DatasetPreset) -> None:
    """The part of portable kernels that is set after import: torch's oneDNN (mkldnn) convolutions off."""
    if wants_portable_kernels(p):
        import torch

        torch.backends.mkldnn.enabled = False
