"""The AR-GSE stage: fit the plug-in rejector on the gated mixture, log the servable model, register it.

Reads a gating run and its experts through MLflow, forms the mixture posteriors on ``tunev`` (the
fitting split S1) and ``val`` (the selection split S2), and fits the rule for the balanced or the
worst-group L2R risk at ``--cost`` (or at the cost whose rule reaches ``--target-coverage`` on val).
Logs alpha / mu / beta, the exponentiated-gradient history, the operating point on val, and the
pyfunc ``model``, registered as ``--register-name``: the experts' and the gate's weights files copied
byte for byte from the runs that logged them, the rule, and the provenance (``argse.serving``).

Once the run is FINISHED, the alias ``champion`` moves by the champion criterion (:mod:`argse.registry`).

A maintainer's promotion of a teammate's fit (``argse team promote``) is this stage run again in the
shared experiment, on the candidate's gate and options (:class:`Candidate`): the candidate's model
must be, file for file, what this refit builds, and its criterion what the refit computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from pathlib import Path

import click
import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from argse import ArgseError, figures, fmt_number, serving, stage_registry, tracking
from argse.artifacts import ExpertSet, load_experts, load_gate, resolve_gating, splits_of
from argse.config import ArgseConfig
from argse.data.stream import split_pixels
from argse.data.splits import EVAL_SPLITS, Splits
from argse.models.gating import gated_mixture
from argse import selective
from argse.selective import FitOptions, PluginRule, fit_group_thresholds, selective_errors
from argse.selective.matched import matched_aurc
from argse.selective.metrics import weighted_coverage
from argse.stage_registry import (
    ARGSE_STAGE,
    EG_HISTORY,
    EXPERT_WEIGHTS,
    GATE,
    RULE,
    TAG_GATING_MODE,
    TAG_PROMOTED_FROM,
    join_expert_runs,
    split_expert_runs,
)
from argse.registry import CHAMPION_PARAM, COMPARED_PARAM, TIE_DECIMALS, crown, register
from argse.tracking import integrity

log = logging.getLogger(__name__)

CHAMPION_METRIC = "val_worst_l2r"  # the operating point's L2R risk on val, informative (it depends on the cost)
#: A promoted candidate's model must reproduce, from raw val images, the margins its experts' logged
#: logits give to within this, relative to the margins' scale (:func:`margin_gap`): float32 forwards
#: against float32 logits, with other kernels or on another device perhaps. A margin is a difference of
#: terms as large as p/alpha: a digits-lt worst rule with alpha at its floor (1e-6) gave margins up to
#: 2.6e4 that moved by up to 0.27 between ATen's AVX-512 and portable kernels (posteriors by 7e-8), and
#: a margin near zero moved by as much as the largest one.
PROMOTE_MARGIN_TOLERANCE = 0.01


def splits_digest(splits: Splits) -> str:
    """The splits by content: their fingerprint (the source data and every index) and the groups. Two
    splits runs that hold the same content have the same digest; a run id would tell them apart."""
    digest = hashlib.sha256(splits.fingerprint.encode())
    digest.update(np.ascontiguousarray(splits.class_to_group, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def compared_on(objective: str, prior: str, splits: Splits) -> str:
    """The value of :data:`COMPARED_PARAM`: what a fit's criterion is a number about."""
    return f"objective {objective}, prior {prior}, splits {splits_digest(splits)}"


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
    return resolve_gating(cfg.gating_run, dataset=cfg.dataset, experiment=experiment)


def upstream(cfg: ArgseConfig, experiment: str | None) -> dict[str, str]:
    """The runs a fit of ``cfg`` reads, as its run records them: the selective gating run, its experts
    and their splits."""
    gating_run, ids = resolve_inputs(cfg, experiment)
    return ARGSE_STAGE.upstream(gating=gating_run.info.run_id, experts=join_expert_runs(ids), splits=splits_of(ids))


