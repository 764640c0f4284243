"""What a newcomer sees in the first hour: the quickstart's log in a file (one line per epoch, no
progress bars, no pickling warning) and its rerun reusing every stage, bars on a terminal, run names that say what each run is (also
under `mlflow run`), messages that say what happened, system information and a measured estimate
with --verbose / --dry-run, and a champion that holds no code and loads with the installed package."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import sysconfig
import termios
import threading
from pathlib import Path

import mlflow
import mlflow.models
import pytest
import torch
from mlflow.tracking import MlflowClient

from argse import fmt_number
from argse import EXPERTS
from conftest import PIPELINE_ARGS, REPO, subprocess_env

EPOCHS = 4
PIPELINE_STEPS = {"splits", "experts", "gating-pretrain", "gating-selective", "argse", "evaluate"}


def _runs(client=None):
    client = client or MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              order_by=["attributes.start_time ASC"])


def _children(parent, runs):
    return {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


@pytest.mark.slow
def test_quickstart_logged_to_a_file_has_one_line_per_epoch_named_runs_and_a_rerun_reuses_every_stage(store, tmp_path):
    log = tmp_path / "quickstart.log"
    # No dataset named: `mlflow run .` runs digits-lt.
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local",
           "-P", f"epochs={EPOCHS}", "-P", "gating_epochs=10", "-P", "n_boot=20"]
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(store), stdout=out, stderr=subprocess.STDOUT,
                              timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text and "it/s" not in text, "progress bars written to a file"
    for expert in EXPERTS:
        epochs = [line for line in text.splitlines() if re.match(rf"{expert} epoch \d+/{EPOCHS}: loss ", line)]
        assert len(epochs) == EPOCHS, (expert, epochs)
    assert "pickl" not in text.lower(), [line for line in text.splitlines() if "pickl" in line.lower()]

    runs = _runs()
    client = MlflowClient()
    home = client.get_experiment_by_name("ar-gse/digits-lt").experiment_id
    # Every stage run in ar-gse/digits-lt; MLflow's own run in Default is the launcher that points there.
    (launcher,) = [r for r in runs if r.info.experiment_id == "0"]
    (pipeline,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.experiment_id == home]
    assert {r.info.experiment_id for r in runs} == {"0", home}
    assert launcher.info.run_name == "mlflow run: pipeline digits-lt in ar-gse/digits-lt"
    assert launcher.data.tags["argse.launched"] == f"ar-gse/digits-lt/{pipeline.info.run_id}"
    assert pipeline.info.run_name == "pipeline digits-lt: ran splits..evaluate"
    assert _children(pipeline, runs) == PIPELINE_STEPS
    (experts,) = [r for r in runs if r.info.run_name == "experts"]
    assert _children(experts, runs) == {f"expert-{name}" for name in EXPERTS}

    # One formatting of the cost: the fit's line and evaluate's line print the logged cost alike.
    argse_run = next(r for r in runs if r.info.run_name == "argse")
    printed = re.findall(r"(?:argse|evaluate) run \w+: .*?cost ([0-9.e+-]+)", text)
    assert printed and set(printed) == {fmt_number(argse_run.data.metrics["cost"])}, printed
    champion = client.get_model_version_by_alias("ar-gse-digits-lt", "champion")
    assert champion.run_id == argse_run.info.run_id
    assert pipeline.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in runs)

    # One stage started alone, as the project is used (`mlflow run . -e experts`), with the quickstart's
    # options: it reuses the quickstart's experts and leaves only MLflow's launcher, which names them.
    alone = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "experts", "--env-manager", "local",
                            "-P", f"epochs={EPOCHS}"], cwd=tmp_path, env=subprocess_env(store), capture_output=True,
                           text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert f"experts: reused FINISHED run {experts.info.run_id} (experts): the same options, code and inputs" in alone.stdout
    (experts_launcher,) = [r for r in _runs() if r.info.run_id not in {r.info.run_id for r in runs}]
    assert experts_launcher.info.run_name == "mlflow run: experts digits-lt reused a run of ar-gse/digits-lt"
    assert experts_launcher.data.tags["argse.launched"] == f"ar-gse/digits-lt/{experts.info.run_id}"
    runs = _runs()

    # The same command again reuses every stage: a new pipeline run and MLflow's launcher, nothing else.
    again = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(store), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "| method |" in again.stdout, again.stdout[-3000:]  # the evaluate table, read back
    runs_after = _runs()
    assert len(runs_after) == len(runs) + 2
    (newest,) = [r for r in runs_after[len(runs):] if r.info.experiment_id == home]
    assert {newest.data.tags[f"argse.step.{step}"].split(" ")[0] for step in PIPELINE_STEPS} == {"reused"}
    assert "nothing registered" in again.stdout
    assert [str(v.version) for v in client.search_model_versions("name = 'ar-gse-digits-lt'")] == ["1"]


@pytest.mark.slow
def test_mlflow_run_of_experts_names_its_runs(store, cli, tmp_path):
    assert cli("splits", "--dataset", "digits-lt").code == 0
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "experts", "--env-manager", "local",
         "-P", "dataset=digits-lt", "-P", "epochs=1"],
        cwd=tmp_path, env=subprocess_env(store), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = _runs()
    top = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(top) == {"splits digits-lt", "experts digits-lt", "mlflow run: experts digits-lt in ar-gse/digits-lt"}
    assert _children(top["experts digits-lt"], runs) == {f"expert-{name}" for name in EXPERTS}


def test_a_rerun_that_reuses_the_fit_says_nothing_was_registered(pipeline_store, cli):
    result = cli(*PIPELINE_ARGS)
    assert result.code == 0, result.err
    assert re.search(r"argse run \w+ \(reused\): nothing registered; ar-gse-digits-lt@champion is v1, this run's model",
                     result.out), result.out
    assert "as champion" not in result.out
    # The address that opens MLflow's UI (3.17) on the run list, not on its GenAI pages.
    home = MlflowClient().get_experiment_by_name("ar-gse/digits-lt").experiment_id
    assert (f"(then open http://127.0.0.1:5000/#/experiments/{home}/runs?workflowType=machine_learning: the run list "
            "of ar-gse/digits-lt)") in result.out
    names = [r.info.run_name for r in _runs() if r.data.tags.get("argse.stage") == "pipeline"]
    assert names == ["pipeline digits-lt: ran splits..evaluate", "pipeline digits-lt: reused splits..evaluate"]


def test_a_stage_started_alone_reuses_its_finished_twin_and_reruns_when_asked(pipeline_store, cli):
    """The fit with the pipeline's options, started alone, reuses the pipeline's fit (nothing new is run
    or registered); `--rerun` fits again."""
    before = _runs()
    (fit,) = [r for r in before if r.data.tags.get("argse.stage") == "argse"]
    result = cli("fit", "--dataset", "digits-lt", "--rounds", "5")
    assert result.code == 0, result.err
    assert result.out.strip() == (f"fit: reused FINISHED run {fit.info.run_id} (argse): the same options, code and "
                                  "inputs; nothing new was run (--rerun runs it again)")
    assert len(_runs()) == len(before)
    result = cli("fit", "--dataset", "digits-lt", "--rounds", "5", "--rerun")
    assert result.code == 0, result.err
    assert "registered ar-gse-digits-lt v2" in result.out
    assert len(_runs()) == len(before) + 1


def test_a_dry_run_under_mlflow_run_names_the_run_it_leaves_empty(store, cli, monkeypatch):
    handed_over = MlflowClient().create_run("0")
    monkeypatch.setenv("MLFLOW_RUN_ID", handed_over.info.run_id)
    assert cli("splits", "--dataset", "digits-lt", "--dry-run").code == 0
    assert MlflowClient().get_run(handed_over.info.run_id).info.run_name == "splits digits-lt: dry run"


def test_dry_run_shows_the_resolved_device_versions_and_a_measured_estimate(experts_store, cli):
    result = cli("experts", "--dataset", "digits-lt", "--dry-run", "--epochs", "2")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert re.fullmatch(r"system: torch \S+, torchvision \S+, mlflow \S+, Python \S+", lines[0]), lines[0]
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert re.fullmatch(rf"device: {expected} from --device auto \(.+\); precision (fp32|bf16 autocast) from "
                        r"--precision auto", lines[1]), lines[1]
    (estimate,) = [line for line in lines if line.startswith("  estimate on ")]
    assert re.search(r"\d+\.\d ms per training step of 64 images \(measured.*5 steps x 2 epochs x 3 expert\(s\).* "
                     r"= about \d+ (s|min|h); memory about \d+", estimate), estimate


def test_verbose_shows_the_system_for_a_stage_on_the_cpu(store, cli):
    result = cli("splits", "--dataset", "digits-lt", "--verbose")
    assert result.code == 0, result.err
    assert result.out.startswith("system: torch ")
    assert re.search(r"^device: cpu \(.+ torch threads?; (portable|\w+) kernels.*\); precision fp32; this stage computes on the CPU$",
                     result.out, re.M), result.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_one_line_before_any_run(store, cli):
    result = cli("experts", "--dataset", "digits-lt", "--device", "cuda", "--dry-run")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1 and "no CUDA device" in result.err
    assert _runs() == []


def test_splits_tables_put_each_header_over_its_column(store, cli):
    result = cli("splits", "--dataset", "digits-lt", "--dry-run", "--verbose", "--group-thresholds", "60,20")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    for title in ("group", "class"):
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{title} "))
        block = lines[start:]
        block = block[:block.index("")] if "" in block else block
        columns = len(block[0].split()) - 1  # the first column's cells may hold a space ("0 0")
        ends = [[m.end() for m in re.finditer(r"\S+", line)][-columns:] for line in block]
        assert len(block) > 2 and all(e == ends[0] for e in ends), "\n".join(block)


@pytest.mark.slow
def test_bars_on_a_terminal_and_no_epoch_lines(store, cli, tmp_path):
    assert cli("splits", "--dataset", "digits-lt").code == 0
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has 0 columns
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out = tmp_path / "stdout.txt"
    with open(out, "w") as stdout:
        done = subprocess.run([sys.executable, "-m", "argse", "experts", "--dataset", "digits-lt", "--expert", "ce",
                               "--epochs", "2"], cwd=tmp_path, env=subprocess_env(store), stdout=stdout, stderr=slave,
                              timeout=300)
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert done.returncode == 0, terminal[-3000:]
    assert "\r" in terminal and "ce: " in terminal and "/10 [" in terminal, terminal[-2000:]
    printed = out.read_text()
    assert "ce: run " in printed and " epoch " not in printed, printed


def test_the_champion_holds_no_code_and_loads_with_the_installed_package(chain_store, tmp_path):
    """The model holds data only (MLflow's loader_module flavour): no Python file in its folder, and a
    fresh virtualenv that sees the test environment's dependencies (torch, mlflow, ...) through a .pth
    line but not the argse package cannot load it, saying argse is missing; with the package on its
    path it loads and runs the package's code."""
    uri, _ = chain_store
    local = Path(mlflow.artifacts.download_artifacts("models:/ar-gse-digits-lt@champion", dst_path=str(tmp_path / "m")))
    assert not [p for p in local.rglob("*.py")] and not (local / "code").exists()
    flavor = mlflow.models.Model.load(str(local / "MLmodel")).flavors["python_function"]
    assert flavor["loader_module"] == "argse.served_model" and not flavor.get("code")
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "dependencies.pth"), "w") as fh:
        fh.write(sysconfig.get_paths()["purelib"] + "\n")
    script = (
        "import json, sys\n"
        "import mlflow, numpy as np\n"
        "model = mlflow.pyfunc.load_model('models:/ar-gse-digits-lt@champion')\n"
        "answer = model.predict(np.full((3, 8, 8), 128, np.uint8))\n"
        "print(json.dumps({'rows': len(answer), 'columns': list(answer.columns), 'argse': sys.modules['argse'].__file__}))\n"
    )
    env = {k: v for k, v in subprocess_env(uri).items() if k != "PYTHONPATH"}
    check = "import importlib.util; assert importlib.util.find_spec('argse') is None, 'argse is importable'\n"
    without = subprocess.run([str(python), "-c", check + script], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert without.returncode != 0 and "No module named 'argse'" in without.stderr, without.stderr[-3000:]
    done = subprocess.run([str(python), "-c", script], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["rows"] == 3 and answer["columns"] == ["prediction", "accept", "margin", "group", "confidence"]
    assert answer["argse"] == str(REPO / "argse" / "__init__.py"), answer  # the installed package's code
