"""The experts stage trains its experts at once (one process each) or one after another: the same
runs and the same numbers either way, the mode chosen and said, a kill of the whole stage resumed."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from argse import ArgseUsageError
from argse.artifacts import load_expert_logits
from argse.config import ExpertsConfig
from argse.expert_runs import at_once
from argse.expert_runs.at_once import Job, choose_mode, plan
from argse.stage_registry import expert_run_tag
from argse.tracking import integrity
from argse.training.distributed import Dist
from conftest import subprocess_env, with_kill_point

EXPERT_NAMES = ("ce", "logitadjust", "balsoftmax")
CPU = torch.device("cpu")


def _children(parent_id: str) -> dict[str, object]:
    client = MlflowClient()
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {run.data.tags["argse.expert"]: run for run in runs}


@pytest.mark.slow
def test_at_once_gives_the_runs_and_the_logits_of_one_after_another(store, cli):
    assert cli("splits", "--dataset", "digits-lt").code == 0
    parents = {}
    for mode in ("yes", "no"):
        # --rerun: the second mode has the same options (--at-once is not one of the run's), which it would reuse
        result = cli("experts", "--dataset", "digits-lt", "--epochs", "4", "--at-once", mode, "--rerun")
        assert result.code == 0, result.err
        said = "at once, 3 processes of 1 thread(s)" if mode == "yes" else "one after another (--at-once no)"
        assert f"experts: training ce, logitadjust, balsoftmax {said}" in result.out
        parents[mode] = next(line.split()[2].rstrip(":") for line in result.out.splitlines()
                             if line.startswith("experts run "))
    client = MlflowClient()
    for mode, parent_id in parents.items():
        parent = client.get_run(parent_id)
        children = _children(parent_id)
        assert parent.info.status == "FINISHED" and sorted(children) == sorted(EXPERT_NAMES)
        for name, run in children.items():
            assert run.info.status == "FINISHED"
            assert parent.data.tags[expert_run_tag(name)] == run.info.run_id
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch/val_acc")) == [1, 2, 3, 4]
            assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/last.pt"]
    at_once, serial = (_children(parents[mode]) for mode in ("yes", "no"))
    for name in EXPERT_NAMES:  # each expert keeps its own seed, batches and optimizer: the same numbers
        for split in ("tunev", "val", "test"):
            a = load_expert_logits(at_once[name].info.run_id, split)["logits"]
            b = load_expert_logits(serial[name].info.run_id, split)["logits"]
            np.testing.assert_array_equal(a, b)
        # The same params (but the digest of the manifest, which names its run), and the same digests of
        # every file (checkpoints, logits, weights) except the logged model's MLmodel, which names its run
        # and the time it was written.
        def same(params):
            return {k: v for k, v in params.items() if k != integrity.SEAL_PARAM}

        def same_files(run):
            return {k: v for k, v in integrity.recorded(run.info.run_id).items() if not k.endswith("/MLmodel")}

        assert same(at_once[name].data.params) == same(serial[name].data.params)
        assert same_files(at_once[name]) == same_files(serial[name])
        assert "checkpoints/last.pt" in same_files(at_once[name]) and "expert/weights.pt" in same_files(at_once[name])


def test_at_once_yes_where_it_can_never_run_is_one_line_and_no_run(store, cli):
    result = cli("experts", "--dataset", "digits-lt", "--expert", "ce", "--at-once", "yes")
    assert result.code == 2
    assert result.err.strip() == ("error: --at-once yes cannot run here: --expert ce trains one expert; "
                                  "drop it or pass --at-once no")
    client = MlflowClient()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_the_dry_run_says_which_mode_and_why(store, cli):
    assert cli("splits", "--dataset", "digits-lt").code == 0
    result = cli("experts", "--dataset", "digits-lt", "--dry-run")
    assert result.code == 0, result.err
    assert ("mode: one after another (8,760 training images per expert: too little work to pay for starting "
            "3 processes)") in result.out


def _cfg(**changes) -> ExpertsConfig:
    return dataclasses.replace(ExpertsConfig(dataset="fashion-mnist-lt").resolve(), **changes)


@pytest.mark.parametrize("cores, load, device, changes, n_train, expected", [
    (2, 0.1, "cpu", {}, 3, (True, "2 cores, 1.9 free")),
    (2, 1.2, "cpu", {}, 3, (False, "0.8 of 2 cores free (other processes busy): at once would be no faster")),
    (2, 0.0, "cpu", {"epochs": 6}, 3, (False, "89,316 training images per expert: too little work to pay for "
                                              "starting 3 processes")),
    (2, 0.0, "cpu", {}, 1, (False, "1 expert left to train")),
    (2, 0.0, "cpu", {"at_once": "no"}, 3, (False, "--at-once no")),
    (2, 1.9, "cpu", {"at_once": "yes"}, 3, (True, "--at-once yes (2 cores, 0.1 free)")),
    (1, 0.0, "cpu", {"at_once": "auto"}, 3, (False, "this process may use 1 CPU core")),
    (8, 0.0, "meta", {}, 3, (False, "on meta the experts would share one device (at once not measured there)")),
])
def test_the_mode_follows_the_cores_the_load_the_work_and_the_switch(monkeypatch, cores, load, device, changes,
                                                                     n_train, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(at_once, "free_cores", lambda: (cores, cores - load))
    assert choose_mode(_cfg(**changes), n_train, torch.device(device), Dist(), 14886) == expected


def test_free_cores_are_the_idle_share_of_the_allowed_cores_now_not_the_load_average(monkeypatch):
    from argse.training import utils

    # cpu0 idle 90 of 100 jiffies, cpu1 idle 30 of 100; cpu2 is not this process's; the load average
    # (a job that ended seconds ago) is ignored.
    snapshots = iter([{"cpu0": (1000, 5000), "cpu1": (2000, 5000), "cpu2": (0, 5000)},
                      {"cpu0": (1090, 5100), "cpu1": (2030, 5100), "cpu2": (0, 5100)}])
    monkeypatch.setattr(utils, "_cpu_times", lambda: next(snapshots))
    monkeypatch.setattr(utils.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(utils.os, "getloadavg", lambda: (2.5, 2.5, 2.5))
    cores, free = utils.free_cores(window_s=0)
    assert cores == 2 and free == pytest.approx(1.2)


def test_at_once_yes_is_refused_under_torchrun_and_on_one_core(monkeypatch):
    with pytest.raises(ArgseUsageError, match="under torchrun the 2 processes"):
        at_once.check_at_once(_cfg(at_once="yes"), Dist(rank=0, world_size=2))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    with pytest.raises(ArgseUsageError, match="may use 1 CPU core"):
        at_once.check_at_once(_cfg(at_once="yes"), Dist())
    at_once.check_at_once(_cfg(at_once="auto"), Dist())  # auto falls back instead


def _run(name, status, run_id):
    return SimpleNamespace(data=SimpleNamespace(tags={"argse.expert": name}), info=SimpleNamespace(status=status, run_id=run_id))


def test_one_plan_decides_skip_resume_or_start_per_expert():
    cfg = _cfg()
    assert plan(cfg, []) == [Job(name, "start") for name in EXPERT_NAMES]
    children = [_run("ce", "FINISHED", "a"), _run("logitadjust", "FAILED", "b"), _run("logitadjust", "FINISHED", "old")]
    assert plan(cfg, children) == [Job("ce", "skip", "a"), Job("logitadjust", "resume", "b"), Job("balsoftmax", "start")]


@pytest.mark.slow
def test_a_stage_killed_while_training_at_once_resumes_all_three_from_their_checkpoints(store, tmp_path):
    cmd = [sys.executable, "-m", "argse", "pipeline", "--dataset", "digits-lt", "--epochs", "40",
           "--checkpoint-every", "2", "--stop-at", "experts", "--at-once", "yes"]
    env = subprocess_env(store)
    marks = tmp_path / "checkpointed"  # each expert process leaves its pid here at its first checkpoint
    marks.mkdir()
    # The last of the three expert processes to log a checkpoint kills the stage's own process: its
    # expert processes die with it.
    stopped = subprocess.run(cmd, cwd=tmp_path, env=with_kill_point(env, "experts:stage:3", marks),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert stopped.returncode == -signal.SIGKILL
    workers = [int(mark.name) for mark in marks.iterdir()]
    assert len(workers) == 3, workers
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    checkpointed = {}
    for run in client.search_runs(exps, "tags.\"argse.stage\" = 'experts' and tags.\"argse.expert\" != 'all'"):
        steps = client.get_metric_history(run.info.run_id, "epoch/val_acc")
        if len(steps) >= 2 and client.list_artifacts(run.info.run_id, "checkpoints"):
            checkpointed[run.data.tags["argse.expert"]] = run.info.run_id
    assert len(checkpointed) == 3, f"only {sorted(checkpointed)} reached a checkpoint"
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.2)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")], "expert processes outlived the stage"
    progress = {name: len(client.get_metric_history(run_id, "epoch/val_acc")) for name, run_id in checkpointed.items()}
    assert all(0 < n < 40 for n in progress.values()), progress  # killed mid-training, every one of them

    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming unfinished run" in done.stdout
    for name in EXPERT_NAMES:
        assert f"{name}: resuming run {checkpointed[name]} after epoch" in done.stdout
    exps = [e.experiment_id for e in client.search_experiments()]
    expert_runs = client.search_runs(exps, "tags.\"argse.stage\" = 'experts'")
    assert sorted(r.data.tags["argse.expert"] for r in expert_runs) == sorted(EXPERT_NAMES + ("all",))  # no duplicate
    assert all(r.info.status == "FINISHED" for r in expert_runs)
    for name, run_id in checkpointed.items():
        steps = sorted(m.step for m in client.get_metric_history(run_id, "epoch/val_acc"))
        assert set(steps) == set(range(1, 41))
