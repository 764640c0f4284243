"""The AR-GSE stage: fit the plug-in rejector on the gated mixture, log the servable model, register it.

Reads a gating run and its experts through MLflow, forms the mixture posteriors on ``tunev`` (the
fitting split S1) and ``val`` (the selection split S2), and fits the rule for the balanced or the
worst-group L2R risk at ``--cost`` (or at the cost whose rule reaches ``--target-coverage`` on val).
Logs alpha / mu / beta, the exponentiated-gradient history, the operating point on val, and the
pyfunc ``model``, registered as ``--register-name``: the experts' and the gate's weights files copied
byte for byte from the runs that logged them, the rule, and the provenance (``argse.serving``).

Once the run is FINISHED, the alias ``champion`` is pointed at the best version by the champion
criterion, among the versions *comparable* with the champion whose run FINISHED, by a
compare-and-set loop that concurrent fits cannot defeat. The criterion is the model's coverage-matched
AURC of its objective's error on val (each group error judged by its bound), which no cost enters;
comparable means the same objective, the same target prior and the same splits by content (a digest
of the split indices, the source data and the groups, not the splits run's id). Both are recorded by
the fit run as write-once params; a version's tags never decide, and a tie keeps the current champion.
A version that is not comparable with the champion is registered and not crowned; the line says why
and that ``argse crown models:/<name>/<version>`` makes it champion (:func:`crown_by_hand`).

A maintainer's promotion of a teammate's fit (``argse team promote``) is this stage run again in the
shared experiment, on the candidate's gate and options (:class:`Candidate`): the candidate's model
must be, file for file, what this refit builds, and its criterion what the refit computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import click
import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from argse import ArgseError, figures, first_line, fmt_number, serving, stage_registry, tracking
from argse.artifacts import ExpertSet, load_experts, load_gate, resolve_gating, splits_of
from argse.config import ArgseConfig
from argse.data.loaders import load_source
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
    TAG_CHAMPION_DECISION,
    TAG_GATING_MODE,
    TAG_PROMOTED_FROM,
    TAG_REGISTERED_MODEL,
    TAG_VERSION_RISK,
    TAG_VERSION_RUN,
    join_expert_runs,
    split_expert_runs,
)
from argse.tracking import integrity

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHAMPION_METRIC = "val_worst_l2r"  # the operating point's L2R risk on val, informative (it depends on the cost)
#: The champion criterion, a param of the fit run (write-once): the coverage-matched AURC of the model's
#: objective error on val, judged by the bound; the cost does not enter it.
CHAMPION_PARAM = "argse.champion_val_matched_aurc"
#: What the criterion may be compared with, a param of the fit run (write-once): its objective, its
#: target prior and the digest of the splits' content (:func:`compared_on`).
COMPARED_PARAM = "argse.champion_compared_on"
TIE_DECIMALS = 9  # criteria equal to this many decimals tie: the current champion stays
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
    splits = experts.splits
    source = load_source(cfg.preset.source, cfg.data_dir)
    splits.check_source(source)
    val_images = splits.images(source, "val")
    if source.train_images.shape[-1] == 1:
        val_images = val_images[..., 0]
    image_shape = source.train_images.shape[1:]
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
        integrity.verify_run(run_id)  # every file it logged, against the digests it sealed

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


def _param_of(client: MlflowClient, version, key: str) -> str | None:
    try:
        return client.get_run(_run_of(version)).data.params.get(key) if _run_of(version) else None
    except MlflowException:
        return None


def criterion_of(client: MlflowClient, version) -> float | None:
    """A version's champion criterion: the write-once param its run logged (:data:`CHAMPION_PARAM`);
    None for a version whose run has none (registered by hand, or by a fit older than the criterion)."""
    text = _param_of(client, version, CHAMPION_PARAM)
    return float(text) if text is not None else None


def compared_on_of(client: MlflowClient, version) -> str | None:
    """What a version's criterion is about (:data:`COMPARED_PARAM` of its run); None for a version whose
    run has none (logged before it was recorded): such versions are comparable only with each other."""
    return _param_of(client, version, COMPARED_PARAM)


def _versions(client: MlflowClient, name: str) -> list:
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        versions.extend(v for v in page if v.status == "READY")
        token = page.token
        if not token:
            break
    return versions


def best_version(client: MlflowClient, name: str, current=None, among: str | None = None):
    """The version of ``name`` that should be champion: the lowest champion criterion among the READY
    versions whose run is FINISHED and whose criterion is about ``among`` (:func:`compared_on`); where
    the ``current`` champion ties it (equal to :data:`TIE_DECIMALS` decimals), the current one stays;
    among other ties, the one registered first. ``(version, criterion)``, or ``(None, None)``."""
    ranked = []
    for version in _versions(client, name):
        value = criterion_of(client, version)
        if value is None or compared_on_of(client, version) != among or not _finished(client, version):
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


def _among(client: MlflowClient, name: str, champion, version) -> str | None:
    """What the versions compete on: the champion's, else the new version's, else the newest FINISHED
    version's (a repair with no champion)."""
    if champion is not None:
        return compared_on_of(client, champion)
    if version is not None:
        return compared_on_of(client, version)
    finished = [v for v in _versions(client, name) if criterion_of(client, v) is not None and _finished(client, v)]
    return compared_on_of(client, max(finished, key=lambda v: int(v.version))) if finished else None


