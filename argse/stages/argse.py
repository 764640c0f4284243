"""The AR-GSE stage: fit the plug-in rejector on the gated mixture, log the servable model, register it.

Reads a gating run and its experts through MLflow, forms the mixture posteriors on ``tunev`` (the
fitting split S1) and ``val`` (the selection split S2), and fits the rule for the balanced or the
worst-group L2R risk at ``--cost`` (or at the cost whose rule reaches ``--target-coverage`` on val).
Logs alpha / mu / beta, the exponentiated-gradient history, the operating point on val, and the
pyfunc ``model`` (experts + temperatures + gate + rule), registered as ``--register-name``. Once the
run is FINISHED, the alias ``champion`` is pointed at the version whose model is best by the champion
criterion, among those whose run FINISHED, by a compare-and-set loop that concurrent fits cannot
defeat. The criterion is the model's coverage-matched AURC of its objective's error on val (each group
error judged by its bound), which no cost enters, recorded by the fit run as a param (write-once); a
version's tags never decide, and a tie keeps the current champion.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from pathlib import Path

import click
import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from argse import ArgseError, figures, fmt_number, serving, stage_registry, tracking
from argse.config import ArgseConfig
from argse.data.loaders import load_source
from argse.data.splits import EVAL_SPLITS
from argse.models.gating import gated_mixture
from argse import selective
from argse.selective import FitOptions, PluginRule, fit_group_thresholds, selective_errors
from argse.selective.matched import matched_aurc
from argse.selective.metrics import weighted_coverage
from argse.stages.common import ExpertSet, load_experts, splits_of
from argse.stage_registry import (
    ARGSE_STAGE,
    EG_HISTORY,
    MODEL,
    RULE,
    TAG_CHAMPION_DECISION,
    TAG_GATING_MODE,
    TAG_REGISTERED_MODEL,
    TAG_VERSION_RISK,
    TAG_VERSION_RUN,
    join_expert_runs,
    split_expert_runs,
)
from argse.stages.gating import load_gate
from argse.tracking import integrity

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHAMPION_METRIC = "val_worst_l2r"  # the operating point's L2R risk on val, informative (it depends on the cost)
#: The champion criterion, a param of the fit run (write-once): the coverage-matched AURC of the model's
#: objective error on val, judged by the bound; the cost does not enter it.
CHAMPION_PARAM = "argse.champion_val_matched_aurc"
TIE_DECIMALS = 9  # criteria equal to this many decimals tie: the current champion stays


def fit_rule(cfg: ArgseConfig, eta: dict, y: dict, w: dict, class_to_group, cost: float) -> PluginRule:
    """The plug-in rule of ``cfg.objective`` at ``cost``, fitted on tunev (S1), selected on val (S2)."""
    return selective.fit_rule(cfg.objective, eta["tunev"], y["tunev"], eta["val"], y["val"], class_to_group, cost,
                              weights_fit=w["tunev"], weights_sel=w["val"],
                              options=FitOptions(rounds=cfg.rounds, step=cfg.step, n_starts=cfg.n_starts))


def val_coverage(rule: PluginRule, eta_val: torch.Tensor, w_val: torch.Tensor) -> float:
    return weighted_coverage(rule.predict(eta_val).accept, w_val)


def cost_for_coverage(cfg: ArgseConfig, eta, y, w, class_to_group, target: float) -> tuple[float, PluginRule, list]:
    """The smallest cost whose fitted rule accepts at least ``target`` of val (weighted), by doubling
    then bisection; returns the cost, its rule and every (cost, coverage) tried."""
    tried: list[tuple[float, float, PluginRule]] = []

    def trial(cost: float) -> float:
        rule = fit_rule(cfg, eta, y, w, class_to_group, cost)
        coverage = val_coverage(rule, eta["val"], w["val"])
        tried.append((cost, coverage, rule))
        return coverage

    lo, hi = 0.0, 0.5
    if trial(lo) < target:
        while trial(hi) < target and hi < 64:
            lo, hi = hi, hi * 2
        for _ in range(10):
            mid = (lo + hi) / 2
            if trial(mid) >= target:
                hi = mid
            else:
                lo = mid
    reaching = [t for t in tried if t[1] >= target]
    cost, _, rule = min(reaching, key=lambda t: t[0]) if reaching else max(tried, key=lambda t: t[1])
    return cost, rule, [(c, cov) for c, cov, _ in tried]


def operating_point(rule: PluginRule, eta: torch.Tensor, y: torch.Tensor, w: torch.Tensor, class_to_group,
                    group_names) -> dict[str, float]:
    out = rule.predict(eta)
    errs = selective_errors(out.pred, out.accept, y, class_to_group, weights=w)
    metrics = {"coverage": float(errs.coverage), "balanced_error": float(errs.balanced_error),
               "worst_error": float(errs.worst_error), "error": float(errs.overall_error)}
    for k, name in enumerate(group_names):
        metrics[f"coverage_{name}"] = float(errs.group_coverage[k])
        metrics[f"error_{name}"] = float(errs.group_error[k])
    metrics["balanced_l2r"], metrics["worst_l2r"] = errs.balanced_l2r(rule.cost), errs.worst_l2r(rule.cost)
    return metrics


def resolve_inputs(cfg: ArgseConfig, experiment: str | None):
    """The gating run ``cfg.gating_run`` names and its experts, ``{expert: run_id}``."""
    gating_run = tracking.resolve_upstream("gating", cfg.gating_run, dataset=cfg.dataset, experiment=experiment,
                                           lineage={TAG_GATING_MODE: "selective"})
    ids = split_expert_runs(gating_run.data.tags.get(stage_registry.TAG_UPSTREAM + "experts", ""))
    if ids is None:
        raise ArgseError(f"gating run {gating_run.info.run_id} records no expert runs; rerun the gating stage")
    return gating_run, ids


def upstream(cfg: ArgseConfig, experiment: str | None) -> dict[str, str]:
    """The runs a fit of ``cfg`` reads, as its run records them: the selective gating run, its experts
    and their splits."""
    gating_run, ids = resolve_inputs(cfg, experiment)
    return ARGSE_STAGE.upstream(gating=gating_run.info.run_id, experts=join_expert_runs(ids), splits=splits_of(ids))


def run(cfg: ArgseConfig, *, experiment: str | None = None) -> str | None:
    """Run the stage; return the run id (``None`` for a dry run)."""
    if cfg.dry_run:
        gating_run, ids = resolve_inputs(cfg, experiment)
        click.echo(cfg.dry_run_header("argse"))
        click.echo(f"  gating run: {gating_run.info.run_id} ({gating_run.data.tags.get(TAG_GATING_MODE)})")
        click.echo("  experts: " + ", ".join(f"{n} {i}" for n, i in ids.items()))
        click.echo(f"  plan: mixture on tunev/val, fit the {cfg.objective} rule "
                   + (f"at cost {cfg.cost}" if cfg.cost is not None else f"for val coverage {cfg.target_coverage}")
                   + f", log the pyfunc model, register it as {cfg.register_name}")
        return None

    with tracking.stage_run("argse", cfg.dataset, cfg.params(), experiment=experiment, run_name="argse") as active:
        inputs = upstream(cfg, experiment)
        tracking.set_upstream("argse", cfg.params(), inputs)
        experts = load_experts(split_expert_runs(inputs["experts_run"]), cfg.test_prior)
        tracking.log_split_inputs(experts.splits, ("tunev", "val"))
        gate = load_gate(inputs["gating_run"])
        rule, summary = fit_and_log(cfg, experts, gate)
        model_info = log_servable(cfg, experts, gate, rule)
        version = register(cfg, model_info, active.info.run_id, summary[CHAMPION_METRIC])
    # The run is FINISHED, everything logged: only now may its version become champion.
    decision = crown(cfg.register_name, version)
    click.echo(
        f"argse run {active.info.run_id}: {cfg.objective} rule at cost {fmt_number(rule.cost)}, val coverage "
        f"{fmt_number(summary['val_coverage'])}, balanced error {fmt_number(summary['val_balanced_error'])}, "
        f"worst {fmt_number(summary['val_worst_error'])}; {decision}")
    return active.info.run_id


def fit_and_log(cfg: ArgseConfig, experts: ExpertSet, gate) -> tuple[PluginRule, dict[str, float]]:
    splits = experts.splits
    names = splits.group_names
    c2g = torch.as_tensor(splits.class_to_group)
    eta = {s: gated_mixture(gate, experts.probs[s]) for s in EVAL_SPLITS}
    y = experts.labels
    w = {s: experts.weights(s, cfg.test_prior) for s in EVAL_SPLITS}
    if cfg.cost is not None:
        cost = cfg.cost
        rule = fit_rule(cfg, eta, y, w, c2g, cost)
    else:
        cost, rule, tried = cost_for_coverage(cfg, eta, y, w, c2g, cfg.target_coverage)
        for i, (c, cov) in enumerate(sorted(tried)):
            mlflow.log_metrics({"search_cost": c, "search_val_coverage": cov}, step=i)
    mlflow.log_param("cost.chosen", f"{cost:.6g}")
    if rule.history is not None:
        for row in rule.history.rows():
            step = int(row["round"])
            flat = {"eg_worst_risk": float(row["worst_risk"]), "eg_coverage": float(row["coverage"])}
            flat.update({f"eg_beta_{names[k]}": float(v) for k, v in enumerate(row["beta"])})
            flat.update({f"eg_error_{names[k]}": float(v) for k, v in enumerate(row["group_error"])})
            flat.update({f"eg_judged_error_{names[k]}": float(v) for k, v in enumerate(row["judged_error"])})
            mlflow.log_metrics(flat, step=step)
        _log_json(rule.history.to_dict(), EG_HISTORY)
    if cfg.group_thresholds_mode == "per-group":
        rule = fit_group_thresholds(rule, eta["tunev"], cfg.target_coverage, weights=w["tunev"])
    _log_json(rule.to_dict(), RULE)
    params = {"cost": rule.cost}
    for k, name in enumerate(names):
        params.update({f"alpha_{name}": float(rule.alpha[k]), f"mu_{name}": float(rule.mu[k]),
                       f"beta_{name}": float(rule.beta[k])})
        if rule.thresholds is not None:
            params[f"threshold_{name}"] = float(rule.thresholds[k])
    mlflow.log_metrics(params)
    summary = {f"val_{k}": v for k, v in operating_point(rule, eta["val"], y["val"], w["val"], c2g, names).items()}
    summary[CHAMPION_METRIC] = summary["val_worst_l2r"]
    criterion = matched_aurc({s: eta[s] for s in ("tunev", "val")}, y, w, c2g, cfg.objective, split="val",
                             fit_options=FitOptions(rounds=cfg.rounds, step=cfg.step, n_starts=cfg.n_starts),
                             judged=True)
    mlflow.log_param(CHAMPION_PARAM, repr(float(criterion)))
    summary["val_matched_aurc"] = float(criterion)
    mlflow.log_metrics(summary)
    fig = figures.bars_by_group({"coverage": [summary[f"val_coverage_{n}"] for n in names],
                                 "error": [summary[f"val_error_{n}"] for n in names]},
                                names, "val", f"AR-GSE[{cfg.objective}] at cost {fmt_number(rule.cost)}")
    mlflow.log_figure(fig, "val_operating_point.png")
    figures.close(fig)
    return rule, summary


def _log_json(value, artifact_path: str) -> None:
    """A JSON artifact of the active run, with its digest."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / artifact_path).parent.mkdir(parents=True, exist_ok=True)
        (Path(tmp) / artifact_path).write_text(json.dumps(value))
        integrity.log_artifacts(tmp)


