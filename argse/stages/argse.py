"""The AR-GSE stage: fit the plug-in rejector on the gated mixture, log the servable model, register it.

Reads a gating run and its experts through MLflow, forms the mixture posteriors on ``tunev`` (the
fitting split S1) and ``val`` (the selection split S2), and fits the rule for the balanced or the
worst-group L2R risk at ``--cost`` (or at the cost whose rule reaches ``--target-coverage`` on val).
Logs alpha / mu / beta, the exponentiated-gradient history, the operating point on val, and the
pyfunc ``model`` (experts + temperatures + gate + rule), registered as ``--register-name``. Once the
run is FINISHED, the alias ``champion`` is pointed at the version with the lowest val worst-group L2R
risk among those whose run FINISHED (a tie keeps the version registered first), by a compare-and-set
loop that concurrent fits cannot defeat.
"""

from __future__ import annotations

import logging
import random
import time

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
from argse.selective.metrics import weighted_coverage
from argse.stages.common import ExpertSet, load_experts
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
    split_expert_runs,
)
from argse.stages.gating import load_gate

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHAMPION_METRIC = "val_worst_l2r"
TIE_DECIMALS = 9  # risks equal to this many decimals tie: the version registered first wins


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
        gating_run, ids = resolve_inputs(cfg, experiment)
        experts = load_experts(ids, cfg.test_prior)
        tracking.set_upstream("argse", cfg.params(), ARGSE_STAGE.upstream(
            gating=gating_run.info.run_id, experts=experts.ids_tag, splits=experts.splits_run_id))
        tracking.log_split_inputs(experts.splits, ("tunev", "val"))
        gate = load_gate(gating_run.info.run_id)
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
        mlflow.log_dict(rule.history.to_dict(), EG_HISTORY)
    if cfg.group_thresholds_mode == "per-group":
        rule = fit_group_thresholds(rule, eta["tunev"], cfg.target_coverage, weights=w["tunev"])
    mlflow.log_dict(rule.to_dict(), RULE)
    params = {"cost": rule.cost}
    for k, name in enumerate(names):
        params.update({f"alpha_{name}": float(rule.alpha[k]), f"mu_{name}": float(rule.mu[k]),
                       f"beta_{name}": float(rule.beta[k])})
        if rule.thresholds is not None:
            params[f"threshold_{name}"] = float(rule.thresholds[k])
    mlflow.log_metrics(params)
    summary = {f"val_{k}": v for k, v in operating_point(rule, eta["val"], y["val"], w["val"], c2g, names).items()}
    summary[CHAMPION_METRIC] = summary["val_worst_l2r"]
    mlflow.log_metrics(summary)
    fig = figures.bars_by_group({"coverage": [summary[f"val_coverage_{n}"] for n in names],
                                 "error": [summary[f"val_error_{n}"] for n in names]},
                                names, "val", f"AR-GSE[{cfg.objective}] at cost {fmt_number(rule.cost)}")
    mlflow.log_figure(fig, "val_operating_point.png")
    figures.close(fig)
    return rule, summary


def log_servable(cfg: ArgseConfig, experts: ExpertSet, gate, rule: PluginRule):
    """Log the pyfunc and check that it reproduces, from raw val images, what the logits give."""
    splits = experts.splits
    expert_models = {name: mlflow.pytorch.load_model(f"runs:/{run_id}/{MODEL}").eval()
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
        shifts=experts.shifts)
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
    """The fit run a version came from: the one that registered it, else the one that logged its model."""
    return version.tags.get(TAG_VERSION_RUN) or version.run_id


def _risk_of(client: MlflowClient, version) -> float | None:
    """A version's val worst-group L2R risk: its tag, else its run's metric (versions registered by hand)."""
    if TAG_VERSION_RISK in version.tags:
        return float(version.tags[TAG_VERSION_RISK])
    try:
        return client.get_run(_run_of(version)).data.metrics.get(CHAMPION_METRIC) if _run_of(version) else None
    except MlflowException:
        return None


