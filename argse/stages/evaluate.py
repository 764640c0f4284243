"""The evaluate stage: AR-GSE beside its baselines on one split, from the logged expert logits.

Methods, all on the same split, weights and fitting data (tunev = S1, val = S2): Chow's rule on each
expert and on their uniform average, the paper's plug-in on the best single expert (by val balanced
accuracy) and on the uniform average of the experts, for both objectives, and the gated mixture for
both objectives (the model's own rule for its objective; with per-group thresholds, both the
thresholded model and the single-cost rule). The table is ranked by the coverage-matched worst-group
AURC, then the balanced one (`argse.selective.compare`; README, Evaluate).

Before any number is computed, the logged pyfunc model is run on a sample of the split's raw images
and must agree with the decisions computed from the logits.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import mlflow
import numpy as np

from argse import ArgseError, figures, fmt_number, stage_registry, tracking
from argse.artifacts import ExpertSet, load_experts, load_gate, resolve_gating, splits_of
from argse.config import ArgseConfig, EvaluateConfig
from argse.data.stream import split_pixels
from argse.models.gating import balanced_accuracy, gated_mixture
from argse.selective import PluginRule
from argse.selective.compare import Comparison, FitOptions, Method, compare
from argse.tracking import integrity
from argse.tracking.metric_names import metric_dict
from argse.selective.metrics import MIN_GROUP_ACCEPTED
from argse.serving import predict_frame
from argse.stage_registry import (
    COVERAGE_POINTS, EVALUATE_STAGE, MODEL, RESULTS_DIR, RESULTS_TABLE, RULE, TAG_MODEL_URI, join_expert_runs,
)

#: The columns logged as metrics, per method (the rest is in results/table.csv): few enough for the
#: run list's column picker, the ones the table ranks by and reads at coverage 0.8.
METRIC_COLUMNS = ("aurc_worst", "aurc_balanced", "worst_error_at0.8", "balanced_error_at0.8", "thin_group_points")
#: results/table.md: narrow enough for the artifact viewer.
HEADLINE_COLUMNS = ("method", "aurc_worst", "aurc_balanced", "worst_error_at0.8", "balanced_error_at0.8",
                    "thin_group_points")
SUMMARY_COLUMNS = ("method", "aurc_balanced", "aurc_worst", "balanced_error_at1", "worst_error_at1",
                   "balanced_error_at0.8", "worst_error_at0.8", "balanced_error_at0.6", "worst_error_at0.6",
                   "empty_group_points", "thin_group_points")


def resolve_model(cfg: EvaluateConfig, experiment: str | None) -> tuple[mlflow.entities.Run, str]:
    """The argse run behind ``--model-uri`` and the URI to load its pyfunc from."""
    ref = cfg.model_uri
    run = tracking.resolve_upstream("argse", ref, dataset=cfg.dataset, experiment=experiment)
    uri = ref if ref.startswith(("runs:/", "models:/")) else f"runs:/{run.info.run_id}/{MODEL}"
    return run, uri


def build_methods(experts: ExpertSet, gate, rule: PluginRule, objective: str, model_prior: str) -> list[Method]:
    """Chow's rule takes each expert's posterior as it was trained (and their plain average): that is
    how it is used, and it scored better so than on the posteriors under the target prior. The plug-in
    rows take the posteriors under the target prior, which the rule's derivation assumes; AR-GSE's
    mixture takes them under the prior its gate and rule were fitted for (``model_prior``)."""
    probs, own = experts.probs, experts.own_probs
    val_bal = {name: balanced_accuracy(probs["val"][:, e], experts.labels["val"]) for e, name in enumerate(experts.names)}
    best = max(val_bal, key=val_bal.get)
    best_index = experts.names.index(best)
    splits = ("tunev", "val", "test")
    methods = [Method(f"chow[{name}]", "chow", {s: own[s][:, e] for s in splits})
               for e, name in enumerate(experts.names)]
    methods.append(Method("chow[uniform-ensemble]", "chow", {s: own[s].mean(dim=1) for s in splits}))
    uniform = {s: probs[s].mean(dim=1) for s in splits}
    for obj in ("balanced", "worst"):
        methods.append(Method(f"plugin-{obj}[{best}]", "plugin", {s: probs[s][:, best_index] for s in splits}, obj))
        methods.append(Method(f"plugin-{obj}[uniform-ensemble]", "plugin", uniform, obj))
    model_probs = experts.under(model_prior)
    mixed = {s: gated_mixture(gate, model_probs[s]) for s in splits}
    single_cost = rule if rule.thresholds is None else None
    for obj in ("balanced", "worst"):
        methods.append(Method(f"ar-gse[{obj}]", "plugin", mixed, obj, single_cost if obj == objective else None))
    if rule.thresholds is not None:
        methods.append(Method(f"ar-gse[{objective},per-group]", "plugin", mixed, objective, rule))
    # The model's own method is the reference for Chow's operating points: put it first among ar-gse.
    own = next(m for m in methods if m.rule is rule) if rule.thresholds is not None else \
        next(m for m in methods if m.name == f"ar-gse[{objective}]")
    methods.remove(own)
    methods.insert(next(i for i, m in enumerate(methods) if m.name.startswith("ar-gse")), own)
    return methods


def check_model(run_id: str, images: np.ndarray, expected) -> float:
    """Share of sampled images on which the logged pyfunc's prediction equals the logits' one; the model
    of fit run ``run_id``, its files checked first."""
    model = mlflow.pyfunc.load_model(str(tracking.download(run_id, MODEL)))
    served = model.predict(images)
    return float((served["prediction"].to_numpy() == expected["prediction"].to_numpy()).mean())


def upstream(cfg: EvaluateConfig, experiment: str | None) -> dict[str, str]:
    """The runs an evaluation of ``cfg`` reads, as its run records them: the fit behind the model, its
    gating run, its experts and their splits."""
    argse_run, _ = resolve_model(cfg, experiment)
    gating_run, ids = resolve_gating_for(argse_run, cfg, experiment)
    return EVALUATE_STAGE.upstream(argse=argse_run.info.run_id, gating=gating_run.info.run_id,
                                   experts=join_expert_runs(ids), splits=splits_of(ids))


def run(cfg: EvaluateConfig, *, experiment: str | None = None) -> str | None:
    """Run the stage; return the run id (``None`` for a dry run)."""
    if cfg.dry_run:
        argse_run, uri = resolve_model(cfg, experiment)
        click.echo(cfg.dry_run_header("evaluate"))
        click.echo(f"  model: {uri} (argse run {argse_run.info.run_id}); split {cfg.split}, prior {cfg.test_prior}")
        return None

    with tracking.stage_run("evaluate", cfg.dataset, cfg.params(), experiment=experiment, run_name="evaluate") as active:
        argse_run, uri = resolve_model(cfg, experiment)
        gating_run, ids = resolve_gating_for(argse_run, cfg, experiment)
        experts = load_experts(ids, cfg.test_prior)
        tracking.set_upstream("evaluate", cfg.params(), upstream(cfg, experiment))
        mlflow.set_tag(TAG_MODEL_URI, uri)
        tracking.log_split_inputs(experts.splits, ("tunev", "val", cfg.split))
        gate = load_gate(gating_run.info.run_id)
        rule = PluginRule.from_dict(json.loads(tracking.download(argse_run.info.run_id, RULE).read_text()))
        fitted = ArgseConfig(dataset=cfg.dataset).restore(argse_run.data.params)  # the fit's own options
        objective, model_prior = fitted.objective, fitted.test_prior

        if cfg.check_images:
            images = split_pixels(experts.splits, cfg.source(), cfg.split, cfg.check_images, cfg.preset.image_shape)
            if images.shape[-1] == 1:
                images = images[..., 0]
            expected = predict_frame(rule, gated_mixture(gate, experts.under(model_prior)[cfg.split][: len(images)]))
            agreement = check_model(argse_run.info.run_id, images, expected)
            mlflow.log_metric("model_check_agreement", agreement)
            if agreement < 0.99:
                raise ArgseError(f"the model at {uri} agrees with its logged logits on only {agreement:.1%} "
                                 f"of {len(images)} {cfg.split} images; it does not belong to these runs")

        splits = experts.splits
        weights = {s: experts.weights(s, cfg.test_prior) for s in ("tunev", "val", "test")}
        fit_options = FitOptions(rounds=fitted.rounds, step=fitted.step, n_starts=fitted.n_starts)
        comparison = compare(
            build_methods(experts, gate, rule, objective, model_prior), experts.labels, weights, splits.class_to_group,
            split=cfg.split, cost=rule.cost, coverages=cfg.coverages(), n_boot=cfg.n_boot, seed=cfg.seed,
            group_names=splits.group_names, fit_options=fit_options,
        )
        log_comparison(comparison, cfg, splits.group_names)
        click.echo(f"evaluate run {active.info.run_id}: {cfg.split} split, {cfg.test_prior} prior, cost {fmt_number(rule.cost)}")
        click.echo(summary_markdown(comparison.table))
        return active.info.run_id


def summary_markdown(table) -> str:
    """The printed summary: the main columns of the results table, best method first."""
    columns = [c for c in SUMMARY_COLUMNS if c in table.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join([":---"] + ["---:"] * (len(columns) - 1)) + "|"]
    for _, row in table[columns].iterrows():  # a loop over methods
        cells = [str(row[c]) if c == "method" else
                 str(int(row[c])) if c.endswith("_points") else f"{float(row[c]):.4f}" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resolve_gating_for(argse_run, cfg: EvaluateConfig, experiment: str | None):
    """The gating run the fit ``argse_run`` read, and its experts."""
    gating_ref = argse_run.data.tags.get(stage_registry.TAG_UPSTREAM + "gating")
    if not gating_ref:
        raise ArgseError(f"argse run {argse_run.info.run_id} records no gating run; refit it with `argse fit`")
    return resolve_gating(gating_ref, dataset=cfg.dataset, experiment=experiment)


def log_comparison(comparison: Comparison, cfg: EvaluateConfig, group_names) -> None:
    table = comparison.table
    mlflow.log_metrics(metric_dict(table[["method", *[c for c in METRIC_COLUMNS if c in table.columns]]]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / RESULTS_DIR
        write_results(comparison, folder)
        integrity.log_artifacts(folder, RESULTS_DIR)
        if cfg.save_results:
            out = Path(cfg.output_dir)
            write_results(comparison, out)
            click.echo(f"results written to {out.resolve()}")
    order = list(comparison.table["method"])  # best first
    points = comparison.coverage_points
    for risk, label in (("balanced", "balanced error"), ("worst", "worst-group error")):
        curves = {name: (points.loc[points["method"] == name, "coverage"].to_numpy(),
                         points.loc[points["method"] == name, f"{risk}_error"].to_numpy()) for name in order}
        thin = {name: points.loc[points["method"] == name, "thin_group"].to_numpy(dtype=bool) for name in order}
        fig = figures.risk_coverage_curves(curves, label, f"{cfg.dataset} {cfg.split}: {label} at matched coverage",
                                           thin, f"a group with < {MIN_GROUP_ACCEPTED} accepted images")
        mlflow.log_figure(fig, f"figures/rc_{risk}.png")
        figures.close(fig)
    fig = figures.bars_by_group({name: comparison.group_coverage[name] for name in order}, group_names,
                                "coverage", f"coverage per group at the operating point ({cfg.split})")
    mlflow.log_figure(fig, "figures/group_coverage.png")
    figures.close(fig)


def write_results(comparison: Comparison, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    comparison.table.to_csv(folder / RESULTS_TABLE, index=False)
    (folder / "table.md").write_text(comparison.to_markdown([c for c in HEADLINE_COLUMNS if c in comparison.table.columns])
                                     + "\n(results/table.csv has every column)\n")
    comparison.coverage_points.to_csv(folder / COVERAGE_POINTS, index=False)
    comparison.group_points.to_csv(folder / "coverage_points_by_group.csv", index=False)
