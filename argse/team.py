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

``argse team grant USER ROLE --dataset D`` (as an admin) creates the names the role needs (refusing
a name someone else took first) and grants them through a server role only an admin can make;
``argse team promote RUN`` (as a maintainer) refits a teammate's fit run in the shared experiment,
checks that the candidate's model is what the refit builds, and registers the refit's model as a
version of the shared model, whose champion then follows the champion criterion.
"""

from __future__ import annotations

import os
import re
import warnings

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


#: A permission given straight to a user (by creating the resource, or by a grant of a user who
#: manages it) sits in MLflow's per-user role; the roles `argse team grant` makes are the admin's.
_DIRECT_ROLE = re.compile(r"^__user_\d+__$")
HOLDS = ("EDIT", "MANAGE")  # what holding a name means: more than the READ everyone has


def role_name(role: str, dataset: str, user: str) -> str:
    """The server role a grant assigns (made by the admin, so only an admin can join it): one per
    dataset for its maintainers, one per teammate and dataset."""
    return f"argse/{dataset}/maintainer" if role == "maintainer" else f"argse/{dataset}/teammate/{user}"


def _users(tracking_uri: str) -> list[dict]:
    """Every user of the server with the roles they hold and each role's permissions (as an admin)."""
    from mlflow.server.auth.routes import LIST_USERS
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    response = http_request(get_default_host_creds(tracking_uri), LIST_USERS, "GET")
    return verify_rest_response(response, LIST_USERS).json()["users"]


def _direct(users: list[dict], kind: str, target: str) -> list[tuple[str, str]]:
    """(user, permission) for each non-admin user given more than READ on one resource directly."""
    found = []
    for user in users:
        if user.get("is_admin"):
            continue
        for role in user.get("roles", []):
            for p in role.get("permissions", []) if _DIRECT_ROLE.match(role.get("name", "")) else ():
                if p["resource_type"] == kind and p["resource_pattern"] == target and p["permission"] in HOLDS:
                    found.append((user["username"], p["permission"]))
    return found


def _check_free(users: list[dict], kind: str, target: str | None, shown: str, grantee: str) -> None:
    """Refuse a name someone other than ``grantee`` holds without a grant: a squatter, in one line."""
    if target is None:
        return
    for holder, permission in _direct(users, kind, target):
        if holder != grantee:
            raise ArgseError(
                f"{shown} exists and user '{holder}' holds {permission} on it, given directly (they created it, or "
                f"someone granted it by hand), not by `argse team grant`: nothing was granted; free the name (rename "
                f"or delete it as admin), or, if '{holder}' should hold it, grant them this role first")


def _role(auth, name: str, resources: list[tuple[str, str]]):
    """The admin's role ``name`` in the default workspace, with MANAGE on each (kind, target)."""
    from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME

    role = next((r for r in auth.list_roles(DEFAULT_WORKSPACE_NAME) if r.name == name), None)
    if role is None:
        role = auth.create_role(DEFAULT_WORKSPACE_NAME, name, description="made by argse team grant")
    have = {(p.resource_type, p.resource_pattern) for p in auth.list_role_permissions(role.id)}
    for kind, target in resources:
        if (kind, target) not in have:
            auth.add_role_permission(role.id, kind, target, "MANAGE")
    return role


