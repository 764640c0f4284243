"""The digests of a file written again: a resumed run whose process was killed between a digest and its
file (or after both, before the run ended) writes the file again, not always bit for bit; the new
digest goes beside the old one instead of failing on MLflow's write-once params, reading accepts what
the run wrote last, and a file nobody recorded is still refused."""

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
    assert _digest_params(run.info.run_id) == {key: first, f"{key}/again-2": second, f"{key}/again-3": third}
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


def test_a_file_written_again_gets_a_digest_of_its_own_and_a_third_file_is_refused(store, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    with mlflow.start_run() as run:
        (model / "MLmodel").write_text("model_uuid: one")
        (model / "weights.pkl").write_bytes(b"w")
        integrity.record(model, "model")
        (model / "MLmodel").write_text("model_uuid: two")  # logged again after a resume: a new uuid
        integrity.record(model, "model")
    key = integrity.PREFIX + "model/MLmodel"
    params = _digest_params(run.info.run_id)
    assert sorted(params) == [key, f"{key}/again-2", integrity.PREFIX + "model/weights.pkl"]
    integrity.verify(run.info.run_id, model, "model")
    (model / "MLmodel").write_text("model_uuid: three")
    with pytest.raises(integrity.ArtifactChanged, match="model/MLmodel is not what the run logged"):
        integrity.verify(run.info.run_id, model, "model")
