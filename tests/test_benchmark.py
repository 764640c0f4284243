"""`argse benchmark`: seeds side by side, each an ordinary pipeline, summarised in one run; the summary
against an independent recomputation, reuse, two benchmarks on one server, a failed seed, bad input."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from argse import tracking
from argse.selective.seeds import METRICS, summarise
from conftest import PIPELINE_ARGS, REPO, free_port, subprocess_env, wait_for_http

FAST = PIPELINE_ARGS[3:]  # the quick pipeline options, without "pipeline --dataset digits-lt"


def _runs(client: MlflowClient, stage: str, extra: str = "") -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, f"tags.\"argse.stage\" = '{stage}'" + extra, order_by=["attributes.start_time DESC"])


def _seed_tables(client: MlflowClient, summary_run) -> dict[int, pd.DataFrame]:
    """Each seed's evaluate table, found from the pipelines the summary run names."""
    tables = {}
    for key, pipeline_id in summary_run.data.tags.items():
        if not key.startswith("argse.benchmark.pipeline."):
            continue
        seed = int(key.split(".")[3].removeprefix("seed"))
        evaluate_id = client.get_run(pipeline_id).data.tags["argse.step.evaluate"].split()[1]
        tables[seed] = pd.read_csv(tracking.download(evaluate_id, "results/table.csv"))
    return tables


def _recomputed(tables: dict[int, pd.DataFrame], method: str, column: str) -> tuple[float, float]:
    """Mean and sample standard deviation of one method's column over the seeds, by hand."""
    values = [float(t.set_index("method").loc[method, column]) for t in tables.values()]
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# ---------------------------------------------------------------------------------------- summary


def _table(values: dict[str, float], expert: str) -> pd.DataFrame:
    rows = []
    for method, base in values.items():
        method = method.replace("EXPERT", expert)
        rows.append({"method": method, **{m: base + 0.001 * i for i, m in enumerate(METRICS)}})
    return pd.DataFrame(rows)


def test_the_summary_equals_a_recomputation_by_hand():
    tables = {
        0: _table({"ar-gse[worst]": 0.010, "chow[ce]": 0.030, "plugin-worst[EXPERT]": 0.012}, "balsoftmax"),
        1: _table({"ar-gse[worst]": 0.014, "chow[ce]": 0.026, "plugin-worst[EXPERT]": 0.011}, "logitadjust"),
        2: _table({"ar-gse[worst]": 0.012, "chow[ce]": 0.041, "plugin-worst[EXPERT]": 0.015}, "balsoftmax"),
    }
    summary = summarise(tables, "ar-gse[worst]").set_index("method")
    assert list(summary.index) == ["ar-gse[worst]", "plugin-worst[best expert]", "chow[ce]"]  # by mean aurc_worst
    chow = summary.loc["chow[ce]"]
    values = np.array([0.030, 0.026, 0.041])  # chow's aurc_worst (the first metric) per seed
    assert chow["aurc_worst_mean"] == pytest.approx(values.mean())
    assert chow["aurc_worst_sd"] == pytest.approx(np.sqrt(((values - values.mean()) ** 2).sum() / 2))
    assert [chow[f"aurc_worst_seed{s}"] for s in range(3)] == pytest.approx(values.tolist())
    diff = values - np.array([0.010, 0.014, 0.012])
    half = stats.t.ppf(0.975, 2) * diff.std(ddof=1) / np.sqrt(3)
    assert chow["aurc_worst_minus_registered"] == pytest.approx(diff.mean())
    assert (chow["aurc_worst_minus_registered_lo"], chow["aurc_worst_minus_registered_hi"]) == pytest.approx(
        (diff.mean() - half, diff.mean() + half))
    assert chow["aurc_worst_registered_better"] == 3
    best = summary.loc["plugin-worst[best expert]"]
    assert best["aurc_worst_registered_better"] == 2  # 0.012 > 0.010 and 0.015 > 0.012, but 0.011 < 0.014
    assert best["best_expert"] == "0:balsoftmax,1:logitadjust,2:balsoftmax"
    assert summary.loc["ar-gse[worst]", "aurc_worst_minus_registered"] == 0.0


def test_a_method_missing_from_a_seed_is_averaged_over_the_seeds_that_have_it():
    tables = {0: _table({"ar-gse[worst]": 0.01, "ar-gse[worst,per-group]": 0.02}, "ce"),
              1: _table({"ar-gse[worst]": 0.02}, "ce")}
    row = summarise(tables, "ar-gse[worst]").set_index("method").loc["ar-gse[worst,per-group]"]
    assert row["n_seeds"] == 1 and row["aurc_worst_mean"] == pytest.approx(0.02)
    assert math.isnan(row["aurc_worst_sd"]) and math.isnan(row["aurc_worst_seed1"])


