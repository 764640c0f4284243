"""Tamper evidence: every file a later stage or a server reads carries its SHA-256, recorded by the run
that wrote it before the file itself, and checked on reading.

The digests live in a *manifest* of the run, not in one param per file:

* **While the run works**, :func:`record` adds the digests of the files it is about to log to the
  run's pending manifest, ``argse/digests-pending-<a|b>.json`` (two slots written in turn, so a
  process killed mid-write leaves the other one whole), whose own digest is the tag
  ``argse.digests.pending`` (``<slot> <sha256>``). A digest is recorded before its file, never a file
  without its digest. A file the run writes again (a checkpoint every few epochs, a file a resumed run
  writes again, not always bit for bit) gets its new digest appended to its history; reading an
  unfinished run (a resume reading its checkpoint) accepts any digest of that history.
* **When the run ends FINISHED**, :func:`seal` writes ``argse/digests.json``, each file's last digest,
  and logs that manifest's digest as the write-once param ``argse.digests``. From then on a reader
  accepts exactly that one digest per file: whoever can write the run can add tags or manifests, but
  cannot vouch for an edited file again. A FINISHED run that holds a pending manifest but no seal did
  not end through its stage, and is refused.

So a run carries one digest param and one digest tag, whatever it logged. Runs logged before the
manifest existed hold one param ``argse.sha256/<artifact path>`` per file (``.../again-N`` and
``.../epoch-N`` for files written again) and are read as they were; a run that recorded nothing is
read as it is.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from argse import ArgseError

SEAL_PARAM = "argse.digests"  # the sha256 of argse/digests.json, write-once, logged as the run ends FINISHED
PENDING_TAG = "argse.digests.pending"  # "<slot> <sha256>" of the pending manifest, while the run works
MANIFEST_DIR = "argse"
MANIFEST = f"{MANIFEST_DIR}/digests.json"
PENDING = MANIFEST_DIR + "/digests-pending-{slot}.json"
SLOTS = ("a", "b")
FORMAT = "argse.digests/1"
#: Files MLflow itself writes into a logged model after it was logged (on registration).
MLFLOW_BOOKKEEPING = ("registered_model_meta",)
LEGACY_PREFIX = "argse.sha256/"  # the digest params of runs logged before the manifest
_LEGACY_SUFFIX = re.compile(r"(/epoch-\d+)?(/again-\d+)?$")


class ArtifactChanged(ArgseError):
    """An artifact is not what its run logged: one line naming the run, the file and both digests."""


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_under(local: str | Path, artifact_path: str) -> dict[str, Path]:
    """``{artifact path of each file: local path}`` for a downloaded file or folder."""
    local = Path(local)
    if local.is_file():
        return {artifact_path: local}
    prefix = f"{artifact_path}/" if artifact_path else ""
    return {f"{prefix}{p.relative_to(local).as_posix()}": p for p in sorted(local.rglob("*"))
            if p.is_file() and p.name not in MLFLOW_BOOKKEEPING}


# -- writing ---------------------------------------------------------------------------------------

#: The pending manifest of each run this process records into: {path: [{"sha256": ..., "version": ...}]}.
_PENDING: dict[str, dict[str, list[dict]]] = {}


def record(local: str | Path, artifact_path: str, *, version: str | None = None, run_id: str | None = None) -> None:
    """Add the digest of every file of ``local`` (a file or a folder to be logged as ``artifact_path``)
    to the pending manifest of the active run (or ``run_id``), before the files are logged. ``version``
    labels a file the run will log again (``epoch-10``). A file whose last digest is this one is left
    as it is; other bytes are appended to its history."""
    client = MlflowClient()
    run_id = run_id or mlflow.active_run().info.run_id
    files = _pending_files(client, run_id)
    changed = False
    for path, file in files_under(local, artifact_path).items():
        digest = sha256(file)
        history = files.setdefault(path, [])
        if not history or history[-1]["sha256"] != digest:
            history.append({"sha256": digest, **({"version": version} if version else {})})
            changed = True
    if changed:
        _write_pending(client, run_id, files)


def _pending_files(client: MlflowClient, run_id: str) -> dict[str, list[dict]]:
    """The run's pending manifest: this process's copy, else the one the run holds (a resumed run), else
    the digest params of a run started before the manifest, else empty."""
    if run_id not in _PENDING:
        run = client.get_run(run_id)
        found = _read_pending(client, run)
        if found is None:
            found = {path: [{"sha256": digest} for digest in digests]
                     for path, digests in _legacy(run.data.params).items()}
        _PENDING[run_id] = found
    return _PENDING[run_id]


def _write_pending(client: MlflowClient, run_id: str, files: dict[str, list[dict]]) -> None:
    tag = client.get_run(run_id).data.tags.get(PENDING_TAG, "")
    slot = SLOTS[1] if tag.startswith(SLOTS[0]) else SLOTS[0]  # the slot the tag does not name
    text = json.dumps({"format": FORMAT, "run_id": run_id, "files": files}, indent=1, sort_keys=True)
    _upload(client, run_id, PENDING.format(slot=slot), text)
    client.set_tag(run_id, PENDING_TAG, f"{slot} {hashlib.sha256(text.encode()).hexdigest()}")


def _upload(client: MlflowClient, run_id: str, artifact_path: str, text: str) -> None:
    folder, _, name = artifact_path.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_text(text)
        client.log_artifact(run_id, str(Path(tmp) / name), folder)


def seal(run_id: str) -> str | None:
    """Write the run's final manifest (each file's last digest) and its digest as the write-once param
    ``argse.digests``, as the run ends FINISHED; the digest, or ``None`` for a run that recorded nothing.
    A run sealed before with other digests (resumed after its seal, then changed) is an error."""
    client = MlflowClient()
    files = _pending_files(client, run_id)
    if not files:
        return None
    manifest = {"format": FORMAT, "run_id": run_id,
                "files": {path: history[-1]["sha256"] for path, history in sorted(files.items())}}
    text = json.dumps(manifest, indent=1, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    sealed = client.get_run(run_id).data.params.get(SEAL_PARAM)
    if sealed is not None and sealed != digest:
        raise ArtifactChanged(f"run {run_id} sealed other digests before (sha256 {sealed[:16]}...) than the files it "
                              "holds now: start a fresh run instead of resuming it")
    if sealed is None:
        _upload(client, run_id, MANIFEST, text)  # the manifest first: a kill in between leaves no seal
        client.log_param(run_id, SEAL_PARAM, digest)
    return digest


def log_artifacts(local_dir: str | Path, artifact_path: str | None = None) -> None:
    """``mlflow.log_artifacts`` that also records the digest of every file it logs, first: a process
    killed in between leaves a digest without its file (a stage that is not FINISHED), never a file
    without its digest."""
    record(local_dir, artifact_path or "")
    mlflow.log_artifacts(str(local_dir), artifact_path)


def log_artifact(local_file: str | Path, artifact_dir: str, *, version: str | None = None) -> None:
    """``mlflow.log_artifact`` of one file into ``artifact_dir``, with its digest (``version``: see
    :func:`record`)."""
    record(local_file, f"{artifact_dir}/{Path(local_file).name}", version=version)
    mlflow.log_artifact(str(local_file), artifact_dir)


def record_model(model_uri: str) -> None:
    """Record the digests of the files of a model the active run has just logged, as ``model/...``
    (for a model MLflow logs in one call; :func:`argse.serving.log_model` records its files first)."""
    with tempfile.TemporaryDirectory() as tmp:
        record(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp), "model")


# -- reading ---------------------------------------------------------------------------------------


def _download_text(client: MlflowClient, run_id: str, artifact_path: str) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Path(client.download_artifacts(run_id, artifact_path, tmp)).read_text()
        except Exception:  # absent (or unreadable): the caller says what that means
            return None


def _manifest(client: MlflowClient, run_id: str, artifact_path: str, expected: str) -> dict:
    """A manifest artifact whose digest must be ``expected`` (the seal or the pending tag)."""
    text = _download_text(client, run_id, artifact_path)
    if text is None or hashlib.sha256(text.encode()).hexdigest() != expected:
        found = "missing" if text is None else f"sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}..."
        raise ArtifactChanged(f"run {run_id}: its digest manifest {artifact_path} is not what the run recorded "
                              f"(sha256 expected {expected[:16]}..., found {found}): its files cannot be vouched "
                              "for; rerun the stage that makes it")
    return json.loads(text)["files"]


def _read_pending(client: MlflowClient, run) -> dict[str, list[dict]] | None:
    tag = run.data.tags.get(PENDING_TAG)
    if not tag:
        return None
    slot, _, digest = tag.partition(" ")
    return _manifest(client, run.info.run_id, PENDING.format(slot=slot), digest)


def _legacy(params: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in sorted(params.items()):
        if key.startswith(LEGACY_PREFIX):
            out.setdefault(_LEGACY_SUFFIX.sub("", key[len(LEGACY_PREFIX):]), []).append(value)
    return out


#: The digests of the sealed runs this process has read: a seal never changes.
_SEALED: dict[str, dict[str, str]] = {}


def _recorded(run_id: str) -> tuple[bool, dict[str, list[str]]]:
    """(sealed, {path: digests}) of a run. A sealed run's manifest is read once per process; an
    unfinished run's is read each time (another process may be resuming it)."""
    if run_id in _SEALED:
        return True, {path: [digest] for path, digest in _SEALED[run_id].items()}
    client = MlflowClient()
    run = client.get_run(run_id)
    sealed = run.data.params.get(SEAL_PARAM)
    if sealed is not None:
        _SEALED[run_id] = _manifest(client, run_id, MANIFEST, sealed)
        return _recorded(run_id)
    pending = _read_pending(client, run)
    if pending is not None:
        if run.info.status == "FINISHED":
            raise ArtifactChanged(f"run {run_id} is FINISHED but never sealed its digests (param {SEAL_PARAM}): it did "
                                  "not end through its stage, and its files cannot be vouched for; rerun the stage")
        return False, {path: [e["sha256"] for e in history] for path, history in pending.items()}
    return False, _legacy(run.data.params)


