"""Shared fixtures: a private MLflow store per test, the CLI run in-process, CIFAR- and
Fashion-MNIST-format folders, and session-wide stores that already hold trained runs (built once,
copied per test)."""

from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from argse.testing.servers import free_port, wait_for_http  # noqa: F401 (one helper each for every test that starts a server)

REPO = Path(__file__).resolve().parents[1]

# The expert runs' system metrics are sampled every half second in the tests (3 s in use), so that even
# the tests' short trainings have some (tests/test_experts_stage.py).
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
# MLflow's usage telemetry: nothing to send it to here, and its thread unsets a variable while a server
# command copies the environment (an `mlflow server` once died of it at start, KeyError).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")

PIPELINE_ARGS = ("pipeline", "--dataset", "digits-lt", "--epochs", "4", "--gating-epochs", "10",
                 "--selective-rounds", "1", "--eg-rounds", "5", "--n-boot", "20", "--coverage-grid", "1,0.8,0.6,0.4,0.2")


#: Fixtures that train stages or start servers: a test that uses one is slow (as is every test marked
#: `slow` by hand: those start `mlflow run`, a server, PostgreSQL or a pipeline in a subprocess).
SLOW_FIXTURES = {"digits_experts", "digits_chain", "digits_pipeline", "experts_store", "chain_store",
                 "pipeline_store", "server", "twins", "model"}


def pytest_collection_modifyitems(config, items):
    """`pytest -m "not slow"` is the fast part: the unit tests, seconds in all.

    The files are ordered by their number of slow tests, most first (a file keeps its order inside):
    the suite runs one file per worker (pyproject.toml's `--dist loadfile`), and the long files
    started first finish while the short ones fill the other worker, instead of one long file
    starting last and running alone."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable: each file's tests keep their order


# -- CPU time per test ------------------------------------------------------------------------------
# `pytest --cpu-durations=N` lists the N tests that took the most CPU time: this process's and that of
# the subprocesses it waited for (setup, call and teardown together). Unlike --durations' wall-clock
# seconds, a machine busy with other work does not stretch it, so the fast tier's budget (no fast test
# over 5 s) can be checked on a shared machine. Run it with -n 0: pytest-xdist's workers report no times.


def pytest_addoption(parser):
    parser.addoption("--cpu-durations", type=int, default=None, metavar="N",
                     help="show the N tests that took the most CPU time (with the subprocesses they waited for)")


_CPU_SECONDS: dict[str, float] = {}


def _cpu_now() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    started = _cpu_now()
    yield
    _CPU_SECONDS[item.nodeid] = _cpu_now() - started


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.getoption("--cpu-durations")
    if n is None or not _CPU_SECONDS:
        return
    terminalreporter.section(f"the {n} tests with the most CPU time (s, with waited-for subprocesses)")
    for nodeid, seconds in sorted(_CPU_SECONDS.items(), key=lambda kv: -kv[1])[:n]:
        terminalreporter.write_line(f"{seconds:7.2f}  {nodeid}")
    terminalreporter.write_line(f"{sum(_CPU_SECONDS.values()):7.2f}  in all, {len(_CPU_SECONDS)} tests")


def _use_copy(db: Path, workdir: Path, mp: pytest.MonkeyPatch) -> str:
    """Point MLflow (env and client) at a copy of ``db`` in ``workdir``, which becomes the cwd."""
    from argse import tracking

    for name in _MLFLOW_ENV:
        mp.delenv(name, raising=False)
    mp.chdir(workdir)
    if db != workdir / "mlflow.db":
        shutil.copy(db, workdir / "mlflow.db")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.configure(uri)
    return uri


def _end_runs() -> None:
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def _build(folder: Path, db: Path, commands) -> None:
    """Run ``argse`` commands in-process against a copy of ``db`` kept in ``folder``."""
    from argse.cli import main

    with pytest.MonkeyPatch.context() as mp:
        _use_copy(db, folder, mp)
        for args in commands:
            try:
                main(list(args))
            except SystemExit as exc:
                assert not exc.code, f"argse {' '.join(args)} failed"


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
    yield _use_copy(_migrated_db, tmp_path, monkeypatch)
    _end_runs()


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
    from datasets import write_cifar100_folder

    root = tmp_path_factory.mktemp("cifar")
    write_cifar100_folder(root, per_class_train=30, per_class_test=10, seed=1)
    return root


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    """A tiny Fashion-MNIST folder: the four gzipped IDX files, random pixels. 600 train images per
    class give the reverse IF=100 profile 6, 10, 16, ..., 600 (7 classes above 20 images, 3 below)."""
    from datasets import write_fashion_mnist_folder

    return write_fashion_mnist_folder(tmp_path_factory.mktemp("fashion"), per_class_train=600, per_class_test=30, seed=2)


@pytest.fixture(autouse=True)
def _no_system_fashion_mnist(tmp_path_factory, monkeypatch):
    """Tests never read the Debian package's Fashion-MNIST: the system folder points at an empty one."""
    from argse.data import loaders

    monkeypatch.setattr(loaders, "FASHION_SYSTEM_DIR", tmp_path_factory.getbasetemp() / "no-system-fashion-mnist")


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


