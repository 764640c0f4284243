"""The seed's `train_argse.py`: `argse fit`; `--resume` refits from the newest finished selective gating run
(and its expert runs), or says in one line that there is nothing to resume."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from argse.launch import main  # noqa: E402

if __name__ == "__main__":
    main(shim="fit")
