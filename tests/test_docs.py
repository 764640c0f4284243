"""The docs name only code that exists: every dotted ``argse.<module>...`` name in README.md and docs/
resolves to a module, or to a name in one (a function, class or constant), and every file of the
repository they name (``argse/config.py``, ``bench/precision.py``, ``tests/test_losses.py``) is there."""

from __future__ import annotations

import importlib
import re

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: ``argse.`` then dotted identifiers: ``argse.selective.matched.matched_aurc``, ``argse.tracking``.
DOTTED = re.compile(r"(?<![\w./])argse(?:\.[A-Za-z_]\w*)+")
#: The modules and packages of argse, by the name after ``argse.``: a dotted name that starts with one
#: is code (tags such as ``argse.stage`` or ``argse.sha256/...`` start with none).
MODULES = {path.stem if path.suffix == ".py" else path.name for path in (REPO / "argse").iterdir()
           if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()}


def resolve(name: str) -> bool:
    """Whether ``name`` is a module or a name in one (``argse.a.b.f``: import argse.a.b, then ``f``)."""
    parts = name.split(".")
    for cut in range(len(parts), 1, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def named_in_docs() -> dict[str, list[str]]:
    """``{dotted name: [the files that name it]}`` for every name of argse's code in the docs."""
    found: dict[str, list[str]] = {}
    for path in DOCS:
        for name in DOTTED.findall(path.read_text()):
            name = name.rstrip(".")
            if name.split(".")[1] in MODULES:
                found.setdefault(name, []).append(path.relative_to(REPO).as_posix())
    return found


def test_every_argse_name_the_docs_give_exists():
    names = named_in_docs()
    assert len(names) > 10  # the docs do name code: the pattern finds it
    missing = {name: sorted(set(files)) for name, files in names.items() if not resolve(name)}
    assert not missing, missing


def test_every_file_the_docs_name_exists():
    named = {match for path in DOCS
             for match in re.findall(r"(?<![\w/.-])(?:argse|bench|docs|entrypoints|tests)/[\w./-]+\.(?:py|md|sh)\b",
                                     path.read_text())}
    assert len(named) > 10
    assert not sorted(name for name in named if not (REPO / name).exists())
