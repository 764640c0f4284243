"""Shared fixtures: a private MLflow store per test, the CLI run in-process, a CIFAR-format folder."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")


@pytest.fixture(scope="session")
def _migrated_db(tmp_path_factory):
    """An empty SQLite store with MLflow's schema, made once: creating the schema takes seconds,
    copying the file does not."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, _migrated_db):
    """A fresh SQLite tracking store in a temp dir, which is also the working directory."""
    import shutil

    import mlflow

    from argse import tracking

    for name in _MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(_migrated_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.configure(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run ``argse ARGS`` in-process; returns the exit code and what it printed."""
    from argse.cli import main

    def invoke(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A tiny CIFAR-100-format folder (the real pickle layout, random pixels)."""
    from argse.data.loaders import write_cifar100_folder

    root = tmp_path_factory.mktemp("cifar")
    write_cifar100_folder(root, per_class_train=30, per_class_test=10, seed=1)
    return root


@pytest.fixture
def offline(monkeypatch):
    """No network: any download attempt fails as it does on an offline machine."""
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (offline test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def subprocess_env(tracking_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _MLFLOW_ENV}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    return env


@pytest.fixture(scope="session")
def digits_experts(tmp_path_factory, _migrated_db):
    """A store holding a digits-lt splits run and an `--expert all` experts run, made once per session.

    Returns ``(folder, {"splits": run_id, "experts": parent_id, "ce": id, ...})``. Use it through
    ``experts_store``, which gives each test its own copy of the database."""
    import shutil

    import mlflow

    from argse import tracking
    from argse.cli import main

    folder = tmp_path_factory.mktemp("digits-experts")
    shutil.copy(_migrated_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        for name in _MLFLOW_ENV:
            mp.delenv(name, raising=False)
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        tracking.configure(uri)
        for args in (["splits", "--dataset", "digits-lt"],
                     ["experts", "--dataset", "digits-lt", "--epochs", "6", "--checkpoint-every", "3"]):
            try:
                main(args)
            except SystemExit as exc:
                assert not exc.code, f"argse {' '.join(args)} failed"
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name("ar-gse/digits-lt").experiment_id
        ids = {"splits": tracking.resolve_upstream("splits", "latest", dataset="digits-lt").info.run_id}
        for run in client.search_runs([exp], "tags.\"argse.stage\" = 'experts'"):
            ids[run.data.tags["argse.expert"].replace("all", "experts")] = run.info.run_id
    return folder, ids


@pytest.fixture
def experts_store(digits_experts, tmp_path, monkeypatch):
    """This test's own copy of the ``digits_experts`` database (artifacts stay shared, read-only)."""
    import shutil

    import mlflow

    from argse import tracking

    folder, ids = digits_experts
    for name in _MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(folder / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.configure(uri)
    yield uri, ids
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="session")
def digits_chain(digits_experts, tmp_path_factory):
    """``digits_experts`` plus gating (pretrain, selective) and an AR-GSE fit, made once per session.
    Returns ``(folder, ids)`` with ids of splits, experts, ce, ..., pretrain, selective, argse."""
    import shutil

    from argse import tracking
    from argse.cli import main

    source, ids = digits_experts
    folder = tmp_path_factory.mktemp("digits-chain")
    shutil.copy(source / "mlflow.db", folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    ids = dict(ids)
    with pytest.MonkeyPatch.context() as mp:
        for name in _MLFLOW_ENV:
            mp.delenv(name, raising=False)
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        tracking.configure(uri)
        for key, stage, args in (("pretrain", "gating", ["gating", "--mode", "pretrain", "--epochs", "30"]),
                                 ("selective", "gating", ["gating", "--mode", "selective", "--rounds", "2",
                                                          "--epochs-per-round", "5"]),
                                 ("argse", "argse", ["fit", "--rounds", "8"])):
            try:
                main([*args, "--dataset", "digits-lt"])
            except SystemExit as exc:
                assert not exc.code, f"argse {' '.join(args)} failed"
            ids[key] = tracking.resolve_upstream(stage, "latest", dataset="digits-lt").info.run_id
    return folder, ids


@pytest.fixture
def chain_store(digits_chain, tmp_path, monkeypatch):
    """This test's own copy of the ``digits_chain`` database."""
    import shutil

    import mlflow

    from argse import tracking

    folder, ids = digits_chain
    for name in _MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(folder / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.configure(uri)
    yield uri, ids
    while mlflow.active_run() is not None:
        mlflow.end_run()


PIPELINE_ARGS = ("pipeline", "--dataset", "digits-lt", "--epochs", "4", "--gating-epochs", "10",
                 "--selective-rounds", "1", "--eg-rounds", "5", "--n-boot", "20", "--cost-grid", "6")


@pytest.fixture(scope="session")
def digits_pipeline(tmp_path_factory, _migrated_db):
    """A store holding one complete (small) `argse pipeline` on digits-lt, made once per session."""
    import shutil

    from argse import tracking
    from argse.cli import main

    folder = tmp_path_factory.mktemp("digits-pipeline")
    shutil.copy(_migrated_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        for name in _MLFLOW_ENV:
            mp.delenv(name, raising=False)
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        tracking.configure(uri)
        try:
            main(list(PIPELINE_ARGS))
        except SystemExit as exc:
            assert not exc.code, "the pipeline failed"
    return folder


@pytest.fixture
def pipeline_store(digits_pipeline, tmp_path, monkeypatch):
    """This test's own copy of the ``digits_pipeline`` database."""
    import shutil

    import mlflow

    from argse import tracking

    for name in _MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(digits_pipeline / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.configure(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
