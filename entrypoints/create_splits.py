"""The seed's `create_splits.py`: same as `argse splits` with the same options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from argse.launch import main  # noqa: E402

if __name__ == "__main__":
    main(shim="splits")
