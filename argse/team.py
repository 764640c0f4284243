"""A team on one tracking server with MLflow's basic authentication: roles and promotion.

MLflow grants READ, EDIT or MANAGE per experiment and per registered model, and a run's permissions
follow its experiment. With ``default_permission = READ`` every user reads everything and writes
nothing they were not given; the creator of an experiment or registered model manages it. Two roles:

* **maintainer** of a dataset: MANAGE on the shared experiment ``ar-gse/<dataset>`` and the shared
  registered model ``ar-gse-<dataset>``. Maintainers run the shared pipelines, and they alone move its
  ``champion`` (by fitting, or by promoting a teammate's candidate).
* **teammate** on a dataset: MANAGE on their own experiment ``ar-gse/<dataset>/<user>`` and their own
  registered model ``ar-gse-<dataset>-<user>``, where they train, fit and register candidates; READ on
  the rest.

``argse team grant USER ROLE --dataset D`` (as an admin) creates what the role needs and grants it;
``argse team promote RUN`` (as a maintainer) checks a teammate's fit run and registers its model as a
version of the shared model, whose champion then follows the champion criterion.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from argse import ArgseError, stage_registry
from argse.presets import DATASETS

ROLES = ("maintainer", "teammate")


def shared_experiment(dataset: str) -> str:
    return f"ar-gse/{dataset}"


def shared_model(dataset: str) -> str:
    return f"ar-gse-{dataset}"


def own_experiment(dataset: str, user: str) -> str:
    return f"ar-gse/{dataset}/{user}"


def own_model(dataset: str, user: str) -> str:
    return f"ar-gse-{dataset}-{user}"


def _ensure_experiment(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def _ensure_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)


def _grant(auth, kind: str, target: str, user: str, permission: str) -> None:
    """Give ``user`` ``permission`` on one experiment (its id) or registered model (its name); MLflow's
    auth client grants or replaces a user's permission on a resource in one call."""
    auth.grant_user_permission(user, kind, target, permission)


def grant(user: str, role: str, dataset: str) -> list[str]:
    """Give ``user`` ``role`` on ``dataset`` (run as an admin of the server); what was granted."""
    if role not in ROLES:
        raise ArgseError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    import mlflow
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    auth = get_app_client("basic-auth", tracking_uri=mlflow.get_tracking_uri())
    if role == "maintainer":
        experiment, model = shared_experiment(dataset), shared_model(dataset)
    else:
        experiment, model = own_experiment(dataset, user), own_model(dataset, user)
    experiment_id = _ensure_experiment(client, experiment)
    _ensure_model(client, model)
    _grant(auth, "experiment", experiment_id, user, "MANAGE")
    _grant(auth, "registered_model", model, user, "MANAGE")
    return [f"MANAGE on experiment {experiment}", f"MANAGE on registered model {model}"]


def _model_code_is_this_package(run_id: str) -> None:
    """The candidate's model carries this installation's argse code, byte for byte: a model logs its
    code with it, and serving it runs that code, so a candidate with any other code is refused."""
    from argse import tracking
    from argse.tracking.integrity import sha256

    model = tracking.download(run_id, stage_registry.MODEL)
    package = Path(__file__).resolve().parent
    logged = model / "code" / "argse"
    if not logged.is_dir():
        raise ArgseError(f"run {run_id}: its model carries no argse code; it was not logged by `argse fit`")
    ours = {p.relative_to(package).as_posix(): sha256(p) for p in package.rglob("*.py")}
    theirs = {p.relative_to(logged).as_posix(): sha256(p) for p in logged.rglob("*.py")}
    if ours != theirs:
        differ = sorted(set(ours) ^ set(theirs) | {k for k in set(ours) & set(theirs) if ours[k] != theirs[k]})
        raise ArgseError(f"run {run_id}: its model's code differs from this installation's argse "
                         f"({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}): install the same "
                         "version, or refit the candidate's gate here with `argse fit --gating-run ...`")
    if sha256(model / "served_model.py") != sha256(package / "served_model.py"):
        raise ArgseError(f"run {run_id}: its model's served_model.py differs from this installation's")