def log_servable(cfg: ArgseConfig, experts: ExpertSet, gate, rule: PluginRule):
    """Log the pyfunc and check that it reproduces, from raw val images, what the logits give."""
    splits = experts.splits
    expert_models = {name: mlflow.pytorch.load_model(str(tracking.download(run_id, MODEL))).eval()
                     for name, run_id in experts.run_ids.items()}
    source = load_source(cfg.preset.source, cfg.data_dir)
    splits.check_source(source)
    val_images = splits.images(source, "val")
    if source.train_images.shape[-1] == 1:
        val_images = val_images[..., 0]
    h, w, c = source.train_images.shape[1:]
    info = serving.log_model(
        dataset=cfg.dataset, backbone=cfg.preset.backbone, num_classes=splits.num_classes, image_shape=(h, w, c), class_names=splits.class_names,
        group_names=splits.group_names, experts=expert_models, gate=gate, rule=rule, example=val_images[:3],
        shifts=experts.shifts, run_id=mlflow.active_run().info.run_id)
    integrity.record_model(info.model_uri)
    model = mlflow.pyfunc.load_model(info.model_uri)
    served = model.predict(val_images)
    expected = serving.predict_frame(rule, gated_mixture(gate, experts.probs["val"]))
    agreement = float((served["prediction"].to_numpy() == expected["prediction"].to_numpy()).mean())
    accept_agreement = float((served["accept"].to_numpy() == expected["accept"].to_numpy()).mean())
    mlflow.log_metrics({"model_check_prediction_agreement": agreement, "model_check_accept_agreement": accept_agreement})
    if agreement < 0.99:
        raise ArgseError(f"the logged model agrees with the logged logits on only {agreement:.1%} of val; "
                         "the expert runs and their models differ")
    return info


