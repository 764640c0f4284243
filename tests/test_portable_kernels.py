"""The quickstart's numbers do not depend on the CPU: the digits-lt preset runs on portable kernels
(argse.presets.PORTABLE_KERNELS), so a pipeline gives the same table, and experts with the same bytes,
whatever vector extensions the CPU has. Another CPU is imitated on this one by capping the instruction
sets torch and its libraries may use."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from argse import tracking
from conftest import subprocess_env

#: An AVX2 CPU, imitated: every library that picks kernels by the CPU's instruction sets is capped.
AVX2_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "OPENBLAS_CORETYPE": "Haswell"}
TINY = ("--epochs", "3", "--gating-epochs", "3", "--selective-rounds", "1", "--epochs-per-round", "1",
        "--eg-rounds", "3", "--n-boot", "5", "--coverage-grid", "1,0.8,0.6")
KERNELS_OF = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.backends.mkldnn.enabled)"


def _argse(folder, *args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**subprocess_env(f"sqlite:///{folder / 'mlflow.db'}"), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "argse", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("dataset, portable", [("digits-lt", True), ("fashion-mnist-lt", False)])
def test_the_dry_run_says_which_kernels_the_preset_computes_with(tmp_path, dataset, portable):
    done = _argse(tmp_path, "splits", "--dataset", dataset, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert ("portable kernels (the same numbers on any x86 CPU)" in done.stdout) == portable


def test_the_launcher_sets_the_portable_environment_before_torch_is_imported(tmp_path):
    """What `argse --dataset digits-lt` runs in: torch's kernels without vector extensions; another
    preset leaves torch's choice alone. Checked in a process started as argse starts."""
    code = ("import sys; from argse.launch import set_portable_environment, dataset_in_argv; "
            "set_portable_environment(dataset_in_argv(sys.argv[1:])); " + KERNELS_OF)
    env = subprocess_env(f"sqlite:///{tmp_path / 'mlflow.db'}")
    env.pop("ATEN_CPU_CAPABILITY", None)
    seen = {}
    for dataset in ("digits-lt", "fashion-mnist-lt"):
        done = subprocess.run([sys.executable, "-c", code, "fit", "--dataset", dataset], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        seen[dataset] = done.stdout.split()[0]
    assert seen["digits-lt"] == "DEFAULT"
    native = subprocess.run([sys.executable, "-c", KERNELS_OF], env=env, capture_output=True, text=True).stdout.split()[0]
    assert seen["fashion-mnist-lt"] == native


def _outcome(folder, monkeypatch) -> tuple[pd.DataFrame, dict[str, str]]:
    """The evaluate table (every column, full precision) and the digests of every expert's model files."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.configure(uri)  # models:/ URIs resolve through the current tracking URI
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("ar-gse/digits-lt").experiment_id
    evaluate = client.search_runs([experiment], "tags.\"argse.stage\" = 'evaluate'")[0]
    table = pd.read_csv(client.download_artifacts(evaluate.info.run_id, "results/table.csv", str(folder)))
    digests = {}
    for run in client.search_runs([experiment], "tags.\"argse.stage\" = 'experts' and tags.\"argse.expert\" != 'all'"):
        model_id = run.outputs.model_outputs[0].model_id
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_id}",
                                                         dst_path=str(folder / run.info.run_id)))
        digests.update({f"{run.data.tags['argse.expert']}/{p.relative_to(local)}": hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in local.rglob("*.pth")})
    return table, digests


@pytest.mark.slow
def test_the_quickstart_gives_the_same_numbers_on_a_cpu_capped_at_avx2(tmp_path, monkeypatch):
    """Two fresh stores, the same (shortened) quickstart: one on this CPU as it is, one with every
    library capped at AVX2. The tables are equal to the last bit and the experts' files byte for byte.
    (Without portable kernels they differ on an AVX-512 CPU: in the experts' bytes, and in the table's
    fourth decimal; measured in the note of the issue that asked for this.)"""
    found = {}
    for name, caps in (("native", {}), ("avx2", AVX2_CPU)):
        folder = tmp_path / name
        folder.mkdir()
        done = _argse(folder, "pipeline", "--dataset", "digits-lt", *TINY, env_extra=caps)
        assert done.returncode == 0, done.stderr[-2000:]
        found[name] = _outcome(folder, monkeypatch)
    (table, digests), (capped_table, capped_digests) = found["native"], found["avx2"]
    assert len(digests) >= 3
    assert digests == capped_digests
    pd.testing.assert_frame_equal(table, capped_table, check_exact=True)
