"""The benchmark: one pipeline per seed (and test prior), side by side, and one summary run.

``argse benchmark --dataset fashion-mnist-lt --seeds 0,1,2 --test-prior lt,balanced`` runs
``argse pipeline`` for every seed and prior as separate processes against the same tracking store,
``--workers`` at a time (a seed's priors one after another, so the second reuses the first's splits and
experts). A pipeline that already FINISHED with the same options and code is reused without starting
anything, so a rerun, or a second machine on a team server, adds only what is missing; two pipelines
of the same seed started at once by two benchmarks wait for each other (``argse.stages.pipeline``).
``--engine ray`` runs each pipeline as a task of a Ray cluster instead (:mod:`argse.engines`).

The summary run (``benchmark <dataset>: seeds 0-2``) reads each pipeline's evaluate tables and logs,
per prior and method, the mean, standard deviation and each seed's value of the areas and the errors
at coverage 1, 0.8 and 0.6, and the paired difference to the registered model's row with a 95%
interval across seeds (`argse.selective.seeds`): ``benchmark/table.csv``, ``benchmark/table.md``,
metrics ``<prior>/<method>/<column>_mean`` and ``_sd``, the risk-coverage curves averaged over seeds
with their range, and every pipeline's output. A seed whose pipeline fails is listed with why and left
out; the summary run fails only when no seed finished.

The pipelines register their models in ``ar-gse-<dataset>-benchmark`` (``--register-name`` names
another), never in the quickstart's ``ar-gse-<dataset>``; seeds have other splits, so their versions
are not compared with each other for champion. The benchmark prints what was registered.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from argse import ArgseError, engines, figures, tracking
from argse.pipeline_config import BenchmarkConfig
from argse.selective.seeds import METRICS, PAIRED, mean_curves, summarise
from argse.stage_registry import (
    BENCHMARK_DIR,
    COVERAGE_POINTS,
    RESULTS_DIR,
    RESULTS_TABLE,
    TAG_BENCHMARK_ENGINE,
    TAG_BENCHMARK_FAILED,
    TAG_BENCHMARK_PIPELINE,
    TAG_REGISTERED_MODEL,
    TAG_STEP,
)
from argse.tracking.metric_names import metric_key
from argse.training.utils import free_cores, memory_available

#: What one pipeline may take at once: its experts train in up to three processes, and those three
#: with the data in memory stayed under 3 GiB on fashion-mnist-lt (bench/cifar_full_size.py measures
#: CIFAR-100-LT's).
PIPELINE_CORES = 3
PIPELINE_MEMORY_GIB = 3.0


@dataclass
class Job:
    """One pipeline of the benchmark and what became of it."""

    seed: int
    prior: str
    run_id: str | None = None  # its pipeline run
    action: str = ""  # reused, ran, failed
    reason: str = ""  # why it failed
    seconds: float = 0.0
    log: Path | None = None

    @property
    def key(self) -> str:
        return f"seed{self.seed}.{self.prior}"


def seed_span(seeds: tuple[int, ...]) -> str:
    """``0-2`` for consecutive seeds, else ``0,2,5``."""
    ordered = sorted(seeds)
    if len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ",".join(map(str, ordered))


def choose_workers(cfg: BenchmarkConfig) -> tuple[int, str]:
    """How many pipelines run side by side, and why, in a phrase."""
    n_seeds = len(cfg.seeds)
    if cfg.workers is not None:
        return min(cfg.workers, n_seeds), f"--workers {cfg.workers}" + (f", {n_seeds} seeds" if cfg.workers > n_seeds else "")
    cores, free = free_cores()
    memory = memory_available()
    by_cores = max(1, int(free // PIPELINE_CORES))
    by_memory = max(1, int(memory / 2**30 // PIPELINE_MEMORY_GIB)) if memory else n_seeds
    workers = min(n_seeds, by_cores, by_memory)
    return workers, (f"{free:.1f} of {cores} cores free / {PIPELINE_CORES} per pipeline, "
                     + (f"{memory / 2**30:.1f} GiB available / {PIPELINE_MEMORY_GIB:g} GiB per pipeline" if memory
                        else "memory unknown"))


def cached_pipeline(cfg: BenchmarkConfig, seed: int, prior: str, experiment: str | None):
    """The newest FINISHED pipeline run with this seed's and prior's options and this code, if any."""
    pipeline = cfg.pipeline_config(seed, prior)
    return tracking.find_cached_run("pipeline", tracking.config_hash("pipeline", pipeline.params(), {}),
                                    tracking.code_version(), dataset=cfg.dataset, experiment=experiment)


def run(cfg: BenchmarkConfig, *, experiment: str | None = None) -> str | None:
    """Run the benchmark; return the summary run's id (``None`` for a dry run)."""
    jobs = [Job(seed, prior) for seed in cfg.seeds for prior in cfg.test_prior]
    for job in jobs:
        found = None if cfg.force else cached_pipeline(cfg, job.seed, job.prior, experiment)
        if found is not None:
            job.run_id, job.action = found.info.run_id, "reused"
    engine = engines.connect(cfg.engine, cfg.ray_address, device=cfg.device, cores=PIPELINE_CORES,
                             memory_gib=PIPELINE_MEMORY_GIB,
                             home_experiment=tracking.home_experiment(cfg.dataset, experiment))
    workers, why = choose_workers(cfg) if engine.name == "local" else engine.slots(len(cfg.seeds), cfg.workers)
    if cfg.dry_run:
        click.echo(cfg.dry_run_header("benchmark"))
        click.echo(f"  workers: {workers} ({why})")
        for job in jobs:
            click.echo(f"  seed {job.seed}, {job.prior} prior: " + (f"would reuse pipeline run {job.run_id}"
                                                                   if job.run_id else "would run the pipeline"))
        return None

    name = f"benchmark {cfg.dataset}: seeds {seed_span(cfg.seeds)}"
    with tracking.stage_run("benchmark", cfg.dataset, cfg.params(), experiment=experiment, run_name="benchmark") as active:
        MlflowClient().update_run(active.info.run_id, name=name)
        mlflow.set_tag(TAG_BENCHMARK_ENGINE, engine.describe())
        todo = [job for job in jobs if job.action != "reused"]
        click.echo(f"{name}: {len(jobs) - len(todo)} pipeline(s) reused, {len(todo)} to run, "
                   f"{workers if todo else 0} at a time ({why})")
        with tempfile.TemporaryDirectory(prefix="argse-benchmark-") as tmp:
            _run_pipelines(cfg, engine, todo, workers, experiment, Path(tmp))
            mlflow.log_artifacts(tmp, f"{BENCHMARK_DIR}/logs")
        mlflow.set_tags({TAG_BENCHMARK_PIPELINE + job.key: job.run_id for job in jobs if job.run_id})
        failed = [job for job in jobs if job.action == "failed"]
        if failed:
            mlflow.set_tags({TAG_BENCHMARK_FAILED + job.key: job.reason[:1000] for job in failed})
        finished = [job for job in jobs if job.action != "failed"]
        if not finished:
            raise ArgseError("no pipeline of the benchmark finished: " + "; ".join(
                f"seed {job.seed} ({job.prior}): {job.reason}" for job in failed))
        summary = summarise_runs(cfg, finished)
        click.echo("\n".join(registered(finished)))
        log_summary(summary, cfg, finished, failed, name)
        return active.info.run_id


