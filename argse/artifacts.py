"""What the stages logged, found and read back: the loaders of logged artifacts.

Every later stage reads its inputs through here, never from a fixed folder and never by recomputing
them: a splits run's ``splits/`` (:func:`load_splits`), an expert run's calibrated logits
(:func:`load_expert_logits`) and last checkpoint (:func:`load_checkpoint`), a gating run's gate
(:func:`load_gate`), and the three experts of one splits run with their posteriors on every
evaluation split (:func:`resolve_experts`, :func:`load_experts`). Each file is checked against the
digest its run recorded as it is downloaded (``argse.tracking.download``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from argse import EXPERTS, ArgseError, stage_registry, tracking
from argse.config import ExpertsConfig
from argse.data.splits import EVAL_SPLITS, Splits
from argse.models.gating import GatingNet
from argse.stage_registry import CHECKPOINT, GATE, SPLITS_DIR, TAG_GATING_MODE, logits_path
from argse.training.experts import CHECKPOINT_KEYS
from argse.training.losses import posterior_shift

# -- one artifact each -----------------------------------------------------------------------------


def load_splits(run_id: str) -> Splits:
    """The ``splits/`` artifact of a splits run."""
    return Splits.load(tracking.download(run_id, SPLITS_DIR))


def load_expert_logits(run_id: str, split: str) -> dict[str, np.ndarray]:
    """``logits``, ``labels`` and ``indices`` of an expert run's ``logits/<split>.npz``."""
    with np.load(tracking.download(run_id, logits_path(split))) as npz:
        return {key: npz[key] for key in ("logits", "labels", "indices")}


def load_checkpoint(run_id: str) -> dict | None:
    """An expert run's ``checkpoints/last.pt``, ``None`` when it has none; a corrupt file (unreadable,
    or not what the run logged) is an error that no resume can fix (:class:`tracking.RunBroken`: the run
    is then replaced, not resumed again)."""
    from argse.tracking.integrity import ArtifactChanged

    client = MlflowClient()
    if not any(a.path == CHECKPOINT for a in client.list_artifacts(run_id, CHECKPOINT.rpartition("/")[0])):
        return None
    try:
        path = tracking.download(run_id, CHECKPOINT)
    except ArtifactChanged as exc:
        raise tracking.RunBroken(f"the checkpoint of run {run_id} is corrupt ({str(exc).removeprefix(f'run {run_id}: ')}); "
                                 "a fresh run (without --resume) starts over") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        problem = f"missing {', '.join(missing)}" if missing else ""
    except Exception as exc:
        problem = type(exc).__name__
    if problem:
        raise tracking.RunBroken(f"the checkpoint of run {run_id} is corrupt ({problem}); a fresh run (without "
                                 "--resume) starts over")
    return state


def load_gate(run_id: str) -> GatingNet:
    """The gate logged by a gating run."""
    try:
        saved = torch.load(tracking.download(run_id, GATE), map_location="cpu", weights_only=True)
        gate = GatingNet.from_config(saved["config"])
        gate.load_state_dict(saved["state_dict"])
    except ArgseError:
        raise
    except Exception as exc:
        raise ArgseError(f"the gate of run {run_id} cannot be read ({type(exc).__name__}); rerun the gating stage") from None
    return gate.eval()


# -- the three experts of one splits run -----------------------------------------------------------


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
        return stage_registry.join_expert_runs(self.run_ids)

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
    ids = stage_registry.expert_runs_of_parent(run.data.tags)
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


def resolve_gating(ref: str, *, dataset: str, experiment: str | None = None) -> tuple[Run, dict[str, str]]:
    """The selective gating run ``ref`` names and the experts it read, ``{expert: run_id}``."""
    gating_run = tracking.resolve_upstream("gating", ref, dataset=dataset, experiment=experiment,
                                           lineage={TAG_GATING_MODE: "selective"})
    ids = stage_registry.split_expert_runs(gating_run.data.tags.get(stage_registry.TAG_UPSTREAM + "experts", ""))
    if ids is None:
        raise ArgseError(f"gating run {gating_run.info.run_id} records no expert runs; rerun the gating stage")
    return gating_run, ids


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