def is_sealed(run_id: str) -> bool:
    """Whether the run ended FINISHED through its stage, its digests sealed (one per file)."""
    return _recorded(run_id)[0]


def recorded(run_id: str, *, sealed_only: bool = False) -> dict[str, list[str]]:
    """``{artifact path: [digests]}`` that ``run_id`` recorded: one per file for a sealed run, the file's
    history for one still at work (or logged before the manifest). ``sealed_only``: an
    :class:`ArtifactChanged` for a run that is not sealed."""
    sealed, files = _recorded(run_id)
    if sealed_only and not sealed:
        raise ArtifactChanged(f"run {run_id} has not sealed its digests (it did not finish, or was logged by an older "
                              "argse): its files cannot be vouched for")
    return files


def verify(run_id: str, local: str | Path, artifact_path: str, *, sealed_only: bool = False) -> None:
    """Check a downloaded file or folder (logged as ``artifact_path`` by ``run_id``) against the digests
    the run recorded: an :class:`ArtifactChanged` for the first file that differs or has none while
    its folder has some. A run that recorded nothing is read as it is (unless ``sealed_only``)."""
    digests = recorded(run_id, sealed_only=sealed_only)
    if not digests:
        return
    for path, file in files_under(local, artifact_path).items():
        expected = digests.get(path)
        found = sha256(file)
        if expected is None:
            if sealed_only or any(p.startswith(artifact_path.rstrip("/") + "/") or p == artifact_path for p in digests):
                raise ArtifactChanged(f"run {run_id}: {path} is not among the files the run logged "
                                      "(an artifact was added after it finished); rerun the stage that makes it")
            continue
        if found not in expected:
            raise ArtifactChanged(f"run {run_id}: {path} is not what the run logged (sha256 expected "
                                  f"{expected[-1][:16]}..., found {found[:16]}...): it was changed after the run "
                                  "wrote it; rerun the stage that makes it")