def registered(finished: list[Job]) -> list[str]:
    """What the pipelines registered, in words: each model name, then each version with its seed, prior,
    fit run and where it stands (champion, or why it is not compared with it)."""
    from argse.registry import standing

    client = MlflowClient()
    rows: dict[str, list[tuple[int, str]]] = {}
    for job in sorted(finished, key=lambda j: (j.seed, j.prior)):
        fit = client.get_run(job.run_id).data.tags.get(TAG_STEP + "argse", "").split()[-1:]
        registered_as = client.get_run(fit[0]).data.tags.get(TAG_REGISTERED_MODEL, "") if fit else ""
        name, _, number = registered_as.rpartition("/")
        if name and number.isdigit():
            version = client.get_model_version(name, number)
            rows.setdefault(name, []).append((int(number), f"  v{number}: seed {job.seed}, {job.prior} prior, fit run "
                                                           f"{fit[0]}: {standing(client, name, version)}"))
    lines = []
    for name, found in rows.items():
        lines.append(f"the pipelines' models, registered in {name}:")
        lines.extend(line for _, line in sorted(found))
    return lines


def _pipeline_command(cfg: BenchmarkConfig, job: Job, experiment: str | None) -> list[str]:
    return ([sys.executable, "-m", "argse", "pipeline", *cfg.pipeline_args(job.seed, job.prior)]
            + (["--experiment", experiment] if experiment else []))