def crown(name: str, version=None, *, attempts: int = 20, on_run: bool = True) -> str:
    """Point ``champion`` at :func:`best_version` among the versions comparable with the champion (with
    no champion: with ``version``) and return the decision, one phrase (recorded on the run of
    ``version`` when given, or on the version itself with ``on_run=False``, for a run that its caller
    may not write to). Safe under concurrent fits: a compare-and-set loop that sets the alias, then
    reads it and the best version again, until both agree; the last fit to finish thus leaves the
    alias on the best FINISHED version, whatever the interleaving. Without ``version`` it repairs: a
    champion left on a run that did not finish (or any stale choice) moves to the best."""
    client = MlflowClient()
    before = _champion(client, name)
    among = _among(client, name, before, version)
    best, best_value = best_version(client, name, before, among)
    for _ in range(attempts):
        current = _champion(client, name)
        if best is None:
            if current is not None and not _finished(client, current):  # no FINISHED version comparable with it
                try:
                    client.delete_registered_model_alias(name, CHAMPION)
                except MlflowException as exc:  # deleting takes MANAGE; the next fit moves it anyway
                    log.warning("%s@%s is on v%s, whose run did not finish, and stays there: %s", name,
                                CHAMPION, current.version, str(exc).strip().splitlines()[0])
                else:  # no champion now: the new version's kind competes
                    among = _among(client, name, None, version)
                    best, best_value = best_version(client, name, None, among)
                    if best is not None:
                        continue
            break
        if current is not None and current.version == best.version:
            break
        try:
            client.set_registered_model_alias(name, CHAMPION, best.version)
        except MlflowException as exc:  # another fit set it at the same moment (unique key): look again
            log.debug("setting %s@%s: %s", name, CHAMPION, exc)
            time.sleep(random.uniform(0.05, 0.5))
        current = _champion(client, name)
        among = _among(client, name, current, version)
        best, best_value = best_version(client, name, current, among)
    else:
        raise ArgseError(f"{name}@{CHAMPION} kept moving for {attempts} tries; rerun `argse fit` to settle it")
    decision = _decision(client, name, version, before, best, best_value, among)
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


def _compared(among: str | None) -> str:
    return f"compared with the versions of {among}" if among else \
        "compared with the versions that record nothing of what they are about (registered before argse did)"


def _not_comparable(client: MlflowClient, name: str, version, champion) -> str:
    """Why ``version`` is not compared with ``champion``, and the command that crowns it anyway."""
    mine, theirs = compared_on_of(client, version) or "", compared_on_of(client, champion) or ""
    differ = [f"{a} vs {b}" for a, b in zip(mine.split(", "), theirs.split(", ")) if a != b] if mine and theirs else \
        [f"{mine or 'nothing recorded'} vs {theirs or 'nothing recorded'}"]
    return (f"registered {name} v{version.version}; {CHAMPION} stays v{champion.version}: v{version.version} is not "
            f"compared with it ({'; '.join(differ)}): its val number is about other data or another objective; "
            f"to make it {CHAMPION}: argse crown models:/{name}/{version.version}")