# ------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_mlflow_run_benchmark_summarises_the_seeds_and_a_rerun_reuses_every_seed(pipeline_store, tmp_path):
    """After the quickstart (the pipeline_store): the benchmark registers in its own model, says what, and
    seed 1's version (other splits) is never compared with seed 0's; the quickstart's registry is as it was."""
    store = pipeline_store
    params = ["-P", "dataset=digits-lt", "-P", "seeds=0,1"]
    for flag, value in zip(FAST[::2], FAST[1::2]):
        params += ["-P", f"{flag.removeprefix('--').replace('-', '_')}={value}"]
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "benchmark", "--env-manager", "local", *params]
    first = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(store), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    client = MlflowClient()
    assert [str(v.version) for v in client.search_model_versions("name = 'ar-gse-digits-lt'")] == ["1"]
    assert str(client.get_model_version_by_alias("ar-gse-digits-lt", "champion").version) == "1"
    name = "ar-gse-digits-lt-benchmark"
    champion = client.get_model_version_by_alias(name, "champion")
    (other,) = [v for v in client.search_model_versions(f"name = '{name}'") if v.version != champion.version]
    seeds = {v.version: client.get_run(v.run_id).data.params["seed"] for v in (champion, other)}
    assert sorted(seeds.values()) == ["0", "1"]
    compared = {v.version: client.get_run(v.run_id).data.params["argse.champion_compared_on"] for v in (champion, other)}
    assert compared[champion.version].split(", splits ")[0] == compared[other.version].split(", splits ")[0]
    assert compared[champion.version] != compared[other.version]  # the same objective and prior, other splits
    decision = client.get_run(other.run_id).data.tags["argse.champion_decision"]
    assert f"champion stays v{champion.version}: v{other.version} is not compared with it" in decision, decision
    assert f"argse crown models:/{name}/{other.version}" in decision
    printed = first.stdout[first.stdout.index(f"the pipelines' models, registered in {name}:"):]
    assert f"  v{champion.version}: seed {seeds[champion.version]}, lt prior, fit run {champion.run_id}: champion" \
        in printed, printed
    assert f"  v{other.version}: seed {seeds[other.version]}, lt prior, fit run {other.run_id}: not compared with " \
           f"champion v{champion.version} (splits " in printed, printed
    (summary_run,) = _runs(client, "benchmark")
    assert summary_run.info.status == "FINISHED"
    assert summary_run.data.tags["mlflow.runName"] == "benchmark digits-lt: seeds 0,1"
    tables = _seed_tables(client, summary_run)
    assert sorted(tables) == [0, 1]
    summary = pd.read_csv(tracking.download(summary_run.info.run_id, "benchmark/table.csv")).set_index("method")
    for method in ("ar-gse[worst]", "chow[ce]", "plugin-worst[uniform-ensemble]"):
        for column in ("aurc_worst", "aurc_balanced", "worst_error_at0.8"):
            mean, sd = _recomputed(tables, method, column)
            assert summary.loc[method, f"{column}_mean"] == pytest.approx(mean, rel=1e-9)
            assert summary.loc[method, f"{column}_sd"] == pytest.approx(sd, rel=1e-9)
            assert summary_run.data.metrics[f"lt/{method.replace('[', '.').replace(']', '')}/{column}_mean"] == \
                pytest.approx(mean, rel=1e-9)
    artifacts = {a.path for a in client.list_artifacts(summary_run.info.run_id, "benchmark/figures")}
    assert artifacts == {"benchmark/figures/rc_balanced_lt.png", "benchmark/figures/rc_worst_lt.png"}
    experts_before = len(_runs(client, "experts"))

    second = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(store), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 pipeline(s) reused, 0 to run" in second.stdout
    assert len(_runs(client, "experts")) == experts_before  # nothing retrained
    newest = _runs(client, "benchmark")[0]
    assert newest.info.run_id != summary_run.info.run_id
    again = pd.read_csv(tracking.download(newest.info.run_id, "benchmark/table.csv")).set_index("method")
    pd.testing.assert_frame_equal(again, summary)


