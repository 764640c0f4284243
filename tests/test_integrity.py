"""The digests of a rewritten file (the training checkpoint): a resume that writes a version again with
other bytes (its process was killed between the digest and the file) records the new digest beside the
old one instead of failing on MLflow's write-once params, and reading accepts what the run wrote last."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from argse.tracking import integrity


def _digest_params(run_id: str) -> dict[str, str]:
    params = MlflowClient().get_run(run_id).data.params
    return {k: v for k, v in params.items() if k.startswith(integrity.PREFIX)}


def test_a_version_written_again_with_other_bytes_is_recorded_beside_the_first(store, tmp_path):
    ckpt = tmp_path / "last.pt"
    with mlflow.start_run() as run:
        ckpt.write_bytes(b"epoch 4, first attempt")
        first = integrity.sha256(ckpt)
        integrity.record(ckpt, "checkpoints/last.pt", version="epoch-4")  # killed before the file was logged
        ckpt.write_bytes(b"epoch 4, after the resume")
        second = integrity.sha256(ckpt)
        integrity.log_artifact(ckpt, "checkpoints", version="epoch-4")
        integrity.log_artifact(ckpt, "checkpoints", version="epoch-4")  # the same bytes again: nothing new
        ckpt.write_bytes(b"epoch 4, a third attempt")
        third = integrity.sha256(ckpt)
        integrity.record(ckpt, "checkpoints/last.pt", version="epoch-4")
    key = integrity.PREFIX + "checkpoints/last.pt/epoch-4"
    assert _digest_params(run.info.run_id) == {key: first, f"{key}.2": second, f"{key}.3": third}
    assert integrity.recorded(run.info.run_id) == {"checkpoints/last.pt": [first, second, third]}


def test_the_file_a_resumed_run_logged_is_verified_and_another_is_refused(store, tmp_path):
    ckpt = tmp_path / "last.pt"
    with mlflow.start_run() as run:
        ckpt.write_bytes(b"first attempt")
        integrity.record(ckpt, "checkpoints/last.pt", version="epoch-2")
        ckpt.write_bytes(b"after the resume")
        integrity.log_artifact(ckpt, "checkpoints", version="epoch-2")
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/last.pt",
                                                dst_path=str(tmp_path / "down"))
    integrity.verify(run.info.run_id, local, "checkpoints/last.pt")
    with open(local, "ab") as fh:
        fh.write(b"!")
    with pytest.raises(integrity.ArtifactChanged, match="checkpoints/last.pt is not what the run logged"):
        integrity.verify(run.info.run_id, local, "checkpoints/last.pt")


def test_an_unversioned_digest_stays_write_once(store, tmp_path):
    logits = tmp_path / "val.npz"
    with mlflow.start_run():
        logits.write_bytes(b"a")
        integrity.record(logits, "logits/val.npz")
        logits.write_bytes(b"b")
        with pytest.raises(mlflow.exceptions.MlflowException, match="Changing param values is not allowed"):
            integrity.record(logits, "logits/val.npz")