def with_kill_point(env: dict[str, str], point: str, marks: Path | None = None) -> dict[str, str]:
    """``env`` for a subprocess that SIGKILLs itself at ``point``: the kill points are installed from the
    test side (tests/killpoints/sitecustomize.py), never by the product. ``marks``: the folder where the
    processes of a point that counts them (``experts:stage:<n>``) leave their pids."""
    return {**env, "PYTHONPATH": str(REPO / "tests" / "killpoints") + os.pathsep + env.get("PYTHONPATH", ""),
            "ARGSE_KILL_AT": point, **({"ARGSE_KILL_MARKS": str(marks)} if marks is not None else {})}


# -- session stores with trained runs ---------------------------------------------------------------



@pytest.fixture(scope="session")
def digits_experts(tmp_path_factory, _migrated_db):
    """A store holding a digits-lt splits run and an `--expert all` experts run.

    Returns ``(folder, ids)`` with the ids of splits, experts (the parent), ce, logitadjust and
    balsoftmax. Use it through ``experts_store``, which gives each test its own copy of the database."""
    import mlflow

    folder = tmp_path_factory.mktemp("digits-experts")
    _build(folder, _migrated_db, [["splits", "--dataset", "digits-lt"],
                                  ["experts", "--dataset", "digits-lt", "--epochs", "6", "--checkpoint-every", "3"]])
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ar-gse/digits-lt").experiment_id
    ids = {"splits": client.search_runs([exp], "tags.\"argse.stage\" = 'splits'")[0].info.run_id}
    for run in client.search_runs([exp], "tags.\"argse.stage\" = 'experts'"):
        ids[run.data.tags["argse.expert"].replace("all", "experts")] = run.info.run_id
    return folder, ids


@pytest.fixture(scope="session")
def digits_chain(digits_experts, tmp_path_factory):
    """``digits_experts`` plus gating (pretrain, selective) and an AR-GSE fit. Returns ``(folder, ids)``
    with the ids above and pretrain, selective, argse."""
    source, ids = digits_experts
    folder = tmp_path_factory.mktemp("digits-chain")
    _build(folder, source / "mlflow.db", [
        ["gating", "--mode", "pretrain", "--epochs", "30", "--dataset", "digits-lt"],
        ["gating", "--mode", "selective", "--rounds", "2", "--epochs-per-round", "5", "--dataset", "digits-lt"],
        ["fit", "--rounds", "8", "--dataset", "digits-lt"],
    ])
    ids = dict(ids)
    with pytest.MonkeyPatch.context() as mp:
        from argse import tracking

        _use_copy(folder / "mlflow.db", folder, mp)
        ids["pretrain"] = tracking.resolve_upstream(
            "gating", "latest", dataset="digits-lt", lineage={"argse.gating_mode": "pretrain"}).info.run_id
        ids["selective"] = tracking.resolve_upstream(
            "gating", "latest", dataset="digits-lt", lineage={"argse.gating_mode": "selective"}).info.run_id
        ids["argse"] = tracking.resolve_upstream("argse", "latest", dataset="digits-lt").info.run_id
    return folder, ids


@pytest.fixture(scope="session")
def digits_pipeline(tmp_path_factory, _migrated_db):
    """A store holding one complete (small) `argse pipeline` on digits-lt."""
    folder = tmp_path_factory.mktemp("digits-pipeline")
    _build(folder, _migrated_db, [PIPELINE_ARGS])
    return folder


@pytest.fixture
def experts_store(digits_experts, tmp_path, monkeypatch):
    """This test's own copy of the ``digits_experts`` database (artifacts stay shared, read-only)."""
    folder, ids = digits_experts
    yield _use_copy(folder / "mlflow.db", tmp_path, monkeypatch), ids
    _end_runs()


@pytest.fixture
def chain_store(digits_chain, tmp_path, monkeypatch):
    """This test's own copy of the ``digits_chain`` database."""
    folder, ids = digits_chain
    yield _use_copy(folder / "mlflow.db", tmp_path, monkeypatch), ids
    _end_runs()


@pytest.fixture
def pipeline_store(digits_pipeline, tmp_path, monkeypatch):
    """This test's own copy of the ``digits_pipeline`` database."""
    yield _use_copy(digits_pipeline / "mlflow.db", tmp_path, monkeypatch)
    _end_runs()



def post_json(url: str, payload, timeout: float = 60) -> tuple[int, dict]:
    """POST `payload` as JSON; the HTTP status and the decoded answer (also for 4xx / 5xx answers)."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
