"""Folders of image files as users bring them, written from scikit-learn's bundled digits (offline):
class folders or ImageNet-LT-style list files, PNG or JPEG, grey, colour or mixed, with a natural long
tail. The tests of the folder path and bench/readme_tables.py's folder example write them."""

from __future__ import annotations

from pathlib import Path

import numpy as np


#: A natural long tail over the ten digits: class 0 the head, class 9 the tail.
DIGITS_TAIL = (40, 30, 22, 16, 12, 9, 7, 5, 4, 3)


def write_image_folder(root: str | Path, train_counts: tuple[int, ...] = DIGITS_TAIL, per_class_test: int = 4, *,
                       size: int = 32, suffix: str = ".png", grey: bool | str = False, lists: bool = False,
                       per_class_val: int = 0, class_names: bool = True, seed: int = 0) -> Path:
    """Write scikit-learn's digits as image files under ``root``, as a user's folder holds them: class
    folders ``train/<digit>/`` and ``test/<digit>/`` (and ``val/`` with ``per_class_val``), or with
    ``lists`` the images under ``images/<digit>/`` and ImageNet-LT-style ``train.txt`` / ``test.txt`` /
    ``val.txt`` (with ``class_names`` a ``classes.txt``). Each digit is scaled to ``size`` x ``size``
    and given a random tint (RGB), or kept grey (``grey=True``), or every other image grey
    (``grey="mixed"``); ``suffix`` ``.png`` or ``.jpg``. Returns ``root``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    root = Path(root)
    names = [f"digit{c}" for c in range(len(train_counts))]
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c, name in enumerate(names):
        pool = rng.permutation(np.flatnonzero(digits.target == c))
        take = {"train": train_counts[c], "val": per_class_val, "test": per_class_test}
        start = 0
        for split in ("train", "val", "test"):
            for i in pool[start:start + take[split]]:
                pixels = np.rint(digits.images[i] * (255 / 16)).astype(np.uint8)
                image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
                if grey is False or (grey == "mixed" and i % 2):
                    tint = rng.uniform(0.4, 1.0, 3)
                    image = Image.fromarray((np.asarray(image)[..., None] * tint).astype(np.uint8), "RGB")
                relative = (f"images/{name}/{split}-{i}{suffix}" if lists else f"{split}/{name}/{i}{suffix}")
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                image.save(root / relative)
                lines[split].append(f"{relative} {c}")
            start += take[split]
    if lists:
        for split, rows in lines.items():
            if rows:
                (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
        if class_names:
            (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root