def _run_pipelines(cfg: BenchmarkConfig, engine: engines.Engine, todo: list[Job], workers: int, experiment: str | None,
                   logs: Path) -> None:
    """Run the pipelines of ``todo`` on ``engine`` (:mod:`argse.engines`): one thread per seed slot, a
    seed's priors one after another."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    lock = threading.Lock()
    by_seed: dict[int, list[Job]] = {}
    for job in todo:
        by_seed.setdefault(job.seed, []).append(job)

    def one_seed(seed_jobs: list[Job]) -> None:
        for job in seed_jobs:
            job.log = logs / f"seed{job.seed}-{job.prior}.log"
            started = time.perf_counter()
            with open(job.log, "w") as out:
                done = engine.run(_pipeline_command(cfg, job, experiment), env, out)
            job.seconds = time.perf_counter() - started
            text = job.log.read_text()
            job.run_id = next((line.split()[2] for line in text.splitlines() if line.startswith("pipeline run ")), None)
            if done.returncode == 0 and job.run_id:
                job.action = "ran"
                line = f"seed {job.seed}, {job.prior} prior: pipeline run {job.run_id} finished in {job.seconds:.0f} s"
            else:
                job.action = "failed"
                errors = [line for line in text.splitlines() if line.startswith("error:")]
                job.reason = (errors[-1].removeprefix("error:").strip() if errors
                              else f"the pipeline exited with code {done.returncode}")
                line = f"seed {job.seed}, {job.prior} prior: failed after {job.seconds:.0f} s: {job.reason}"
            with lock:
                click.echo(line)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in [pool.submit(one_seed, seed_jobs) for seed_jobs in by_seed.values()]:
            result.result()


def _evaluate_run(client: MlflowClient, pipeline_id: str) -> str:
    action_and_id = client.get_run(pipeline_id).data.tags.get(TAG_STEP + "evaluate", "")
    if not action_and_id:
        raise ArgseError(f"pipeline run {pipeline_id} has no evaluate step")
    return action_and_id.split()[-1]


def summarise_runs(cfg: BenchmarkConfig, finished: list[Job]) -> dict[str, tuple[pd.DataFrame, dict, dict]]:
    """Per prior: the summary table (`argse.selective.seeds.summarise`), the seeds' tables and their
    coverage points, read from each pipeline's evaluate run."""
    client = MlflowClient()
    out = {}
    for prior in cfg.test_prior:
        tables, points = {}, {}
        for job in (j for j in finished if j.prior == prior):
            evaluate_id = _evaluate_run(client, job.run_id)
            tables[job.seed] = pd.read_csv(tracking.download(evaluate_id, f"{RESULTS_DIR}/{RESULTS_TABLE}"))
            points[job.seed] = pd.read_csv(tracking.download(evaluate_id, f"{RESULTS_DIR}/{COVERAGE_POINTS}"))
        if tables:
            reference = registered_method(cfg, prior)
            out[prior] = (summarise(tables, reference), tables, points)
    return out


