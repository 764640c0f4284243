"""What portable kernels cost the quickstart: `argse pipeline --dataset digits-lt` on a fresh store with
the preset's portable kernels (the same numbers on any x86 CPU) and with the CPU's own
(`ARGSE_PORTABLE_KERNELS=0`), interleaved, each timed from start to exit.

    python bench/portable_kernels.py [--repeats 2]

Prints each wall time, the median of each mode and their ratio (portable / native), with the CPU.
Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from argse.presets import SWITCH
from argse.training.utils import cpu_model
from common import argse, store_env


def pipeline_seconds(portable: bool) -> float:
    """One quickstart pipeline in a fresh store: its wall time in seconds (it must succeed)."""
    with tempfile.TemporaryDirectory(prefix="argse-bench-kernels-") as tmp:
        seconds, _ = argse(["pipeline", "--dataset", "digits-lt"], store_env(tmp, **{SWITCH: "1" if portable else "0"}),
                           tmp)
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(args.repeats):
        for portable in ((True, False) if repeat % 2 == 0 else (False, True)):
            times[portable].append(pipeline_seconds(portable))
            print(f"repeat {repeat + 1}: {'portable' if portable else 'native  '} kernels {times[portable][-1]:6.1f} s",
                  flush=True)
    portable, native = statistics.median(times[True]), statistics.median(times[False])
    print(f"\n{cpu_model()}, {os.cpu_count()} CPUs; digits-lt quickstart, fp32, one torch thread, median of "
          f"{args.repeats}:\n  portable kernels {portable:.1f} s, native kernels {native:.1f} s, "
          f"ratio portable / native {portable / native:.2f}x")


if __name__ == "__main__":
    main()