def run(cfg: ArgseConfig, *, experiment: str | None = None, candidate: "Candidate | None" = None) -> str | None:
    """Run the stage; return the run id (``None`` for a dry run). With ``candidate``, the run is a
    promotion: it refits the candidate's gate with its options and fails, before anything is logged
    or registered, where the candidate's model or criterion is not what the refit gives."""
    if cfg.dry_run:
        gating_run, ids = resolve_inputs(cfg, experiment)
        click.echo(cfg.dry_run_header("argse"))
        click.echo(f"  gating run: {gating_run.info.run_id} ({gating_run.data.tags.get(TAG_GATING_MODE)})")
        click.echo("  experts: " + ", ".join(f"{n} {i}" for n, i in ids.items()))
        click.echo(f"  plan: mixture on tunev/val, fit the {cfg.objective} rule "
                   + (f"at cost {cfg.cost}" if cfg.cost is not None else f"for val coverage {cfg.target_coverage}")
                   + f", log the pyfunc model, register it as {cfg.register_name}")
        return None

    tags = {TAG_PROMOTED_FROM: candidate.run_id} if candidate is not None else None
    with tracking.stage_run("argse", cfg.dataset, cfg.params(), experiment=experiment, run_name="argse",
                            tags=tags) as active:
        inputs = upstream(cfg, experiment)
        tracking.set_upstream("argse", cfg.params(), inputs)
        experts = load_experts(split_expert_runs(inputs["experts_run"]), cfg.test_prior)
        tracking.log_split_inputs(experts.splits, ("tunev", "val"))
        gate = load_gate(inputs["gating_run"])
        rule, summary = fit_and_log(cfg, experts, gate)
        if candidate is not None:
            candidate.check_criterion(summary["val_matched_aurc"], compared_on(cfg.objective, cfg.test_prior,
                                                                                experts.splits))
        model_info = log_servable(cfg, experts, inputs["gating_run"], gate, rule, candidate=candidate)
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
    mlflow.log_params({CHAMPION_PARAM: repr(float(criterion)),
                       COMPARED_PARAM: compared_on(cfg.objective, cfg.test_prior, splits)})
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


def write_components(folder: Path, cfg: ArgseConfig, experts: ExpertSet, gating_run_id: str, rule: PluginRule,
                     image_shape) -> Path:
    """The model's components: each expert's and the gate's weights file as its run logged it (read
    through the run's digests), the rule, and meta.json with the provenance (this run, its upstream)."""
    splits = experts.splits
    meta = {"run_id": mlflow.active_run().info.run_id,
            "upstream": {"gating": gating_run_id, "experts": dict(experts.run_ids), "splits": experts.splits_run_id},
            "dataset": cfg.dataset, "backbone": cfg.preset.backbone, "num_classes": splits.num_classes,
            "image_shape": list(image_shape), "class_names": list(splits.class_names),
            "group_names": list(splits.group_names), "posterior_shifts": experts.shifts.tolist()}
    return serving.write_components(
        folder, experts={name: tracking.download(run_id, EXPERT_WEIGHTS) for name, run_id in experts.run_ids.items()},
        gate=tracking.download(gating_run_id, GATE), rule=rule, meta=meta)


def margin_gap(served: np.ndarray, expected: np.ndarray) -> float:
    """The largest difference between two rows of margins, relative to the margins' scale: the largest
    expected margin's size, or 1 where all are smaller."""
    return float(np.abs(served - expected).max() / max(1.0, float(np.abs(expected).max())))


def log_servable(cfg: ArgseConfig, experts: ExpertSet, gating_run_id: str, gate, rule: PluginRule, *,
                 candidate: "Candidate | None" = None):
    """Log the pyfunc and check that it reproduces, from raw val images, what the logits give (a
    promoted candidate's to :data:`PROMOTE_MARGIN_TOLERANCE` in every margin)."""
    image_shape = cfg.preset.image_shape
    val_images = split_pixels(experts.splits, cfg.source(), "val", None, image_shape)
    if image_shape[2] == 1:
        val_images = val_images[..., 0]
    with tempfile.TemporaryDirectory() as tmp:
        components = write_components(Path(tmp) / "components", cfg, experts, gating_run_id, rule, image_shape)
        if candidate is not None:
            candidate.check_model(components)
        info, model = serving.log_model(components, image_shape=image_shape, cost=rule.cost, example=val_images[:3])
    served = model.predict(val_images)
    expected = serving.predict_frame(rule, gated_mixture(gate, experts.probs["val"]))
    agreement = float((served["prediction"].to_numpy() == expected["prediction"].to_numpy()).mean())
    accept_agreement = float((served["accept"].to_numpy() == expected["accept"].to_numpy()).mean())
    gap = margin_gap(served["margin"].to_numpy(), expected["margin"].to_numpy())
    mlflow.log_metrics({"model_check_prediction_agreement": agreement, "model_check_accept_agreement": accept_agreement,
                        "model_check_margin_gap": gap})
    if agreement < 0.99:
        raise ArgseError(f"the logged model agrees with the logged logits on only {agreement:.1%} of val; "
                         "the expert runs and their models differ")
    if candidate is not None and gap > PROMOTE_MARGIN_TOLERANCE:
        raise ArgseError(f"run {candidate.run_id}: its model's experts do not give, from the val images, the logits "
                         f"their runs logged (margins differ by up to {gap:.3g} of their scale): not promoted")
    return info