def register(cfg: ArgseConfig, model_info, run_id: str, risk: float):
    """Register the logged model as a new version of ``cfg.register_name``, tagged with its run and its
    val worst-group L2R risk; return the version. Inside the run: ``champion`` moves later, in
    :func:`crown`, once the run is FINISHED."""
    version = mlflow.register_model(model_info.model_uri, cfg.register_name,
                                    tags={TAG_VERSION_RUN: run_id, TAG_VERSION_RISK: repr(float(risk))})
    mlflow.set_tag(TAG_REGISTERED_MODEL, f"{cfg.register_name}/{version.version}")
    mlflow.log_metric("registered_version", float(version.version))
    return version


def _run_of(version) -> str | None:
    """The run that logged a version's model, as the registry recorded it at registration (a version's
    tags are informative only: anyone who may edit the model may change them)."""
    return version.run_id


def criterion_of(client: MlflowClient, version) -> float | None:
    """A version's champion criterion: the write-once param its run logged (:data:`CHAMPION_PARAM`);
    None for a version whose run has none (registered by hand, or by a fit older than the criterion)."""
    try:
        text = client.get_run(_run_of(version)).data.params.get(CHAMPION_PARAM) if _run_of(version) else None
    except MlflowException:
        return None
    return float(text) if text is not None else None


