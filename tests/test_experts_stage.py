"""The experts stage on digits-lt: runs, artifacts, metrics, the logged model, resume, DDP, errors."""

from __future__ import annotations

import signal
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from argse.artifacts import load_expert_logits, load_splits
from argse.tracking import integrity
from conftest import subprocess_env, with_kill_point

EXPERT_NAMES = ("ce", "logitadjust", "balsoftmax")


def test_expert_all_makes_three_children_with_the_interface_artifacts(experts_store):
    _, ids = experts_store
    client = MlflowClient()
    parent = client.get_run(ids["experts"])
    assert parent.info.status == "FINISHED" and parent.data.tags["argse.expert"] == "all"
    for name in EXPERT_NAMES:
        run = client.get_run(ids[name])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == ids["experts"]
        assert run.data.tags["argse.upstream.splits"] == ids["splits"]
        assert {a.path for a in client.list_artifacts(run.info.run_id, "logits")} == {
            "logits/tunev.npz", "logits/val.npz", "logits/test.npz"}
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/last.pt"]
        history = client.get_metric_history(run.info.run_id, "epoch/val_balanced_acc")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
        # The training curves come first in the UI's chart view (it sorts sections by name): every
        # per-epoch metric is under epoch/ (or timing/), the single values under final/.
        assert {k for k in run.data.metrics if len(client.get_metric_history(run.info.run_id, k)) > 1
                and not k.startswith("system/")} == {
            "epoch/loss", "epoch/lr", "epoch/val_acc", "epoch/val_balanced_acc", "epoch/val_acc_head",
            "epoch/val_acc_tail", "timing/epoch_seconds", "timing/images_per_second"}
        assert {k.split("/")[0] for k in run.data.metrics} == {"epoch", "final", "system", "timing"}
        # The learning rate the schedule peaks at, beside the option it comes from (given for batch 128).
        assert run.data.params["lr"] == "0.05" and run.data.params["batch_size"] == "64"
        assert float(run.data.params["lr.peak"]) == pytest.approx(0.025)
        assert max(m.value for m in client.get_metric_history(run.info.run_id, "epoch/lr")) <= 0.025 + 1e-12
        # What the run used, sampled by MLflow while it trained (its Model metrics' "system" section).
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
        assert sorted({k.split("/")[0] for k in run.data.metrics})[0] == "epoch"
        for key in ("final/val_acc_head", "final/test_balanced_acc", "final/temperature",
                    "final/val_nll_before", "final/val_ece_after"):
            assert key in run.data.metrics, key
        # Temperature scaling fitted on val never makes the val NLL worse.
        assert run.data.metrics["final/val_nll_after"] <= run.data.metrics["final/val_nll_before"] + 1e-6


def test_logits_are_calibrated_and_the_logged_model_reproduces_them(experts_store):
    _, ids = experts_store
    splits = load_splits(ids["splits"])
    val = load_expert_logits(ids["ce"], "val")
    np.testing.assert_array_equal(val["indices"], splits.indices["val"])
    np.testing.assert_array_equal(val["labels"], splits.labels["val"])
    assert val["logits"].dtype == np.float32 and val["logits"].shape == (len(splits.indices["val"]), 10)
    model = mlflow.pytorch.load_model(f"runs:/{ids['ce']}/model")
    from argse.data.loaders import load_digits

    images = splits.images(load_digits(), "val")
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, val["logits"], rtol=1e-4, atol=1e-4)
    temperature = MlflowClient().get_run(ids["ce"]).data.metrics["final/temperature"]
    assert float(model.temperature) == pytest.approx(temperature)


def test_dry_run_prints_the_plan_and_creates_no_run(experts_store, cli):
    _, ids = experts_store
    before = len(MlflowClient().search_runs(["0", "1"]))
    result = cli("experts", "--dataset", "digits-lt", "--dry-run")
    assert result.code == 0, result.err
    assert ids["splits"] in result.out and "parameters" in result.out and "FLOPs" in result.out
    assert len(MlflowClient().search_runs(["0", "1"])) == before


