"""Tamper evidence: every artifact a later stage or a server reads carries its SHA-256, recorded by the
run that wrote it as a param (write-once: nobody can change it afterwards), and is checked on reading.

Params ``argse.sha256/<artifact path>`` hold the digests (``argse.sha256/logits/val.npz``); a file the
run rewrites (the training checkpoint) gets one param per version (``.../checkpoints/last.pt/epoch-10``)
and must match one of them; a file a resumed run writes again, with other bytes, gets one more
(``.../epoch-10/again-2``, ``argse.sha256/model/MLmodel/again-2``). A run logged before digests
existed has none, and is read as it is.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from argse import ArgseError

PREFIX = "argse.sha256/"
AGAIN = "/again-"  # a file written again by a resumed run: key/again-2, key/again-3, ...
_AGAIN = re.compile(re.escape(AGAIN) + r"\d+$")
_VERSION = re.compile(r"/epoch-\d+$")
#: Files MLflow itself writes into a logged model after it was logged (on registration).
MLFLOW_BOOKKEEPING = ("registered_model_meta",)


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


def record(local: str | Path, artifact_path: str, *, version: str | None = None, run_id: str | None = None) -> None:
    """Log the digest of every file of ``local`` (a file or a folder logged as ``artifact_path``) as
    params of the active run (or ``run_id``); ``version`` keys a file that the run will log again.
    A digest already recorded is not recorded twice; a file recorded before with other bytes gets a
    key of its own (:func:`_free_key`)."""
    client = MlflowClient()
    run_id = run_id or mlflow.active_run().info.run_id
    logged = client.get_run(run_id).data.params
    params = {}
    for path, file in files_under(local, artifact_path).items():
        digest = sha256(file)
        params[_free_key(logged, PREFIX + path + (f"/{version}" if version else ""), digest)] = digest
    items = [(k, v) for k, v in params.items() if logged.get(k) != v]
    for start in range(0, len(items), 100):  # the API takes 100 params a batch
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 100]])
    _recorded.cache_clear()


def _free_key(logged: dict[str, str], key: str, digest: str) -> str:
    """``key``, or ``key/again-N``: the first that is free or already holds ``digest``. A process killed
    between a digest and its file (or after both, before its run ended) leaves the digest; the resumed
    run writes the file again, not always bit for bit (a model's MLmodel, a checkpoint's pickle), and
    params are write-once, so the new digest goes beside the old one."""
    candidate, attempt = key, 1
    while logged.get(candidate, digest) != digest:
        attempt += 1
        candidate = f"{key}{AGAIN}{attempt}"
    return candidate


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
    """Record the digests of the files of a model the active run has just logged, as ``model/...``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp), "model")


@functools.lru_cache(maxsize=256)
def _recorded(run_id: str) -> tuple[tuple[str, str], ...]:
    params = MlflowClient().get_run(run_id).data.params
    return tuple((k[len(PREFIX):], v) for k, v in params.items() if k.startswith(PREFIX))


def recorded(run_id: str) -> dict[str, list[str]]:
    """``{artifact path: [digests]}`` that ``run_id`` recorded (a rewritten file has several)."""
    out: dict[str, list[str]] = {}
    for key, value in _recorded(run_id):
        path = _VERSION.sub("", _AGAIN.sub("", key))
        out.setdefault(path, []).append(value)
    return out


def verify(run_id: str, local: str | Path, artifact_path: str) -> None:
    """Check a downloaded file or folder (logged as ``artifact_path`` by ``run_id``) against the digests
    the run recorded: an :class:`ArtifactChanged` for the first file that differs or has none while
    its folder has some. A run that recorded nothing is read as it is."""
    digests = recorded(run_id)
    if not digests:
        return
    for path, file in files_under(local, artifact_path).items():
        expected = digests.get(path)
        found = sha256(file)
        if expected is None:
            if any(p.startswith(artifact_path.rstrip("/") + "/") or p == artifact_path for p in digests):
                raise ArtifactChanged(f"run {run_id}: {path} is not among the files the run logged "
                                      "(an artifact was added after it finished); rerun the stage that makes it")
            continue
        if found not in expected:
            raise ArtifactChanged(f"run {run_id}: {path} is not what the run logged (sha256 expected "
                                  f"{expected[-1][:16]}..., found {found[:16]}...): it was changed after the run "
                                  "wrote it; rerun the stage that makes it")


def verify_run(run_id: str) -> list[str]:
    """Download every artifact ``run_id`` recorded a digest for and check it; the paths checked. The
    model files (``model/...``) are read through the run's logged model."""
    from argse.tracking.lookup import download

    paths = sorted(recorded(run_id))
    if not paths:
        raise ArgseError(f"run {run_id} recorded no artifact digests (it was logged before they existed, or it "
                         "is not an argse stage run): nothing to verify")
    tops = sorted({"model" if p.startswith("model/") else p for p in paths})
    for top in tops:  # the model's files at once, through the run's logged model; the others one by one
        verify(run_id, download(run_id, top, check=False), top)
    return paths