def grant(user: str, role: str, dataset: str) -> list[str]:
    """Give ``user`` ``role`` on ``dataset`` (run as an admin of the server); what was granted.

    The names the role needs are created here, by the admin, when they do not exist; a name that
    exists and is held by another user who was not given it by a grant (who created it first: a
    squatter) is refused in one line naming them, before anything is granted. The permissions come
    from a server role only an admin can make and join (:func:`role_name`); a permission the user
    held directly on these names is replaced by it."""
    if role not in ROLES:
        raise ArgseError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mlflow.server import get_app_client

    # MLflow's auth app imports a Starlette module that warns about its own deprecation: not the user's.
    warnings.filterwarnings("ignore", message=r"starlette\.middleware\.wsgi is deprecated")

    uri = mlflow.get_tracking_uri()
    client = MlflowClient()
    auth = get_app_client("basic-auth", tracking_uri=uri)
    if role == "maintainer":
        experiment, model = shared_experiment(dataset), shared_model(dataset)
    else:
        experiment, model = own_experiment(dataset, user), own_model(dataset, user)
    users = _users(uri)
    if user not in {u["username"] for u in users}:
        raise ArgseError(f"there is no user {user!r} on {uri}: create it first (docs/team-server.md)")

    def existing() -> tuple[str | None, str | None]:
        found = client.get_experiment_by_name(experiment)
        try:
            client.get_registered_model(model)
            named = model
        except MlflowException:
            named = None
        return (found.experiment_id if found is not None else None), named

    experiment_id, model_name = existing()
    _check_free(users, "experiment", experiment_id, f"experiment {experiment}", user)
    _check_free(users, "registered_model", model_name, f"registered model {model}", user)
    try:
        experiment_id = experiment_id or client.create_experiment(experiment)
        if model_name is None:
            client.create_registered_model(model)
    except MlflowException:  # created by someone else since the check: look again
        users = _users(uri)
        experiment_id, model_name = existing()
        _check_free(users, "experiment", experiment_id, f"experiment {experiment}", user)
        _check_free(users, "registered_model", model_name, f"registered model {model}", user)
        raise
    resources = [("experiment", experiment_id), ("registered_model", model)]
    granted = _role(auth, role_name(role, dataset, user), resources)
    if granted.name not in {r.name for r in auth.list_user_roles(user)}:
        auth.assign_role(user, granted.id)
    for kind, target in resources:  # a direct permission of the user's own (it created the name first)
        if (user, "MANAGE") in _direct(users, kind, target) or (user, "EDIT") in _direct(users, kind, target):
            auth.revoke_user_permission(user, kind, target)
    return [f"MANAGE on experiment {experiment}", f"MANAGE on registered model {model}"]


def promote(ref: str) -> str:
    """Promote a teammate's fit run: refit its gate with its options in the dataset's shared
    experiment, as this maintainer (:class:`argse.stages.argse.Candidate`): the candidate's model must
    be, file for file, what the refit builds from the files its upstream runs logged, its criterion
    what the refit computes, and its experts must give, from the val images, the logits their runs
    logged. The refit's model (the maintainer's run, which no teammate can write) is registered in
    the shared model and competes for champion with its like. The decision, one line."""
    from argse import tracking
    from argse.presets import apply_compute_policy
    from argse.stages import argse as fit_stage

    run_id = tracking.run_id_of(ref)
    candidate = fit_stage.Candidate(run_id)
    dataset = candidate.run.data.tags[tracking.TAG_DATASET]
    cfg = candidate.config(shared_model(dataset))  # a built-in preset, or the folder the candidate ran on
    apply_compute_policy(cfg.preset)
    refit = fit_stage.run(cfg, experiment=shared_experiment(dataset), candidate=candidate)
    from mlflow.tracking import MlflowClient

    tags = MlflowClient().get_run(refit).data.tags
    name, _, number = tags[stage_registry.TAG_REGISTERED_MODEL].rpartition("/")
    return (f"promoted run {run_id} as {name} v{number} (refit run {refit} in {shared_experiment(dataset)}); "
            + tags[stage_registry.TAG_CHAMPION_DECISION])


@click.group("team")
def team_cli():
    """A team on one tracking server: grant roles (admin), promote a teammate's candidate (maintainer)."""


@team_cli.command("grant")
@click.argument("user")
@click.argument("role", type=click.Choice(ROLES))
@click.option("--dataset", required=True, help=f"A preset ({', '.join(DATASETS)}) or the name a folder of images runs under.")
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
