"""The pinned dependencies are written three times because three tools read them (pip's
requirements.txt, the package's pyproject.toml, MLflow's conda.yaml): they must say the same."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^\s*(?:-\s+)?([A-Za-z0-9_.\-]+(?:\[[a-z,]+\])?==[^\s#]+)\s*$")


def _pins(lines) -> list[str]:
    return sorted(m.group(1) for line in lines if (m := PIN.match(line)))


def test_requirements_pyproject_and_conda_pin_the_same_versions():
    requirements = _pins((REPO / "requirements.txt").read_text().splitlines())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    conda = _pins((REPO / "conda.yaml").read_text().splitlines())
    assert len(requirements) >= 10
    assert sorted(project["dependencies"]) == requirements
    assert conda == requirements
    dev = _pins((REPO / "requirements-dev.txt").read_text().splitlines())
    assert sorted(project["optional-dependencies"]["dev"]) == dev
