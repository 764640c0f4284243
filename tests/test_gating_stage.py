"""The gating stage on digits-lt: metrics, figure and gate artifact, lineage, and its failures."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from argse.artifacts import load_gate


def _history(run_id, key):
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def test_pretrain_run_logs_per_epoch_metrics_figure_and_gate(chain_store):
    _, ids = chain_store
    run = MlflowClient().get_run(ids["pretrain"])
    assert run.info.status == "FINISHED" and run.data.tags["argse.gating_mode"] == "pretrain"
    assert run.data.tags["argse.upstream.experts"] == ",".join(ids[n] for n in ("ce", "logitadjust", "balsoftmax"))
    for key in ("loss", "val_mixture_nll", "val_balanced_acc", "weight_ce", "weight_balsoftmax_tail"):
        assert len(_history(ids["pretrain"], key)) >= 2, key
    artifacts = {a.path for a in MlflowClient().list_artifacts(ids["pretrain"])}
    assert {"gating", "gate_weights_by_group.png"} <= artifacts
    gate = load_gate(ids["pretrain"])
    assert gate.num_experts == 3


def test_the_logged_val_nll_of_the_gate_is_its_mixture_nll_recomputed_from_the_logged_logits(chain_store):
    """The pretrain run's final val class-balanced mixture NLL, recomputed by hand: the gate the run
    logged, applied to the experts' logged val posteriors, mean -log p_y within each class, then the
    mean over classes; and the uniform average's, the same way."""
    import math

    import torch

    from argse.models.gating import gated_mixture
    from argse.artifacts import load_experts

    _, ids = chain_store
    metrics = MlflowClient().get_run(ids["pretrain"]).data.metrics
    experts = load_experts({n: ids[n] for n in ("ce", "logitadjust", "balsoftmax")})
    probs, y = experts.probs["val"], experts.labels["val"]

    def balanced_nll(mixture):
        per_class = []
        for c in sorted(set(y.tolist())):
            rows = (y == c).nonzero().flatten().tolist()
            per_class.append(sum(-math.log(max(float(mixture[i, c]), 1e-12)) for i in rows) / len(rows))
        return sum(per_class) / len(per_class)

    with torch.no_grad():
        gated = gated_mixture(load_gate(ids["pretrain"]), probs)
    assert metrics["final_val_mixture_nll"] == pytest.approx(balanced_nll(gated), abs=1e-4)
    assert metrics["uniform_val_mixture_nll"] == pytest.approx(balanced_nll(probs.mean(dim=1)), abs=1e-4)


def test_selective_run_records_its_inputs_and_does_not_worsen_pretrain(chain_store):
    _, ids = chain_store
    run = MlflowClient().get_run(ids["selective"])
    assert run.info.status == "FINISHED" and run.data.tags["argse.gating_mode"] == "selective"
    assert run.data.tags["argse.upstream.pretrain"] == ids["pretrain"]
    assert run.data.tags["argse.upstream.experts"].split(",") == [ids[n] for n in ("ce", "logitadjust", "balsoftmax")]
    # Round 0 is the better of the pretrain gate and the uniform mixture; the kept round is never
    # worse on val by the coverage-matched AURC, and the gate returned is that round's or the uniform one.
    areas = _history(ids["selective"], "val_worst_aurc")
    worst = _history(ids["selective"], "val_worst_error")
    best = int(run.data.metrics["final_best_round"])
    assert len(areas) == 3 and areas[best] == min(areas)
    assert areas[0] <= _history(ids["selective"], "val_worst_aurc_given")[0]
    if run.data.metrics["final_kept_uniform"] == 0.0:
        assert run.data.metrics["final_val_worst_error"] == worst[best]
        assert run.data.metrics["final_gate_minus_uniform_val_aurc_hi"] < 0
    assert "gating/rule.json" in {a.path for a in MlflowClient().list_artifacts(ids["selective"], "gating")}


def _failed_gating_runs():
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(exps, "tags.\"argse.stage\" = 'gating'") if r.info.status == "FAILED"]


def test_no_expert_runs_is_one_line(store, cli):
    result = cli("gating", "--dataset", "digits-lt", "--mode", "pretrain")
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1
    assert "no FINISHED experts run" in result.err
    assert len(_failed_gating_runs()) == 1


def test_expert_runs_from_different_splits_runs_are_refused(chain_store, cli):
    _, ids = chain_store
    client = MlflowClient()
    source = client.get_run(ids["balsoftmax"])
    other = client.create_run(source.info.experiment_id, tags={**{k: v for k, v in source.data.tags.items()
                                                                  if k.startswith("argse.")},
                                                               "argse.upstream.splits": "f" * 32})
    client.set_terminated(other.info.run_id, "FINISHED")
    result = cli("gating", "--dataset", "digits-lt", "--mode", "pretrain",
                 "--experts-run", f"{ids['ce']},{ids['logitadjust']},{other.info.run_id}")
    assert result.code == 1 and "different splits runs" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert len(_failed_gating_runs()) == 1


def test_selective_without_a_pretrain_run_is_one_line(experts_store, cli):
    result = cli("gating", "--dataset", "digits-lt", "--mode", "selective")
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1
    assert "no FINISHED pretrain gating run" in result.err and "--mode pretrain" in result.err
    assert len(_failed_gating_runs()) == 1


def test_mode_is_required(store, cli):
    result = cli("gating", "--dataset", "digits-lt")
    assert result.code == 2 and "--mode" in result.err and len(result.err.strip().splitlines()) == 1


def test_gating_dry_run_creates_no_run(chain_store, cli):
    before = len(mlflow.search_runs(search_all_experiments=True))
    result = cli("gating", "--dataset", "digits-lt", "--mode", "selective", "--dry-run")
    assert result.code == 0 and chain_store[1]["pretrain"] in result.out
    assert len(mlflow.search_runs(search_all_experiments=True)) == before
