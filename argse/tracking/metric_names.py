"""MLflow metric names for the cells of a results table: ``<method>/<column>``, made valid."""

from __future__ import annotations

import posixpath
import re

import pandas as pd

from argse.selective.compare import is_number

_METRIC_NAME = re.compile(r"^[/\w.\- ]*$")


def _sanitise(part: str) -> str:
    part = part.replace("[", ".").replace("]", "")
    return re.sub(r"[^\w.\- ]", "_", part)


def metric_key(method: str, column: str) -> str:
    """The MLflow metric name of a table cell: `<method>/<column>` with the method and column made valid.

    MLflow metric names may hold only letters, digits, `_ - . /` and spaces (`mlflow.utils.validation`;
    colons are refused on Windows, brackets everywhere). Mapping: "[" becomes ".", "]" is dropped, and
    any other disallowed character (a "/" inside a name included) becomes "_". So "ar-gse[worst]" and
    "aurc_worst" give "ar-gse.worst/aurc_worst", and "chow[uniform-ensemble]" gives
    "chow.uniform-ensemble/...".
    """
    key = f"{_sanitise(str(method))}/{_sanitise(str(column))}"
    if not _METRIC_NAME.match(key) or posixpath.normpath(key) != key or key.startswith("..") or len(key) > 250:
        raise ValueError(f"method {method!r} and column {column!r} give no valid MLflow metric name ({key!r}).")
    return key


def metric_dict(table: pd.DataFrame) -> dict[str, float]:
    """Every numeric cell of a table with a ``method`` column as {metric_key(method, column): value},
    for mlflow.log_metrics."""
    out: dict[str, float] = {}
    for record in table.to_dict(orient="records"):  # a loop over methods
        for column, value in record.items():
            if column == "method" or not is_number(value):
                continue
            key = metric_key(record["method"], column)
            if key in out:
                raise ValueError(f"two cells map to the metric name {key!r}; rename the methods so they differ.")
            out[key] = float(value)
    return out