def best_version(client: MlflowClient, name: str, current=None):
    """The version of ``name`` that should be champion: the lowest champion criterion among the READY
    versions whose run is FINISHED; where the ``current`` champion ties it (equal to
    :data:`TIE_DECIMALS` decimals), the current one stays; among other ties, the one registered first.
    ``(version, criterion)``, or ``(None, None)`` when no version qualifies."""
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        versions.extend(v for v in page if v.status == "READY")
        token = page.token
        if not token:
            break
    ranked = []
    for version in versions:
        value = criterion_of(client, version)
        if value is None or not _finished(client, version):
            continue
        keep = 0 if current is not None and version.version == current.version else 1
        ranked.append((round(value, TIE_DECIMALS), keep, int(version.version), value, version))
    if not ranked:
        return None, None
    _, _, _, value, version = min(ranked, key=lambda r: r[:3])
    return version, value


def _finished(client: MlflowClient, version) -> bool:
    try:
        return _run_of(version) is not None and client.get_run(_run_of(version)).info.status == "FINISHED"
    except MlflowException:
        return False


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def crown(name: str, version=None, *, attempts: int = 20, on_run: bool = True) -> str:
    """Point ``champion`` at :func:`best_version` and return the decision, one phrase (recorded on the
    run of ``version`` when given, or on the version itself with ``on_run=False``, for a run that its
    caller may not write to). Safe under concurrent fits: a compare-and-set loop that sets the
    alias, then reads it and the best version again, until both agree; the last fit to finish thus
    leaves the alias on the best FINISHED version, whatever the interleaving. Without ``version`` it
    repairs: a champion left on a run that did not finish (or any stale choice) moves to the best."""
    client = MlflowClient()
    before = _champion(client, name)
    best, best_value = best_version(client, name, before)
    for _ in range(attempts):
        current = _champion(client, name)
        if best is None:
            if current is not None and not _finished(client, current):  # no FINISHED version at all
                try:
                    client.delete_registered_model_alias(name, CHAMPION)
                except MlflowException as exc:  # deleting takes MANAGE; the next fit moves it anyway
                    log.warning("%s@%s is on v%s, whose run did not finish, and stays there: %s", name,
                                CHAMPION, current.version, str(exc).strip().splitlines()[0])
            break
        if current is not None and current.version == best.version:
            break
        try:
            client.set_registered_model_alias(name, CHAMPION, best.version)
        except MlflowException as exc:  # another fit set it at the same moment (unique key): look again
            log.debug("setting %s@%s: %s", name, CHAMPION, exc)
            time.sleep(random.uniform(0.05, 0.5))
        best, best_value = best_version(client, name, _champion(client, name))
    else:
        raise ArgseError(f"{name}@{CHAMPION} kept moving for {attempts} tries; rerun `argse fit` to settle it")
    decision = _decision(client, name, version, before, best, best_value)
    if version is not None and on_run:
        client.set_tag(_run_of(version), TAG_CHAMPION_DECISION, decision)
        client.log_metric(_run_of(version), "became_champion", float(best is not None and best.version == version.version))
    elif version is not None:
        client.set_model_version_tag(name, version.version, TAG_CHAMPION_DECISION, decision)
    return decision