def _recomputed_criterion(run) -> float:
    """The champion criterion of a fit run, recomputed from what it read (the experts' logits and the
    gate, checked against their digests; no pickled object is loaded)."""
    import torch

    from argse import tracking
    from argse.config import ArgseConfig
    from argse.models.gating import gated_mixture
    from argse.selective.fit import FitOptions
    from argse.selective.matched import matched_aurc
    from argse.stages.argse import resolve_inputs
    from argse.stages.common import load_experts
    from argse.stages.gating import load_gate

    tags = run.data.tags
    cfg = ArgseConfig(dataset=tags[tracking.TAG_DATASET]).restore(run.data.params)
    gating_run, ids = resolve_inputs(
        ArgseConfig(dataset=cfg.dataset, gating_run=tags[stage_registry.TAG_UPSTREAM + "gating"]), None)
    experts = load_experts(ids, cfg.test_prior)
    gate = load_gate(gating_run.info.run_id)
    with torch.no_grad():
        eta = {s: gated_mixture(gate, experts.probs[s]) for s in ("tunev", "val")}
    weights = {s: experts.weights(s, cfg.test_prior) for s in ("tunev", "val")}
    return matched_aurc(eta, experts.labels, weights, experts.splits.class_to_group, cfg.objective, split="val",
                        fit_options=FitOptions(rounds=cfg.rounds, step=cfg.step, n_starts=cfg.n_starts),
                        judged=True)


def promote(ref: str) -> str:
    """Register the model of a teammate's fit run as a version of its dataset's shared model, after
    checking it (digests, code, criterion), and settle the champion; the decision."""
    from mlflow.tracking import MlflowClient

    from argse import tracking
    from argse.stages.argse import CHAMPION_PARAM, crown
    from argse.tracking.integrity import verify_run

    client = MlflowClient()
    run_id = tracking.run_id_of(ref)
    run = client.get_run(run_id)
    if run.data.tags.get(tracking.TAG_STAGE) != "argse" or run.info.status != "FINISHED":
        raise ArgseError(f"run {run_id} is not a FINISHED fit (argse) run: promote the run `argse fit` made")
    verify_run(run_id)
    _model_code_is_this_package(run_id)
    claimed = run.data.params.get(CHAMPION_PARAM)
    if claimed is None:
        raise ArgseError(f"run {run_id} has no champion criterion ({CHAMPION_PARAM}): refit it with this version")
    value = _recomputed_criterion(run)
    if abs(value - float(claimed)) > 1e-9:
        raise ArgseError(f"run {run_id}: its champion criterion {float(claimed):.6g} is not what its inputs give "
                         f"({value:.6g}); it is not promoted")
    name = shared_model(run.data.tags[tracking.TAG_DATASET])
    outputs = run.outputs.model_outputs if run.outputs else []
    if not outputs:
        raise ArgseError(f"run {run_id} logged no model: promote the run `argse fit` made")
    model_id = outputs[0].model_id
    version = client.create_model_version(name, f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                          tags={stage_registry.TAG_VERSION_RUN: run_id})
    # The decision goes on the version: the candidate's run is its author's, which a maintainer only reads.
    return f"promoted run {run_id} as {name} v{version.version}; " + crown(name, version, on_run=False)


@click.group("team")
def team_cli():
    """A team on one tracking server: grant roles (admin), promote a teammate's candidate (maintainer)."""


@team_cli.command("grant")
@click.argument("user")
@click.argument("role", type=click.Choice(ROLES))
@click.option("--dataset", required=True, type=click.Choice(DATASETS))
def grant_command(user, role, dataset):
    """Give USER a ROLE on --dataset (run as the server's admin)."""
    from argse import tracking

    tracking.configure(os.environ.get("MLFLOW_TRACKING_URI"))
    for line in grant(user, role, dataset):
        click.echo(f"{user}: {line}")


@team_cli.command("promote")
@click.argument("ref")
def promote_command(ref):
    """Register a teammate's fit run REF in its dataset's shared model (run as a maintainer)."""
    from argse import tracking

    tracking.configure(os.environ.get("MLFLOW_TRACKING_URI"))
    click.echo(promote(ref))
