"""The whole evaluate stage at this checkout beside the same stage at a reference commit, on one store.

    python bench/evaluate_stage.py --store /path/to/mlflow.db --model-uri <argse run id>
                                   [--reference 1ca7acf] [--test-prior lt] [--repeats 3]

`argse evaluate` of the fit run `--model-uri` (and its gating and expert runs, read from the store),
run once per repeat by each checkout, interleaved, each time on a fresh copy of the store (the store
given is never written), `--check-images 0` (a reference may not load a model that later code logged).
The reference runs from a temporary git worktree of `--reference` (by default the commit issue 37 was
filed at, before the fits searched their family). Prints each checkout's best wall time, the process
start included, and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, argse, commit, store_env


def stage_seconds(checkout: Path, store: Path, args: argparse.Namespace, work: Path) -> float:
    """Wall seconds of one `python -m argse evaluate` from `checkout` on a fresh copy of `store`."""
    shutil.copy(store, work / "mlflow.db")
    env = store_env(work, PYTHONPATH=str(checkout))
    command = ["evaluate", "--dataset", args.dataset, "--test-prior", args.test_prior, "--model-uri", args.model_uri,
               "--check-images", "0"]
    _, helped = argse(["evaluate", "--help"], env, work)
    if "--rerun" in helped.stdout:
        command.append("--rerun")
    seconds, _ = argse(command, env, work)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, type=Path, help="an SQLite store (copied, never written)")
    parser.add_argument("--model-uri", required=True, help="the argse (fit) run to evaluate")
    parser.add_argument("--reference", default="1ca7acf")
    parser.add_argument("--dataset", default="fashion-mnist-lt")
    parser.add_argument("--test-prior", default="lt")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.store.is_file():
        sys.exit(f"--store {args.store}: no such file; give the mlflow.db of a benchmark's store")
    with tempfile.TemporaryDirectory(prefix="evaluate-stage-") as tmp:
        reference = Path(tmp) / "reference"
        subprocess.run(["git", "worktree", "add", "--detach", str(reference), args.reference], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            best = {"reference": float("inf"), "this": float("inf")}
            for _ in range(args.repeats):  # interleaved, so that a busy spell hits both
                for name, checkout in (("reference", reference), ("this", ROOT)):
                    work = Path(tmp) / name
                    work.mkdir(exist_ok=True)
                    best[name] = min(best[name], stage_seconds(checkout, args.store, args, work))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(reference)], cwd=ROOT, capture_output=True)
    print(f"argse evaluate --dataset {args.dataset} --test-prior {args.test_prior} (model {args.model_uri}), "
          f"best of {args.repeats}, wall time with the process start:")
    print(f"  {args.reference} (reference)  {best['reference']:6.1f} s")
    print(f"  {commit()} (this checkout)  {best['this']:6.1f} s")
    print(f"ratio (this / reference): {best['this'] / best['reference']:.2f}x")


if __name__ == "__main__":
    main()