def _source(version, value: float | None) -> str:
    """A version's criterion and where it comes from, for the decision line."""
    shown = "none" if value is None else f"{value:.6g}"
    return f"v{version.version}: {shown} (param {CHAMPION_PARAM} of run {_run_of(version)})"


def _decision(client: MlflowClient, name: str, version, before, best, best_value) -> str:
    what = "val matched AURC, lower is better"
    if best is None:
        return f"{name} has no FINISHED version with a champion criterion; {CHAMPION} is unset"
    if version is None:
        if before is not None and before.version == best.version:
            return f"{name}@{CHAMPION} is {_source(best, best_value)}"
        was = f"v{before.version}, whose run is not FINISHED or not the best" if before is not None else "unset"
        return f"moved {name}@{CHAMPION} to {_source(best, best_value)} ({what}; it was {was})"
    mine = criterion_of(client, version)
    if best.version == version.version:
        if before is None:
            return f"registered {name} v{version.version} as {CHAMPION}, the first ({what}: {_source(best, best_value)})"
        previous = criterion_of(client, before)
        if previous is not None and _finished(client, before):
            return (f"registered {name} v{version.version} as {CHAMPION} ({what}: {_source(best, best_value)} < "
                    f"{_source(before, previous)})")
        return (f"registered {name} v{version.version} as {CHAMPION} ({what}: {_source(best, best_value)}), "
                f"replacing v{before.version}, whose run did not finish or has no criterion")
    verb = "stays" if before is not None and before.version == best.version else "is"
    tie = (" a tie keeps the champion:" if mine is not None and round(mine, TIE_DECIMALS) == round(best_value, TIE_DECIMALS)
           else "")
    return (f"registered {name} v{version.version}; {CHAMPION} {verb} v{best.version} ({what}:{tie} "
            f"{_source(version, mine)} >= {_source(best, best_value)})")


__all__ = ["run", "fit_rule", "cost_for_coverage", "operating_point", "register", "crown", "best_version"]
