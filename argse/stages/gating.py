"""The gating stage: a per-sample mixture of the three calibrated experts.

``--mode pretrain`` trains the gate on ``tunev`` with a class-balanced mixture NLL (plus a small
load-balancing term), early-stopped on ``val``. ``--mode selective`` starts from a pretrain run and
alternates fitting the plug-in rule on the current mixture with training the gate on a smooth
surrogate of the cost-sensitive L2R risk, keeping the best round on ``val``.

Reads the expert runs' logged logits (never the backbones); logs per-epoch (per-round) metrics, the
gate (``gating/gate.pt`` with its feature statistics, ``gating/config.json``) and a figure of the
mean gate weight per expert and group.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import mlflow
import torch

from argse import ArgseError, figures, fmt_number, stage_registry, tracking
from argse.artifacts import ExpertSet, load_experts, load_gate, resolve_experts, splits_of
from argse.config import GatingConfig
from argse.tracking import integrity
from argse.models.gating import GatingNet, gate_weights, gated_mixture, mixture_metrics
from argse.stage_registry import GATE, GATE_META, GATE_RULE, GATING_STAGE, TAG_GATING_MODE, join_expert_runs, split_expert_runs
from argse.training.gating import train_pretrain, train_selective


def weight_metrics(gate: GatingNet, experts: ExpertSet, split: str = "val") -> dict[str, float]:
    """Mean gate weight per expert, overall and within each group (by true class)."""
    weights = gate_weights(gate, experts.probs[split].float())
    groups = torch.as_tensor(experts.splits.class_to_group)[experts.labels[split]]
    out = {}
    for e, name in enumerate(experts.names):
        out[f"weight_{name}"] = float(weights[:, e].mean())
        for k, group in enumerate(experts.splits.group_names):
            mask = groups == k
            out[f"weight_{name}_{group}"] = float(weights[mask, e].mean()) if mask.any() else float("nan")
    return out


def log_gate(gate: GatingNet, experts: ExpertSet, extra: dict | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / GATE).parent.mkdir(parents=True)
        torch.save({"state_dict": gate.state_dict(), "config": gate.config()}, Path(tmp) / GATE)
        meta = {"gate": gate.config(), "experts": experts.run_ids, "splits_run": experts.splits_run_id, **(extra or {})}
        (Path(tmp) / GATE_META).write_text(json.dumps(meta, indent=1))
        integrity.log_artifacts(tmp)
    metrics = weight_metrics(gate, experts)
    group_names = experts.splits.group_names
    values = {name: [metrics[f"weight_{name}_{g}"] for g in group_names] for name in experts.names}
    fig = figures.bars_by_group(values, group_names, "mean gate weight (val)", "gate weight per expert and group")
    mlflow.log_figure(fig, "gate_weights_by_group.png")
    figures.close(fig)


def upstream(cfg: GatingConfig, experiment: str | None) -> dict[str, str]:
    """The runs a gating run of ``cfg`` reads, as its run records them: the experts, their splits and,
    in selective mode, the pretrain run."""
    ids = resolve_experts(cfg.experts_run, dataset=cfg.dataset, experiment=experiment)
    inputs = {"experts": join_expert_runs(ids), "splits": splits_of(ids)}
    if cfg.mode == "selective":
        inputs["pretrain"] = _resolve_pretrain(cfg, inputs["experts"], experiment).info.run_id
    return GATING_STAGE.upstream(cfg.mode, **inputs)


def run(cfg: GatingConfig, *, experiment: str | None = None) -> str | None:
    """Run the stage; return the run id (``None`` for a dry run)."""
    if cfg.dry_run:
        ids = resolve_experts(cfg.experts_run, dataset=cfg.dataset, experiment=experiment)
        click.echo(cfg.dry_run_header(f"gating --mode {cfg.mode}"))
        click.echo("  experts: " + ", ".join(f"{n} {i}" for n, i in ids.items()))
        if cfg.mode == "selective":
            pre = _resolve_pretrain(cfg, ",".join(ids.values()), experiment)
            click.echo(f"  pretrain run: {pre.info.run_id}")
        return None

    with tracking.stage_run("gating", cfg.dataset, cfg.params(), experiment=experiment,
                            run_name=f"gating-{cfg.mode}", tags={TAG_GATING_MODE: cfg.mode}) as active:
        inputs = upstream(cfg, experiment)
        experts = load_experts(split_expert_runs(inputs["experts_run"]), cfg.test_prior)
        tracking.set_upstream("gating", cfg.params(), inputs)
        tracking.log_split_inputs(experts.splits, ("tunev", "val"))
        if cfg.mode == "pretrain":
            summary = _pretrain(cfg, experts)
        else:
            summary = _selective(cfg, experts, inputs["pretrain_run"])
        click.echo(f"gating run {active.info.run_id} ({cfg.mode}): " + ", ".join(
            f"{k} {int(v) if k.startswith('best_') else fmt_number(v)}" for k, v in summary.items()))
        return active.info.run_id


def _resolve_pretrain(cfg: GatingConfig, experts_tag: str, experiment: str | None):
    lineage = {TAG_GATING_MODE: "pretrain", stage_registry.TAG_UPSTREAM + "experts": experts_tag}
    try:
        return tracking.resolve_upstream("gating", cfg.pretrain_run, dataset=cfg.dataset, lineage=lineage,
                                         experiment=experiment)
    except ArgseError as exc:
        if cfg.pretrain_run in ("", "latest"):
            raise ArgseError(
                f"no FINISHED pretrain gating run for these experts: run `argse gating --mode pretrain "
                f"--dataset {cfg.dataset} --experts-run {experts_tag}` first") from None
        raise exc


def _mixture_metrics(gate: GatingNet, experts: ExpertSet) -> dict[str, float]:
    return mixture_metrics(gated_mixture(gate, experts.probs["val"]), experts.labels["val"])


def _pretrain(cfg: GatingConfig, experts: ExpertSet) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    gate = GatingNet(len(experts.names))
    uniform = experts.probs["val"].mean(dim=1)
    mlflow.log_metrics(mixture_metrics(uniform, experts.labels["val"], prefix="uniform_val_"))

    def on_epoch(epoch: int, metrics: dict) -> None:
        flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        flat.update(weight_metrics(gate, experts))
        mlflow.log_metrics(flat, step=epoch)

    result = train_pretrain(
        gate, experts.probs["tunev"].float(), experts.labels["tunev"], experts.probs["val"].float(),
        experts.labels["val"], num_classes=experts.splits.num_classes, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, load_balance=cfg.load_balance,
        patience=cfg.patience, seed=cfg.seed, on_epoch=on_epoch,
    )
    final = _mixture_metrics(gate, experts)
    mlflow.log_metrics({"best_epoch": float(result.best_epoch), **{f"final_{k}": v for k, v in final.items()}})
    log_gate(gate, experts, {"mode": "pretrain", "best_epoch": result.best_epoch})
    return final


def _selective(cfg: GatingConfig, experts: ExpertSet, pretrain_run_id: str) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    gate = load_gate(pretrain_run_id).train()
    names = experts.splits.group_names

    def on_round(round_: int, metrics: dict) -> None:
        flat = {}
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                flat[key] = float(value)
            elif key in ("beta", "alpha", "mu"):
                flat.update({f"{key}_{names[k]}": float(v) for k, v in enumerate(value)})
        mlflow.log_metrics(flat, step=round_)

    result = train_selective(
        gate, experts.probs["tunev"].float(), experts.labels["tunev"], experts.probs["val"].float(),
        experts.labels["val"], experts.splits.class_to_group, cost=cfg.cost, objective=cfg.objective,
        rounds=cfg.rounds, epochs_per_round=cfg.epochs_per_round, batch_size=cfg.batch_size, lr=cfg.lr,
        weights_fit=experts.weights("tunev", cfg.test_prior), weights_val=experts.weights("val", cfg.test_prior),
        seed=cfg.seed, on_round=on_round,
        # Rounds are chosen by what evaluate ranks by; the uniform mixture competes as the start and
        # stays unless the gate beats it beyond val's noise (docs/stages.md, gating).
        select_by="aurc", uniform_start=True,
    )
    best = result.chosen
    final = {"best_round": float(result.best_round), "kept_uniform": float(result.kept_uniform),
             "val_balanced_error": float(best["val_balanced_error"]), "val_worst_error": float(best["val_worst_error"]),
             f"val_{cfg.objective}_aurc": float(best[f"val_{cfg.objective}_aurc"]), **_mixture_metrics(gate, experts)}
    if result.uniform_gap is not None:
        gap, lo, hi = result.uniform_gap
        final.update({"gate_minus_uniform_val_aurc": gap, "gate_minus_uniform_val_aurc_lo": lo,
                      "gate_minus_uniform_val_aurc_hi": hi})
    mlflow.log_metrics({f"final_{k}": v for k, v in final.items()})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / GATE_RULE).parent.mkdir(parents=True)
        (Path(tmp) / GATE_RULE).write_text(json.dumps(result.rule.to_dict()))
        integrity.log_artifacts(tmp)
    log_gate(gate, experts, {"mode": "selective", "best_round": result.best_round, "kept_uniform": result.kept_uniform,
                             "pretrain_run": pretrain_run_id})
    return final