def _only_run(stage="experts", status=None):
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.\"argse.stage\" = '{stage}'", order_by=["attributes.start_time DESC"])
    return runs


def test_splits_run_of_another_dataset_fails_in_one_line(experts_store, cli, cifar_dir):
    assert cli("splits", "--dataset", "cifar100-lt", "--data-dir", cifar_dir).code == 0
    cifar_splits = _only_run("splits")[0].info.run_id
    result = cli("experts", "--dataset", "digits-lt", "--splits-run", cifar_splits, "--epochs", "1")
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1
    assert "cifar100-lt, not digits-lt" in result.err
    assert _only_run()[0].info.status == "FAILED"


def test_missing_splits_run_fails_in_one_line(store, cli):
    result = cli("experts", "--dataset", "digits-lt", "--epochs", "1")
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1
    assert "no FINISHED splits run" in result.err and "argse splits --dataset digits-lt" in result.err
    assert [r.info.status for r in _only_run()] == ["FAILED"]


def test_unknown_expert_is_a_usage_error(store, cli):
    result = cli("experts", "--dataset", "digits-lt", "--expert", "focal")
    assert result.code == 2 and "focal" in result.err


def test_corrupt_checkpoint_is_refused_on_resume(experts_store, cli, tmp_path):
    _, ids = experts_store
    client = MlflowClient()
    run = client.create_run(client.get_run(ids["ce"]).info.experiment_id,
                            tags={"argse.stage": "experts", "argse.dataset": "digits-lt", "argse.expert": "ce",
                                  "argse.upstream.splits": ids["splits"]})
    for key, value in client.get_run(ids["ce"]).data.params.items():
        client.log_param(run.info.run_id, key, value)
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    client.log_artifact(run.info.run_id, str(tmp_path / "last.pt"), "checkpoints")
    client.set_terminated(run.info.run_id, "KILLED")
    result = cli("experts", "--dataset", "digits-lt", "--resume", run.info.run_id)
    assert result.code == 1 and "corrupt" in result.err and len(result.err.strip().splitlines()) == 1
    assert client.get_run(run.info.run_id).info.status == "FAILED"


