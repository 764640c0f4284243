"""Tamper evidence: one byte changed on the artifact store's disk, in an expert's logits and then in a
file of the champion model. The next stage that reads it, `argse verify` and loading the champion each
fail with one line naming the run and the file; a plain `argse pipeline` reruns the damaged stage and
says why, and never reuses it silently. (In this order: the model first, while the champion's fit run
is the one the pipeline would reuse.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import PIPELINE_ARGS, REPO, subprocess_env

pytestmark = pytest.mark.slow

MODEL = "models:/ar-gse-digits-lt@champion"


def _argse(workdir: Path, uri: str, *args: str) -> subprocess.CompletedProcess:
    env = subprocess_env(uri)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "argse", *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)


def _local(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A small digits-lt pipeline in its own store (its artifacts get damaged here)."""
    workdir = tmp_path_factory.mktemp("tamper")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    done = _argse(workdir, uri, *PIPELINE_ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, uri


def test_a_changed_model_file_stops_verify_and_loading_and_the_pipeline_refits(pipeline, monkeypatch):
    workdir, uri = pipeline
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("ar-gse-digits-lt", "champion")
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    rule = next(_local(model.artifact_location).rglob("rule.json"))
    _flip_a_byte(rule)

    verified = _argse(workdir, uri, "verify", MODEL)
    assert verified.returncode == 1
    line = _one_line(verified.stderr)
    assert version.run_id in line and "rule.json" in line, line

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with pytest.raises(Exception) as refused:
        mlflow.pyfunc.load_model(MODEL)
    message = str(refused.value).strip()
    assert "\n" not in message and version.run_id in message and "rule.json" in message, message

    again = _argse(workdir, uri, *PIPELINE_ARGS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"argse: run {version.run_id} is not reused:" in again.stdout and "rule.json" in again.stdout, \
        again.stdout[-3000:]


def test_changed_logits_stop_the_next_stage_and_verify_and_the_pipeline_retrains_them(pipeline):
    workdir, uri = pipeline
    client = MlflowClient(uri)
    (ce,) = client.search_runs([client.get_experiment_by_name("ar-gse/digits-lt").experiment_id],
                               "tags.\"argse.expert\" = 'ce'")
    run_id = ce.info.run_id
    _flip_a_byte(_local(ce.info.artifact_uri) / "logits" / "val.npz")

    read = _argse(workdir, uri, "gating", "--dataset", "digits-lt", "--mode", "pretrain", "--epochs", "2")
    assert read.returncode == 1
    line = _one_line(read.stderr)
    assert run_id in line and "logits/val.npz" in line and "sha256" in line, line

    verified = _argse(workdir, uri, "verify", run_id)
    assert verified.returncode == 1
    line = _one_line(verified.stderr)
    assert run_id in line and "logits/val.npz" in line, line

    again = _argse(workdir, uri, *PIPELINE_ARGS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "experts: run " in again.stdout and "is not reused: logits/val.npz is not what the run logged" in \
        again.stdout, again.stdout[-3000:]
    (ce_now, _) = client.search_runs([ce.info.experiment_id], "tags.\"argse.expert\" = 'ce'",
                                     order_by=["attributes.start_time DESC"])
    assert ce_now.info.run_id != run_id and ce_now.info.status == "FINISHED"
    assert _argse(workdir, uri, "verify", ce_now.info.run_id).returncode == 0