def _decision(client: MlflowClient, name: str, version, before, best, best_value, among) -> str:
    what = "val matched AURC, lower is better"
    if best is None:
        if version is not None and before is not None and compared_on_of(client, version) != among:
            return _not_comparable(client, name, version, before)
        return f"{name} has no FINISHED version with a champion criterion; {CHAMPION} is unset"
    if version is None:
        if before is not None and before.version == best.version:
            return f"{name}@{CHAMPION} is {_source(best, best_value)}"
        was = f"v{before.version}, whose run is not FINISHED or not the best" if before is not None else "unset"
        return f"moved {name}@{CHAMPION} to {_source(best, best_value)} ({what}; it was {was}; {_compared(among)})"
    mine = criterion_of(client, version)
    if compared_on_of(client, version) != among:
        return _not_comparable(client, name, version, best)
    if best.version == version.version:
        if before is None:
            return (f"registered {name} v{version.version} as {CHAMPION}, the first ({what}: {_source(best, best_value)}; "
                    f"{_compared(among)})")
        previous = criterion_of(client, before)
        if previous is not None and _finished(client, before):
            return (f"registered {name} v{version.version} as {CHAMPION} ({what}: {_source(best, best_value)} < "
                    f"{_source(before, previous)}; {_compared(among)})")
        return (f"registered {name} v{version.version} as {CHAMPION} ({what}: {_source(best, best_value)}), "
                f"replacing v{before.version}, whose run did not finish or has no criterion ({_compared(among)})")
    verb = "stays" if before is not None and before.version == best.version else "is"
    tie = (" a tie keeps the champion:" if mine is not None and round(mine, TIE_DECIMALS) == round(best_value, TIE_DECIMALS)
           else "")
    return (f"registered {name} v{version.version}; {CHAMPION} {verb} v{best.version} ({what}:{tie} "
            f"{_source(version, mine)} >= {_source(best, best_value)}; {_compared(among)})")


def standing(client: MlflowClient, name: str, version) -> str:
    """Where ``version`` of ``name`` stands now, in a phrase: champion, compared with it, or not."""
    champion = _champion(client, name)
    if champion is None:
        return f"no {CHAMPION}"
    if champion.version == version.version:
        return CHAMPION
    mine, theirs = compared_on_of(client, version), compared_on_of(client, champion)
    if mine != theirs:
        differ = [f"{a} vs {b}" for a, b in zip((mine or "").split(", "), (theirs or "").split(", ")) if a != b]
        return f"not compared with {CHAMPION} v{champion.version} ({'; '.join(differ) or 'nothing recorded'})"
    return f"compared with {CHAMPION} v{champion.version}, not better"


def crown_by_hand(ref: str) -> str:
    """Make the version ``ref`` (``models:/<name>/<version>``) champion, whatever it was compared with:
    a maintainer's choice where the criterion cannot choose (a version on other splits, another
    objective). The version's run must be a FINISHED fit whose files are what it sealed. From then on
    the versions comparable with it compete. The decision, also recorded on the version."""
    client = MlflowClient()
    body = ref.removeprefix("models:/").strip("/") if ref.startswith("models:/") else ""
    name, _, number = body.rpartition("/")
    if not name or not number.isdigit():
        raise ArgseError(f"{ref!r} is not models:/<name>/<version>: name the version to crown")
    try:
        version = client.get_model_version(name, number)
    except MlflowException as exc:
        raise ArgseError(f"{ref} does not resolve in the model registry: {first_line(exc)}") from None
    if criterion_of(client, version) is None or not _finished(client, version):
        raise ArgseError(f"{ref}: its run {_run_of(version)} is not a FINISHED fit with a champion criterion; "
                         "crown a version `argse fit` registered")
    integrity.verify_run(_run_of(version))
    before = _champion(client, name)
    client.set_registered_model_alias(name, CHAMPION, version.version)
    was = f"v{before.version}" if before is not None else "unset"
    decision = (f"{name}@{CHAMPION} is v{version.version} by hand (it was {was}): from now on it is compared with "
                f"the versions of {compared_on_of(client, version) or 'nothing recorded'}")
    client.set_model_version_tag(name, version.version, TAG_CHAMPION_DECISION, decision)
    return decision


__all__ = ["run", "fit_rule", "cost_for_coverage", "operating_point", "register", "crown", "best_version",
           "crown_by_hand", "standing", "Candidate", "compared_on", "splits_digest"]