def test_sigkill_mid_training_then_resume_finishes_the_same_run(experts_store, tmp_path):
    uri, ids = experts_store
    env = subprocess_env(uri)
    run_id = _killed_at("experts:checkpoint:ce:3", env, tmp_path, "--epochs", "15", "--checkpoint-every", "1",
                        "--splits-run", ids["splits"]).info.run_id
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "RUNNING"  # killed hard: nobody ended it
    before = [m.step for m in client.get_metric_history(run_id, "epoch/val_acc")]
    assert len(before) >= 3 and client.list_artifacts(run_id, "checkpoints")  # its third epoch, checkpointed
    done = subprocess.run([sys.executable, "-m", "argse", "experts", "--dataset", "digits-lt", "--resume", run_id],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming run" in done.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "epoch/val_acc"))
    assert steps[-1] == 15 and set(range(1, 16)) == set(steps)
    assert set(before) <= set(steps)  # nothing logged before the kill is lost
    assert {"logits/val.npz", "logits/test.npz", "logits/tunev.npz"} == {
        a.path for a in client.list_artifacts(run_id, "logits")}


def _killed_at(point: str, env: dict[str, str], cwd, *options: str):
    """Train the ce expert (a checkpoint every 2 epochs unless `options` say otherwise) in a subprocess
    that kills itself at `point`; the run it leaves RUNNING."""
    cmd = [sys.executable, "-m", "argse", "experts", "--dataset", "digits-lt", "--expert", "ce",
           "--checkpoint-every", "2", *options]
    killed = subprocess.run(cmd, cwd=cwd, env=with_kill_point(env, point), capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (run,) = [r for r in _only_run() if r.info.status == "RUNNING" and r.data.tags["argse.expert"] == "ce"]
    return run


def test_killed_between_a_checkpoints_digest_and_its_file_then_resumed(experts_store, tmp_path):
    """The window CI once hit: the digest of the epoch-4 checkpoint is recorded, the process dies before
    the file is logged, the resume starts from epoch 2 and writes epoch 4 again; that must finish, and
    the file it logged must be the one the digests vouch for."""
    uri, ids = experts_store
    env = subprocess_env(uri)
    run = _killed_at("integrity:epoch-4", env, tmp_path, "--epochs", "6")  # the splits run: "latest"
    run_id = run.info.run_id
    first = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.pt",
                                                dst_path=str(tmp_path / "first"))
    epoch_2, epoch_4 = integrity.recorded(run_id)["checkpoints/last.pt"]  # both recorded, in the pending manifest
    assert integrity.sha256(first) == epoch_2 != epoch_4  # epoch 4's file never came
    saved = torch.load(first, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2 and saved["config"]["splits_run"] == ids["splits"]  # the run it read, not "latest"

    done = subprocess.run([sys.executable, "-m", "argse", "experts", "--dataset", "digits-lt", "--resume", run_id],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming run" in done.stdout and "after epoch 2/6" in done.stdout, done.stdout[-2000:]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    digests = integrity.recorded(run_id)["checkpoints/last.pt"]
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.pt",
                                                dst_path=str(tmp_path / "down"))
    assert integrity.sha256(local) == digests[-1]  # the last one recorded is the file logged
    integrity.verify(run_id, local, "checkpoints/last.pt")


def test_killed_after_its_model_was_logged_then_resumed_finishes_and_verifies(experts_store, tmp_path):
    """Killed after the expert's model and its digests were logged, before the run ended: the resume
    logs the model again (a new MLmodel, other bytes); it finishes, and `argse verify` passes."""
    uri, ids = experts_store
    env = subprocess_env(uri)
    run = _killed_at("integrity:model/", env, tmp_path, "--epochs", "2", "--splits-run", ids["splits"])
    run_id = run.info.run_id
    (before,) = integrity.recorded(run_id)["model/MLmodel"]

    argse = [sys.executable, "-m", "argse"]
    done = subprocess.run([*argse, "experts", "--dataset", "digits-lt", "--resume", run_id], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "after epoch 2/2" in done.stdout, done.stdout[-2000:]
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    # The MLmodel written again (a new uuid) is the one the sealed manifest vouches for, the first no more.
    (after,) = integrity.recorded(run_id, sealed_only=True)["model/MLmodel"]
    assert after != before
    verified = subprocess.run([*argse, "verify", run_id], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
    assert verified.returncode == 0, verified.stderr[-2000:]


def test_torchrun_two_cpu_processes(experts_store, tmp_path):
    uri, ids = experts_store
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
         "-m", "argse", "experts", "--dataset", "digits-lt", "--expert", "ce", "--epochs", "2",
         "--splits-run", ids["splits"], "--device", "cpu"],
        cwd=tmp_path, env=subprocess_env(uri), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    newest = _only_run()[0]
    assert newest.info.status == "FINISHED" and newest.data.tags["argse.expert"] == "ce"
    assert newest.info.run_id not in ids.values()
    assert sorted(m.step for m in MlflowClient().get_metric_history(newest.info.run_id, "epoch/val_acc")) == [1, 2]


def test_predicted_logits_are_float32_unless_asked_for_training_precision():
    """`predict_logits`: float32 by default (the logged logits), bf16 autocast with `bf16=True` (the
    per-epoch val metrics); each equal to the network called by hand on the normalised images."""
    from argse.data.device import DeviceImages
    from argse.models.backbones import build_backbone
    from argse.training.experts import predict_logits

    torch.manual_seed(0)
    model = build_backbone("resnet8-grey", 10).eval()
    images = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28, 1), dtype=np.uint8)
    data = DeviceImages(images, np.arange(40) % 10, mean=[0.5], std=[0.25], augmentation="none")
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x).float()
    assert torch.allclose(predict_logits(model, data), full, atol=1e-5)
    assert torch.allclose(predict_logits(model, data, bf16=True), half, atol=1e-5)
    assert not torch.allclose(half, full, atol=1e-5)  # the two precisions differ: the flag takes effect
    assert model.training is False
