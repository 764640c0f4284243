"""The seed's `create_splits_advanced.py` (`--imb-factor 50 --val-ratio 0.25 --verbose`): the same as
`argse splits`, which takes those options itself."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from argse.launch import main  # noqa: E402

if __name__ == "__main__":
    main(shim="splits")