@pytest.mark.slow
def test_two_benchmarks_at_once_on_one_server_train_each_seed_once_and_agree(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2"],
        cwd=tmp_path, env=subprocess_env(uri), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"{uri}/health", server)
        cmd = [sys.executable, "-m", "argse", "benchmark", "--dataset", "digits-lt", "--seeds", "0,1,2",
               "--workers", "2", *FAST]
        machines = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            machines.append(subprocess.Popen(cmd, cwd=tmp_path / name, env=subprocess_env(uri), stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True))
        outputs = [m.communicate(timeout=1200) for m in machines]
        for machine, (out, err) in zip(machines, outputs):
            assert machine.returncode == 0, (out[-2000:], err[-2000:])
        client = MlflowClient(tracking_uri=uri)
        splits = _runs(client, "splits")
        assert sorted(int(r.data.params["seed"]) for r in splits) == [0, 1, 2]  # each seed's splits made once
        parents = _runs(client, "experts", " and tags.\"argse.expert\" = 'all'")
        assert len(parents) == 3 and all(r.info.status == "FINISHED" for r in parents)  # each seed trained once
        summaries = _runs(client, "benchmark")
        assert len(summaries) == 2 and all(r.info.status == "FINISHED" for r in summaries)
        tables = [pd.read_csv(client.download_artifacts(r.info.run_id, "benchmark/table.csv", str(tmp_path)))
                  for r in summaries]
        pd.testing.assert_frame_equal(tables[0], tables[1])
        # What a teammate sees through the server: the champion is a fit of these pipelines.
        pipeline = _runs(client, "pipeline")[0]
        fits = {r.data.tags["argse.step.argse"].split()[1] for r in _runs(client, "pipeline")}
        assert client.get_model_version_by_alias("ar-gse-digits-lt-benchmark", "champion").run_id in fits
        assert any(a.path == "splits" for a in client.list_artifacts(pipeline.data.tags["argse.step.splits"].split()[1]))
    finally:
        server.terminate()
        server.wait(timeout=30)
    # The server is gone: a stage says so in one line naming it, and exits 1.
    failed = subprocess.run([sys.executable, "-m", "argse", "splits", "--dataset", "digits-lt"], cwd=tmp_path / "a",
                            env=subprocess_env(uri), capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1
    lines = [line for line in failed.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and uri in lines[0]


# ------------------------------------------------------------------------------ failures and input


def test_a_failed_seed_is_listed_and_left_out_and_all_failed_fails_the_run(pipeline_store, cli, monkeypatch):
    # Seed 0's stages are the pipeline_store's (reused up to the fit, which registers in the benchmark's
    # own model); seed 1 fails.
    from argse.stages import benchmark

    real = benchmark._pipeline_command

    def failing_seed_one(cfg, job, experiment):
        if job.seed == 1:
            return [sys.executable, "-c", "print('error: the machine ran out of patience'); raise SystemExit(1)"]
        return real(cfg, job, experiment)

    monkeypatch.setattr(benchmark, "_pipeline_command", failing_seed_one)
    result = cli("benchmark", "--dataset", "digits-lt", "--seeds", "0,1", *FAST)
    assert result.code == 0, result.err
    assert "seed 1, lt prior: failed after" in result.out and "the machine ran out of patience" in result.out
    assert result.out.strip().splitlines()[-1] == ("1 pipeline(s) failed and are left out of the summary: "
                                                   "seed 1 (lt): the machine ran out of patience")
    client = MlflowClient()
    (summary_run,) = _runs(client, "benchmark")
    assert summary_run.info.status == "FINISHED"
    assert summary_run.data.tags["argse.benchmark.failed.seed1.lt"] == "the machine ran out of patience"
    table = pd.read_csv(tracking.download(summary_run.info.run_id, "benchmark/table.csv"))
    assert (table["n_seeds"] == 1).all() and "aurc_worst_seed1" not in table.columns

    monkeypatch.setattr(benchmark, "_pipeline_command", lambda cfg, job, experiment: [
        sys.executable, "-c", "print('error: the machine ran out of patience'); raise SystemExit(1)"])
    result = cli("benchmark", "--dataset", "digits-lt", "--seeds", "2,3", *FAST)
    assert result.code == 1
    assert result.err.strip().startswith("error: no pipeline of the benchmark finished: seed 2 (lt)")
    assert _runs(client, "benchmark")[0].info.status == "FAILED"


@pytest.mark.parametrize("args, message", [
    (["--seeds", ""], "it is empty"),
    (["--seeds", "0,-1"], "'-1' is not a non-negative integer"),
    (["--seeds", "0,1,0"], "seed 0 is given twice"),
    (["--seeds", "one"], "'one' is not a non-negative integer"),
    (["--workers", "0"], "--workers 0 must be >= 1"),
    (["--test-prior", "lt,uniform"], "choose one or more of lt, balanced"),
    (["--coverage-grid", "1,0.5"], "--coverage-grid 1,0.5 lacks 0.8, 0.6: the benchmark's summary reports"),
])
def test_bad_benchmark_input_is_one_line_exit_2_and_no_run(store, cli, args, message):
    result = cli("benchmark", "--dataset", "digits-lt", *args)
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    client = MlflowClient()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