def best_version(client: MlflowClient, name: str):
    """The version of ``name`` that should be champion: the lowest val worst-group L2R risk among the
    READY versions whose run is FINISHED; on a tie (equal to :data:`TIE_DECIMALS` decimals, so that
    two fits of the same model that differ in the last bit tie), the one registered first.
    ``(version, risk)``, or ``(None, None)`` when no version qualifies."""
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        versions.extend(v for v in page if v.status == "READY")
        token = page.token
        if not token:
            break
    ranked = sorted(((risk, int(v.version), v) for v in versions if (risk := _risk_of(client, v)) is not None),
                    key=lambda r: (round(r[0], TIE_DECIMALS), r[1]))
    for risk, _, version in ranked:
        if not _run_of(version):
            continue
        try:
            run = client.get_run(_run_of(version))
        except MlflowException:
            continue
        if run.info.status == "FINISHED" and run.info.lifecycle_stage == "active":
            return version, risk
    return None, None


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


def crown(name: str, version=None, *, attempts: int = 20) -> str:
    """Point ``champion`` at :func:`best_version` and return the decision, one phrase (recorded on the
    run of ``version`` when given). Safe under concurrent fits: a compare-and-set loop that sets the
    alias, then reads it and the best version again, until both agree; the last fit to finish thus
    leaves the alias on the best FINISHED version, whatever the interleaving. Without ``version`` it
    repairs: a champion left on a run that did not finish (or any stale choice) moves to the best."""
    client = MlflowClient()
    before = _champion(client, name)
    best, best_risk = best_version(client, name)
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
        best, best_risk = best_version(client, name)
    else:
        raise ArgseError(f"{name}@{CHAMPION} kept moving for {attempts} tries; rerun `argse fit` to settle it")
    decision = _decision(client, name, version, before, best, best_risk)
    if version is not None:
        client.set_tag(_run_of(version), TAG_CHAMPION_DECISION, decision)
        client.log_metric(_run_of(version), "became_champion", float(best is not None and best.version == version.version))
    return decision


def _decision(client: MlflowClient, name: str, version, before, best, best_risk) -> str:
    if best is None:
        return f"{name} has no FINISHED version; {CHAMPION} is unset"
    risk = fmt_number(best_risk)
    if version is None:
        if before is not None and before.version == best.version:
            return f"{name}@{CHAMPION} is v{best.version} (val worst L2R {risk})"
        was = f"v{before.version}, whose run is not FINISHED or not the best" if before is not None else "unset"
        return f"moved {name}@{CHAMPION} to v{best.version} (val worst L2R {risk}; it was {was})"
    mine = _risk_of(client, version)
    if best.version == version.version:
        if before is None:
            return f"registered {name} v{version.version} as {CHAMPION} (val worst L2R {risk}, first champion)"
        previous = _risk_of(client, before)
        if previous is not None and round(best_risk, TIE_DECIMALS) < round(previous, TIE_DECIMALS):
            was = f" < v{before.version}'s {fmt_number(previous)}"
        else:
            was = f", replacing v{before.version}, whose run did not finish"
        return f"registered {name} v{version.version} as {CHAMPION} (val worst L2R {risk}{was})"
    verb = "stays" if before is not None and before.version == best.version else "is"
    if mine is None:
        return f"registered {name} v{version.version}, which has no {CHAMPION_METRIC}; {CHAMPION} {verb} v{best.version}"
    tie = " (a tie keeps the earlier version)" if round(mine, TIE_DECIMALS) == round(best_risk, TIE_DECIMALS) else ""
    return (f"registered {name} v{version.version}; {CHAMPION} {verb} v{best.version} "
            f"(val worst L2R {fmt_number(mine)} >= {risk}){tie}")


__all__ = ["run", "fit_rule", "cost_for_coverage", "operating_point", "register", "crown", "best_version"]