class Candidate:
    """A teammate's fit run that a maintainer promotes (``argse team promote``): what its run claims, to
    be checked against a refit of its gate in the maintainer's space (:func:`run` with ``candidate``)."""

    def __init__(self, run_id: str):
        client = MlflowClient()
        self.run_id = run_id
        self.run = client.get_run(run_id)
        if self.run.data.tags.get(tracking.TAG_STAGE) != "argse" or self.run.info.status != "FINISHED":
            raise ArgseError(f"run {run_id} is not a FINISHED fit (argse) run: promote the run `argse fit` made")
        if not integrity.is_sealed(run_id):
            raise ArgseError(f"run {run_id} has no sealed digests (param {integrity.SEAL_PARAM}): it was logged by an "
                             "older argse; refit its gate with this version (`argse fit --gating-run ...`), then promote")
        tracking.lookup.verify_run(run_id)  # every file it logged, against the digests it sealed

    def config(self, register_name: str) -> ArgseConfig:
        """The candidate's fit options, on its gating run, registering in ``register_name``."""
        cfg = ArgseConfig(dataset=self.run.data.tags[tracking.TAG_DATASET]).restore(self.run.data.params)
        gating = self.run.data.tags.get(stage_registry.TAG_UPSTREAM + "gating")
        if not gating:
            raise ArgseError(f"run {self.run_id} names no gating run (tag {stage_registry.TAG_UPSTREAM}gating): "
                             "promote the run `argse fit` made")
        return dataclasses.replace(cfg, gating_run=gating, register_name=register_name).resolve()

    def check_criterion(self, value: float, compared: str) -> None:
        """The candidate's claimed criterion and what it is about, against the refit's."""
        params = self.run.data.params
        claimed = params.get(CHAMPION_PARAM)
        if claimed is None or abs(float(claimed) - value) > 10 ** -TIE_DECIMALS:
            raise ArgseError(f"run {self.run_id}: its champion criterion ({CHAMPION_PARAM}) {claimed} is not what its "
                             f"gate and experts give ({value:.6g}): not promoted")
        if params.get(COMPARED_PARAM) != compared:
            raise ArgseError(f"run {self.run_id}: its criterion says it is about {params.get(COMPARED_PARAM)!r}, its "
                             f"inputs give {compared!r}: not promoted")

    def check_model(self, components: Path) -> None:
        """Each file of the candidate's model components equals the refit's: the experts' and the gate's
        weights are the files their runs logged, the rule is what its inputs give, meta.json differs
        only in the run that logged it."""
        model = tracking.download(self.run_id, stage_registry.MODEL)  # checked against the run's seal
        theirs = model / serving.COMPONENTS
        if not theirs.is_dir():
            raise ArgseError(f"run {self.run_id}: its model has no {serving.COMPONENTS} (it was logged by an older "
                             "argse, with its code): refit its gate with this version, then promote")
        meta = json.loads((components / serving.META_FILE).read_text())
        sources = {serving.GATE_FILE: f"the {GATE} gating run {meta['upstream']['gating']} logged",
                   serving.RULE_FILE: "the rule its gate, experts and options give",
                   **{serving.EXPERT_FILE.format(name=name): f"the {EXPERT_WEIGHTS} expert run {run_id} logged"
                      for name, run_id in meta["upstream"]["experts"].items()}}
        names = sorted({p.name for p in components.iterdir()} | {p.name for p in theirs.iterdir()})
        for name in names:
            if not (theirs / name).is_file() or not (components / name).is_file():
                raise ArgseError(f"run {self.run_id}: its model {'lacks' if (components / name).is_file() else 'adds'} "
                                 f"{serving.COMPONENTS}/{name}: not promoted")
            if name == serving.META_FILE:
                mine, claimed = meta, json.loads((theirs / name).read_text())
                differ = sorted(k for k in set(mine) | set(claimed) if k != "run_id" and mine.get(k) != claimed.get(k))
                if differ:
                    raise ArgseError(f"run {self.run_id}: its model's {name} differs from what its inputs give in "
                                     f"{', '.join(differ)}: not promoted")
                continue
            ours, found = integrity.sha256(components / name), integrity.sha256(theirs / name)
            if ours != found:
                raise ArgseError(f"run {self.run_id}: its model's {name} is not {sources.get(name, 'what its inputs give')} "
                                 f"(sha256 {found[:16]}... in the model, {ours[:16]}... there): not promoted")


__all__ = ["run", "fit_rule", "cost_for_coverage", "operating_point", "Candidate", "compared_on", "splits_digest",
           "margin_gap", "PROMOTE_MARGIN_TOLERANCE"]
