"""The digests a run records, in its manifest: a file written again (a checkpoint version, a file a
resumed run writes again after a kill between a digest and its file) gets its new digest appended, and
reading the unfinished run accepts what it wrote last; once the run is sealed (as it ends FINISHED)
exactly one digest per file is accepted, whatever is added to the run afterwards. A run carries one
digest param and one digest tag; runs logged with one param per file are read as they were."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from argse.tracking import integrity


@pytest.fixture(autouse=True)
def _experiment(store):
    """The runs in an experiment of the test's own store (Default's artifacts would land in the checkout)."""
    mlflow.set_experiment("integrity")


def _digest_keys(run_id: str) -> tuple[list[str], list[str]]:
    """The run's params and tags that hold digests."""
    data = MlflowClient().get_run(run_id).data
    return ([k for k in data.params if k.startswith("argse.digests") or k.startswith("argse.sha256")],
            [k for k in data.tags if k.startswith("argse.digests")])


def test_a_version_written_again_is_kept_while_the_run_works_and_the_seal_keeps_the_last(store, tmp_path):
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
        assert integrity.recorded(run.info.run_id) == {"checkpoints/last.pt": [first, second, third]}
        assert not integrity.is_sealed(run.info.run_id)
        integrity.seal(run.info.run_id)
    assert integrity.recorded(run.info.run_id) == {"checkpoints/last.pt": [third]}
    assert integrity.is_sealed(run.info.run_id)
    # Out of the Columns menu: one digest param and one digest tag, however many files and versions.
    assert _digest_keys(run.info.run_id) == (["argse.digests"], ["argse.digests.pending"])


def test_the_file_a_resumed_run_logged_is_verified_and_another_is_refused(store, tmp_path):
    ckpt = tmp_path / "last.pt"
    with mlflow.start_run() as run:
        ckpt.write_bytes(b"first attempt")
        integrity.record(ckpt, "checkpoints/last.pt", version="epoch-2")
        ckpt.write_bytes(b"after the resume")
        integrity.log_artifact(ckpt, "checkpoints", version="epoch-2")
        integrity.seal(run.info.run_id)
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
        one = integrity.sha256(model / "MLmodel")
        (model / "MLmodel").write_text("model_uuid: two")  # logged again after a resume: a new uuid
        integrity.record(model, "model")
        two = integrity.sha256(model / "MLmodel")
        assert integrity.recorded(run.info.run_id)["model/MLmodel"] == [one, two]
        integrity.verify(run.info.run_id, model, "model")
        integrity.seal(run.info.run_id)
    assert integrity.recorded(run.info.run_id)["model/MLmodel"] == [two]
    integrity.verify(run.info.run_id, model, "model")
    (model / "MLmodel").write_text("model_uuid: three")
    with pytest.raises(integrity.ArtifactChanged, match="model/MLmodel is not what the run logged"):
        integrity.verify(run.info.run_id, model, "model")


def test_after_the_seal_nobody_who_can_write_the_run_can_vouch_for_an_edited_file(store, tmp_path):
    """The weakness of one param per file: whoever could write the run could add `.../again-N` with the
    digest of an edited file. After the seal, neither a new pending manifest nor such a param counts."""
    rule = tmp_path / "rule.json"
    rule.write_text('{"cost": 0.2}')
    with mlflow.start_run() as run:
        integrity.log_artifact(rule, "rule")
        integrity.seal(run.info.run_id)
    run_id = run.info.run_id
    rule.write_text('{"cost": 9.0}')  # edited, then vouched for by every means the run's writers have
    integrity.record(rule, "rule/rule.json", run_id=run_id)
    MlflowClient().log_param(run_id, "argse.sha256/rule/rule.json/again-2", integrity.sha256(rule))
    with pytest.raises(integrity.ArtifactChanged, match="rule/rule.json is not what the run logged"):
        integrity.verify(run_id, rule, "rule/rule.json")


def test_a_changed_manifest_or_an_unsealed_finished_run_is_refused_in_one_line(store, tmp_path):
    data = tmp_path / "val.npz"
    data.write_bytes(b"logits")
    with mlflow.start_run() as sealed:
        integrity.log_artifact(data, "logits")
        integrity.seal(sealed.info.run_id)
    manifest = Path(unquote(urlparse(sealed.info.artifact_uri).path)) / integrity.MANIFEST
    manifest.write_text(manifest.read_text().replace(integrity.sha256(data), "0" * 64))
    integrity._SEALED.clear()  # as another process reads it: afresh
    with pytest.raises(integrity.ArtifactChanged) as changed:
        integrity.recorded(sealed.info.run_id)
    assert "argse/digests.json is not what the run recorded" in str(changed.value) and "\n" not in str(changed.value)
    with mlflow.start_run() as unsealed:  # ended FINISHED by hand, not by its stage
        integrity.log_artifact(data, "logits")
    with pytest.raises(integrity.ArtifactChanged, match="FINISHED but never sealed its digests"):
        integrity.recorded(unsealed.info.run_id)


def test_a_run_with_one_digest_param_per_file_is_read_as_it_was(store, tmp_path):
    model = tmp_path / "MLmodel"
    model.write_text("model_uuid: two")
    with mlflow.start_run() as run:
        mlflow.log_params({"argse.sha256/model/MLmodel": "1" * 64,
                           "argse.sha256/model/MLmodel/again-2": integrity.sha256(model),
                           "argse.sha256/checkpoints/last.pt/epoch-2": "2" * 64})
    assert integrity.recorded(run.info.run_id) == {"model/MLmodel": ["1" * 64, integrity.sha256(model)],
                                                   "checkpoints/last.pt": ["2" * 64]}
    integrity.verify(run.info.run_id, model, "model/MLmodel")
    assert not integrity.is_sealed(run.info.run_id)
