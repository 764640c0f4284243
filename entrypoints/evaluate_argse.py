"""The seed's `evaluate_argse.py`: `argse evaluate`, where `--dataset {test,val,tunev}` names the split (as
in the seed) and `--checkpoint` the model; `--dataset digits-lt` still names the benchmark."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from argse.launch import main  # noqa: E402

if __name__ == "__main__":
    main(shim="evaluate")
