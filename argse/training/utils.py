"""Small pieces of the training loop: optimizer and schedule, seeding, device, autocast, RNG state."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import sys
import time
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from argse import DEVICES
REFERENCE_BATCH_SIZE = 128


def peak_lr(lr: float, batch_size: int) -> float:
    """The learning rate the schedule peaks at: ``lr`` is given for batch 128 and scales linearly."""
    return lr * batch_size / REFERENCE_BATCH_SIZE


def make_optimizer_and_scheduler(
    model: nn.Module,
    *,
    lr: float,
    batch_size: int,
    weight_decay: float = 5e-4,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float,
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (momentum 0.9, nesterov) and a per-iteration schedule: linear warm-up, then cosine to 0.

    The peak learning rate is :func:`peak_lr`. Weight decay applies to every parameter
    (BatchNorm and biases included), as in the usual CIFAR long-tail recipes. Call
    ``scheduler.step()`` after every ``optimizer.step()``.
    """
    if lr <= 0 or batch_size < 1:
        raise ValueError(
            f"lr must be > 0 and batch_size >= 1; got lr={lr}, batch_size={batch_size}."
        )
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(
            f"epochs and steps_per_epoch must be >= 1; got {epochs} and {steps_per_epoch}."
        )
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must lie in [0, epochs={epochs}]; got {warmup_epochs}.")
    optimizer = torch.optim.SGD(
        model.parameters(), lr=peak_lr(lr, batch_size), momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
    total_steps = epochs * steps_per_epoch
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


def on_terminal() -> bool:
    """Whether progress bars have a terminal to draw on (stderr, where tqdm writes); off one (a file,
    a pipe, CI) the stages print one line per epoch instead."""
    return sys.stderr.isatty()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) global random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {name!r}.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was requested but no CUDA device is available; use --device cpu or auto."
        )
    return torch.device(name)


def autocast_context(
    device: torch.device, enabled: bool = True, cpu_bf16: bool = False
) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; on CPU a no-op context unless ``cpu_bf16``; nothing when not ``enabled``.

    CPU bf16 autocast pays off only on CPUs with native bf16 matrix units (Intel AMX / AVX512-BF16):
    bench/train_throughput.py measured ResNet-32 training 1.8x faster with it on such a CPU.
    """
    kind = torch.device(device).type
    if enabled and kind == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if enabled and kind == "cpu" and cpu_bf16:
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_mode(precision: str, device: torch.device, cpu_fast_path: bool) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) for expert training. ``precision`` ``auto``: bf16 on CUDA, and
    on a CPU with bf16 units when the dataset preset opts in (``cpu_fast_path``, CIFAR); channels_last
    on CUDA and with that CPU fast path. ``fp32`` / ``bf16`` force the precision."""
    fast_cpu = device.type == "cpu" and cpu_fast_path
    if precision == "auto":
        bf16 = device.type == "cuda" or (fast_cpu and cpu_has_native_bf16())
    else:
        bf16 = precision == "bf16"
    return bf16, device.type == "cuda" or fast_cpu


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (Intel AMX-BF16 or AVX512-BF16), where bf16 autocast
    speeds training up rather than emulating bf16 slowly."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return ("amx_bf16" in flags or "avx512_bf16" in flags) and torch.backends.mkldnn.is_available()


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), or the platform's description."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_times() -> dict[str, tuple[float, float]]:
    """{cpuN: (idle seconds, total seconds)} since boot, per core (psutil; idle includes iowait)."""
    out = {}
    for n, times in enumerate(psutil.cpu_times(percpu=True)):
        idle = times.idle + getattr(times, "iowait", 0.0)
        busy = sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))
        out[f"cpu{n}"] = (idle, idle + busy)
    return out


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity set)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def free_cores(window_s: float = 0.5) -> tuple[int, float]:
    """(CPU cores this process may use, of which free now). Free: the idle share of those cores over
    ``window_s`` seconds (per-core CPU times), so a job that ended a few seconds ago does not count, as
    it would in the 1-minute load average for a minute after; the cores less the load average where
    the times cannot be read."""
    allowed = usable_cores()
    try:
        before = _cpu_times()
        time.sleep(window_s)
        after = _cpu_times()
        free = 0.0
        for cpu in allowed:
            (idle0, total0), (idle1, total1) = before[f"cpu{cpu}"], after[f"cpu{cpu}"]
            free += (idle1 - idle0) / (total1 - total0) if total1 > total0 else 1.0
    except (OSError, KeyError, ValueError):
        free = len(allowed) - os.getloadavg()[0]
    return len(allowed), min(float(len(allowed)), max(0.0, free))


def memory_available() -> int | None:
    """Bytes of memory available to new processes (psutil's ``available``: Linux's MemAvailable), None
    where unknown."""
    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError):
        return None


def cpu_kernels() -> str:
    """Which CPU kernels torch computes with: ``portable kernels`` (the vector extensions unused, MKL on
    its portable path, oneDNN off: the same numbers on any x86 CPU, see ``argse.presets``) or the
    vector extensions torch chose for this CPU (``AVX512 kernels``)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "DEFAULT" and not torch.backends.mkldnn.enabled and os.environ.get("MKL_CBWR") == "COMPATIBLE":
        return "portable kernels (the same numbers on any x86 CPU)"
    return f"{capability} kernels"


def describe_system(device: torch.device, bf16: bool, *, device_option: str = "", precision_option: str = "",
                    scope: str = "") -> list[str]:
    """Two lines for ``--verbose`` and ``--dry-run``: the library versions, then the device the work
    runs on (GPU or CPU model, memory, threads) and its precision, each beside the option value it was
    resolved from (``--device auto``); ``scope`` says which work runs there."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = f"{cpu_model()}, {cpus} CPUs{', bf16 units' if cpu_has_native_bf16() else ''}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hardware = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
                    f"{torch.cuda.device_count()} GPU(s) visible; host {cpu}")
    else:
        threads = torch.get_num_threads()
        hardware = f"{cpu}; {threads} torch thread{'s' if threads != 1 else ''}; {cpu_kernels()}"
    precision = "bf16 autocast" if bf16 else "fp32"
    return [f"system: torch {torch.__version__}, torchvision {installed('torchvision')}, mlflow {installed('mlflow')}, "
            f"Python {platform.python_version()}",
            f"device: {device}" + (f" from --device {device_option}" if device_option else "") + f" ({hardware}); "
            f"precision {precision}" + (f" from --precision {precision_option}" if precision_option else "")
            + (f"; {scope}" if scope else "")]


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """The state of every random generator (Python, NumPy, torch CPU, CUDA, and ``generator`` if given).

    Holds only tensors and plain Python values, so a checkpoint with it loads with
    ``torch.load(..., weights_only=True)``.
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore the generators saved by ``capture_rng_state`` (``generator`` from its saved state)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["kind"],
            saved["keys"].numpy().astype(np.uint32),
            saved["position"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for index, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
    if generator is not None:
        if "generator" not in state:
            raise ValueError("the saved RNG state holds no data generator state to restore.")
        generator.set_state(state["generator"].cpu())
