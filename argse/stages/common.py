"""What the later stages share: finding the three expert runs and reading their logged posteriors.

Gating, argse and evaluate never recompute a backbone: they read each expert run's
``logits/{tunev,val,test}.npz`` (calibrated) and the splits run those experts were trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from argse import ArgseError, stage_registry, tracking
from argse import EXPERTS
from argse.config import ExpertsConfig
from argse.data.splits import EVAL_SPLITS, Splits
from argse.stage_registry import expert_runs_of_parent, join_expert_runs
from argse.stages.splits import load_splits
from argse.training.losses import posterior_shift


@dataclass
class ExpertSet:
    """The three expert runs of one splits run, with their posteriors on every evaluation split."""

    run_ids: dict[str, str]  # expert name -> run id, in EXPERTS order
    splits_run_id: str
    splits: Splits
    probs: dict[str, torch.Tensor]  # split -> [N, E, C] calibrated posteriors under `prior`
    labels: dict[str, torch.Tensor]  # split -> [N]
    prior: str  # the target label prior the posteriors are for (lt, balanced)
    shifts: torch.Tensor  # [E, C] added to each expert's calibrated logits before the softmax
    logits: dict[str, torch.Tensor]  # split -> [N, E, C] calibrated logits, as each expert logged them

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.run_ids)

    @property
    def ids_tag(self) -> str:
        """The value of ``argse.upstream.experts``: run ids in EXPERTS order, comma-separated."""
        return join_expert_runs(self.run_ids)

    def weights(self, split: str, prior: str) -> torch.Tensor:
        return torch.as_tensor(self.splits.weights(split, prior), dtype=torch.float64)

    @property
    def own_probs(self) -> dict[str, torch.Tensor]:
        """Each expert's posterior as it was trained (no shift): what Chow's rule takes."""
        return {split: torch.softmax(z, dim=2) for split, z in self.logits.items()}

    def under(self, prior: str) -> dict[str, torch.Tensor]:
        """The posteriors [N, E, C] per split under another target prior (`probs` when it is this one)."""
        if prior == self.prior:
            return self.probs
        shifts = expert_shifts(self.run_ids, self.splits, prior)
        return {split: torch.softmax(z + shifts[None], dim=2) for split, z in self.logits.items()}


def _experts_of_parent(run: Run) -> dict[str, str]:
    ids = expert_runs_of_parent(run.data.tags)
    missing = [name for name, run_id in ids.items() if not run_id]
    if missing:
        raise ArgseError(f"experts run {run.info.run_id} has no {', '.join(missing)} expert: pass the expert runs' ids")
    return ids


def resolve_experts(ref: str, *, dataset: str, experiment: str | None = None) -> dict[str, str]:
    """``{expert: run_id}`` for ``ref``: ``latest`` (the newest FINISHED expert of each kind trained on
    the same splits run as the newest FINISHED expert), the id of an ``--expert all`` parent run, or
    three expert run ids separated by commas. All three must come from one splits run."""
    client = MlflowClient()
    if ref in ("", "latest"):
        newest = tracking.search_finished("experts", dataset, experiment=experiment, max_results=50)
        newest = [r for r in newest if r.data.tags.get(stage_registry.TAG_EXPERT) in EXPERTS]
        if not newest:
            raise ArgseError(f"no FINISHED experts run for {dataset}: run `argse experts --dataset {dataset}` first")
        splits_id = newest[0].data.tags[stage_registry.TAG_UPSTREAM + "splits"]
        ids = {}
        for name in EXPERTS:
            run = tracking.search_finished(
                "experts", dataset, {stage_registry.TAG_EXPERT: name, stage_registry.TAG_UPSTREAM + "splits": splits_id},
                experiment=experiment)
            if not run:
                raise ArgseError(
                    f"no FINISHED {name} expert for splits run {splits_id}: run "
                    f"`argse experts --dataset {dataset} --expert {name} --splits-run {splits_id}`")
            ids[name] = run[0].info.run_id
        return ids
    refs = [r.strip() for r in ref.split(",") if r.strip()]
    if len(refs) == 1:
        run = tracking.resolve_upstream("experts", refs[0], dataset=dataset, experiment=experiment)
        if run.data.tags.get(stage_registry.TAG_EXPERT) != "all":
            raise ArgseError(
                f"run {run.info.run_id} is the {run.data.tags.get(stage_registry.TAG_EXPERT)} expert alone: pass an "
                "`--expert all` run or the three expert run ids separated by commas")
        ids = _experts_of_parent(run)
    else:
        ids = {}
        for one in refs:
            run = tracking.resolve_upstream("experts", one, dataset=dataset, experiment=experiment)
            ids[run.data.tags.get(stage_registry.TAG_EXPERT)] = run.info.run_id
        if sorted(ids) != sorted(EXPERTS) or len(refs) != len(EXPERTS):
            raise ArgseError(f"--experts-run needs one run of each of {', '.join(EXPERTS)}; got {', '.join(ids)}")
        ids = {name: ids[name] for name in EXPERTS}
    splits_ids = {client.get_run(i).data.tags.get(stage_registry.TAG_UPSTREAM + "splits") for i in ids.values()}
    if len(splits_ids) != 1:
        raise ArgseError(
            f"the expert runs come from different splits runs ({', '.join(sorted(map(str, splits_ids)))}): "
            "pass experts trained on one splits run")
    for run_id in ids.values():
        run = client.get_run(run_id)
        if run.info.status != "FINISHED":
            raise ArgseError(f"expert run {run_id} is {run.info.status}, not FINISHED: finish it with `argse experts --resume {run_id}`")
    return ids


def splits_of(run_ids: dict[str, str]) -> str:
    """The splits run the experts ``run_ids`` were trained on (:func:`resolve_experts` checks they share one)."""
    return MlflowClient().get_run(next(iter(run_ids.values()))).data.tags[stage_registry.TAG_UPSTREAM + "splits"]


def expert_shifts(run_ids: dict[str, str], splits: Splits, prior: str) -> torch.Tensor:
    """[E, C]: each expert's `posterior_shift` to the target ``prior``, from its loss and its run's la_tau."""
    client = MlflowClient()
    rows = []
    for name, run_id in run_ids.items():
        la_tau = ExpertsConfig().restore(client.get_run(run_id).data.params).la_tau
        rows.append(posterior_shift(name, splits.train_counts, splits.prior(prior), la_tau))
    return torch.stack(rows)


def load_experts(run_ids: dict[str, str], prior: str = "lt") -> ExpertSet:
    """Read the experts' calibrated logits on tunev / val / test and their splits run; the posteriors
    are each expert's under the target ``prior`` (`posterior_shift`), so that they estimate one quantity."""
    from argse.stages.experts import load_expert_logits

    splits_run_id = splits_of(run_ids)
    splits = load_splits(splits_run_id)
    shifts = expert_shifts(run_ids, splits, prior)
    probs, logits, labels = {}, {}, {}
    for split in EVAL_SPLITS:
        per_expert = []
        for name, run_id in run_ids.items():
            data = load_expert_logits(run_id, split)
            if not np.array_equal(data["indices"], splits.indices[split]):
                raise ArgseError(f"the {name} expert's {split} logits do not match splits run {splits_run_id}; retrain it")
            per_expert.append(torch.from_numpy(data["logits"]).double())
        logits[split] = torch.stack(per_expert, dim=1)
        probs[split] = torch.softmax(logits[split] + shifts[None], dim=2)
        labels[split] = torch.as_tensor(splits.labels[split], dtype=torch.long)
    return ExpertSet(dict(run_ids), splits_run_id, splits, probs, labels, prior, shifts, logits)