def registered_method(cfg: BenchmarkConfig, prior: str) -> str:
    """The evaluate table's row of the registered model: ``ar-gse[<objective>]``."""
    objective = cfg.pipeline_config(0, prior).stage_configs()["argse"].objective
    return f"ar-gse[{objective}]"


def headline(summary: pd.DataFrame, seeds: list[int]) -> str:
    """The markdown table a person reads: each method's areas over seeds and how the registered model
    compares (difference = method minus registered: positive where the registered model is better)."""
    n = len(seeds)
    header = ["method", "aurc_worst mean (sd)", "aurc_balanced mean (sd)", "aurc_worst - registered [95% CI]",
              "registered better (worst)", "aurc_balanced - registered [95% CI]", "registered better (balanced)"]
    lines = ["| " + " | ".join(header) + " |", "|:---|" + "---:|" * (len(header) - 1)]

    def number(x: float) -> str:
        return "-" if math.isnan(x) else f"{x:.4f}"

    for _, row in summary.iterrows():
        cells = [str(row["method"])]
        for metric in ("aurc_worst", "aurc_balanced"):
            cells.append(f"{number(row[f'{metric}_mean'])} ({number(row[f'{metric}_sd'])})")
        for metric in PAIRED:
            diff, lo, hi = (row[f"{metric}_minus_registered{s}"] for s in ("", "_lo", "_hi"))
            cells.append(f"{number(diff)} [{number(lo)}, {number(hi)}]")
            cells.append(f"{int(row[f'{metric}_registered_better'])} of {int(row['n_seeds'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n({n} seed{'s' if n != 1 else ''}: {', '.join(map(str, seeds))}; sd: sample " \
                              "standard deviation; the interval: Student t over the seeds' paired differences)\n"


def log_summary(results: dict, cfg: BenchmarkConfig, finished: list[Job], failed: list[Job], name: str) -> None:
    metrics: dict[str, float] = {}
    frames, text = [], [f"# {name}\n"]
    for job in failed:
        text.append(f"seed {job.seed} ({job.prior} prior) failed and is left out: {job.reason}\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for prior, (summary, tables, points) in results.items():
            seeds = sorted(tables)
            frames.append(summary.assign(prior=prior)[["prior", *summary.columns]])
            text.append(f"\n## {prior} prior (registered model: {registered_method(cfg, prior)})\n\n" + headline(summary, seeds))
            for _, row in summary.iterrows():
                for metric in METRICS:
                    for stat in ("mean", "sd"):
                        value = row[f"{metric}_{stat}"]
                        if not math.isnan(value):
                            metrics[f"{prior}/" + metric_key(row["method"], f"{metric}_{stat}")] = float(value)
            for risk, label in (("balanced", "balanced error"), ("worst", "worst-group error")):
                curves = mean_curves(points, risk)
                order = [m for m in summary["method"] if m in curves]
                fig = figures.risk_coverage_curves(
                    {m: (curves[m][0], curves[m][1]) for m in order}, f"{label} (mean over seeds)",
                    f"{cfg.dataset}, {prior} prior: {label} over seeds {seed_span(tuple(seeds))} (band: range)",
                    bands={m: (curves[m][2], curves[m][3]) for m in order}, xlabel="target coverage")
                mlflow.log_figure(fig, f"{BENCHMARK_DIR}/figures/rc_{risk}_{prior}.png")
                figures.close(fig)
        table = pd.concat(frames, ignore_index=True)
        table.to_csv(folder / RESULTS_TABLE, index=False)
        (folder / "table.md").write_text("".join(text))
        mlflow.log_artifacts(tmp, BENCHMARK_DIR)
    mlflow.log_metrics(metrics)
    mlflow.log_metrics({"seeds_finished": float(len({j.seed for j in finished})), "pipelines_failed": float(len(failed)),
                        "pipelines_reused": float(sum(j.action == "reused" for j in finished))})
    click.echo("".join(text))
    if failed:
        click.echo(f"{len(failed)} pipeline(s) failed and are left out of the summary: "
                   + "; ".join(f"seed {j.seed} ({j.prior}): {j.reason}" for j in failed))
