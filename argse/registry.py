"""The registry side of a fit: a fit's model registered as a version, and the alias ``champion``.

Once the run is FINISHED, the alias ``champion`` is pointed at the best version by the champion
criterion, among the versions *comparable* with the champion whose run FINISHED, by a
compare-and-set loop that concurrent fits cannot defeat. The criterion is the model's coverage-matched
AURC of its objective's error on val (each group error judged by its bound), which no cost enters;
comparable means the same objective, the same target prior and the same splits by content (a digest
of the split indices, the source data and the groups, not the splits run's id). Both are recorded by
the fit run as write-once params; a version's tags never decide, and a tie keeps the current champion.
A version that is not comparable with the champion is registered and not crowned; the line says why
and that ``argse crown models:/<name>/<version>`` makes it champion (:func:`crown_by_hand`).
"""

from __future__ import annotations

import logging
import random
import time

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from argse import ArgseError, first_line
from argse.config import ArgseConfig
from argse.stage_registry import (
    TAG_CHAMPION_DECISION,
    TAG_REGISTERED_MODEL,
    TAG_VERSION_RISK,
    TAG_VERSION_RUN,
)
from argse.tracking.lookup import verify_run

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHAMPION_METRIC = "val_worst_l2r"  # the operating point's L2R risk on val, informative (it depends on the cost)
#: The champion criterion, a param of the fit run (write-once): the coverage-matched AURC of the model's
#: objective error on val, judged by the bound; the cost does not enter it.
CHAMPION_PARAM = "argse.champion_val_matched_aurc"
#: What the criterion may be compared with, a param of the fit run (write-once): its objective, its
#: target prior and the digest of the splits' content (:func:`argse.stages.argse.compared_on`).
COMPARED_PARAM = "argse.champion_compared_on"
TIE_DECIMALS = 9  # criteria equal to this many decimals tie: the current champion stays


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
    verify_run(_run_of(version))
    before = _champion(client, name)
    client.set_registered_model_alias(name, CHAMPION, version.version)
    was = f"v{before.version}" if before is not None else "unset"
    decision = (f"{name}@{CHAMPION} is v{version.version} by hand (it was {was}): from now on it is compared with "
                f"the versions of {compared_on_of(client, version) or 'nothing recorded'}")
    client.set_model_version_tag(name, version.version, TAG_CHAMPION_DECISION, decision)
    return decision


__all__ = ["CHAMPION", "CHAMPION_PARAM", "COMPARED_PARAM", "TIE_DECIMALS", "register", "crown", "best_version",
           "crown_by_hand", "standing", "criterion_of", "compared_on_of"]
