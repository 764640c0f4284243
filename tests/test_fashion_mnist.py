"""fashion-mnist-lt: the IDX loader on generated folders (no network, no Debian package), the
reverse long-tail profile, 7 head / 3 tail, disjoint splits, the offline and damaged-file errors, the
backbone and augmentation, and a one-epoch experts run through the CLI."""

from __future__ import annotations

import gzip
import logging
import shutil

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from argse import ArgseError
from argse.presets import PRESETS
from argse.data import loaders
from argse.data.device import DeviceImages
from argse.data.loaders import FASHION_CLASSES, FASHION_FILES, LOADERS, load_fashion_mnist, load_source
from argse.data.splits import EVAL_SPLITS, assign_groups, longtail_counts, make_splits
from argse.models.backbones import BACKBONES, TORCHVISION_MODELS, build_backbone, count_parameters
from argse.artifacts import load_splits
from datasets import write_fashion_mnist_folder
from test_device_data import _identity_stats, _images, _match, _to_uint8

FASHION = PRESETS["fashion-mnist-lt"]
REVERSE_IF100 = [60, 100, 166, 278, 464, 774, 1292, 2156, 3596, 6000]  # classes 0..9


def _read_gz(path) -> bytes:
    with gzip.open(path, "rb") as fh:
        return fh.read()


def _write_gz(path, data: bytes) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(data)


def _runs(stage: str):
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, filter_string=f"tags.\"argse.stage\" = '{stage}'")


# -- the loader ----------------------------------------------------------------------------------


def test_loader_reads_a_generated_idx_folder_with_a_reduced_copy_warning(fashion_dir, caplog):
    with caplog.at_level(logging.WARNING):
        source = load_fashion_mnist(fashion_dir)
    assert source.name == "fashion-mnist-lt" and source.class_names == FASHION_CLASSES
    assert source.train_images.shape == (6000, 28, 28, 1) and source.train_images.dtype == np.uint8
    assert source.heldout_images.shape == (300, 28, 28, 1)
    assert np.bincount(source.train_labels).tolist() == [600] * 10
    assert source.train_images.flags.writeable
    assert any("reduced copy" in r.message for r in caplog.records)
    # The pixels and labels are the IDX payload after the 16- and 8-byte headers, in file order.
    pixels = np.frombuffer(_read_gz(fashion_dir / "t10k-images-idx3-ubyte.gz"), np.uint8, offset=16)
    labels = np.frombuffer(_read_gz(fashion_dir / "t10k-labels-idx1-ubyte.gz"), np.uint8, offset=8)
    np.testing.assert_array_equal(source.heldout_images[..., 0], pixels.reshape(-1, 28, 28))
    np.testing.assert_array_equal(source.heldout_labels, labels)


def test_torchvision_layout_with_unpacked_files_reads_the_same(fashion_dir, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"  # where torchvision's download leaves them
    raw.mkdir(parents=True)
    for name in FASHION_FILES.values():
        (raw / name).write_bytes(_read_gz(fashion_dir / f"{name}.gz"))
    assert load_fashion_mnist(tmp_path).fingerprint == load_fashion_mnist(fashion_dir).fingerprint


def test_system_folder_is_read_when_data_dir_has_no_files(fashion_dir, tmp_path, monkeypatch, offline):
    monkeypatch.setattr(loaders, "FASHION_SYSTEM_DIR", fashion_dir)
    source = load_source(PRESETS["fashion-mnist-lt"].source, tmp_path / "empty")
    assert source.fingerprint == load_fashion_mnist(fashion_dir).fingerprint


def test_data_dir_comes_before_the_system_folder(fashion_dir, tmp_path, monkeypatch):
    other = write_fashion_mnist_folder(tmp_path / "other", per_class_train=3, per_class_test=2, seed=9)
    monkeypatch.setattr(loaders, "FASHION_SYSTEM_DIR", fashion_dir)
    assert len(load_fashion_mnist(other).train_labels) == 30


def test_offline_with_neither_folder_is_one_line_naming_both_and_the_apt_command(tmp_path, offline):
    with pytest.raises(ArgseError) as err:
        load_fashion_mnist(tmp_path / "empty")
    text = str(err.value)
    assert "\n" not in text
    assert str(tmp_path / "empty") in text and str(loaders.FASHION_SYSTEM_DIR) in text
    assert "apt-get install -y dataset-fashion-mnist" in text and "train-images-idx3-ubyte.gz" in text


def test_empty_data_dir_through_the_cli_fails_one_line_and_the_run_is_failed(store, cli, tmp_path, offline):
    empty = tmp_path / "nothing-here"
    result = cli("splits", "--dataset", "fashion-mnist-lt", "--data-dir", empty)
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and str(empty) in lines[0] and "apt-get install -y dataset-fashion-mnist" in lines[0]
    assert [r.info.status for r in _runs("splits")] == ["FAILED"]


def _damage(folder, damage: str) -> str:
    """Damage one file of a generated folder; return the file's name."""
    name = "train-images-idx3-ubyte.gz"
    path = folder / name
    data = _read_gz(path)
    if damage == "not_gzip":
        path.write_bytes(b"<html>404 Not Found</html>")
    elif damage == "cut_gzip":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "wrong_magic":
        _write_gz(path, b"\x00\x00\x0d\x03" + data[4:])  # float IDX
    elif damage == "truncated_payload":
        _write_gz(path, data[:-100])
    elif damage == "wrong_size":
        n = int.from_bytes(data[4:8], "big")
        header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in (n, 49, 16))
        _write_gz(path, header + data[16:])  # 28*28 = 49*16 bytes per image
    elif damage == "label_range":
        name = "train-labels-idx1-ubyte.gz"
        labels = bytearray(_read_gz(folder / name))
        labels[8] = 10
        _write_gz(folder / name, bytes(labels))
    elif damage == "count_mismatch":
        name = "t10k-labels-idx1-ubyte.gz"
        labels = _read_gz(folder / name)
        n = int.from_bytes(labels[4:8], "big") - 1
        _write_gz(folder / name, labels[:4] + n.to_bytes(4, "big") + labels[8:-1])
    elif damage == "missing_file":
        name = "t10k-labels-idx1-ubyte.gz"
        (folder / name).unlink()
    return name


@pytest.mark.parametrize("damage, message", [
    ("not_gzip", "cannot be read"),
    ("cut_gzip", "cannot be read"),
    ("wrong_magic", "is not an IDX file of unsigned bytes"),
    ("truncated_payload", "is truncated or padded"),
    ("wrong_size", "images are 28x28"),
    ("label_range", "labels must lie in 0..9"),
    ("count_mismatch", "do not match"),
    ("missing_file", "only part of Fashion-MNIST"),
])
def test_a_damaged_or_wrong_file_is_one_line_naming_it(fashion_dir, tmp_path, damage, message):
    folder = shutil.copytree(fashion_dir, tmp_path / "fm")
    name = _damage(folder, damage)
    with pytest.raises(ArgseError, match=message) as err:
        load_fashion_mnist(folder)
    assert name in str(err.value) and "\n" not in str(err.value)


# -- the preset: reverse long tail, groups, splits ------------------------------------------------


def test_every_preset_names_a_loader_and_a_backbone_that_exist():
    for name, p in PRESETS.items():
        assert p.name == name and p.source in LOADERS and p.backbone in BACKBONES, name
    assert {p.source for p in PRESETS.values()} == set(LOADERS)  # no loader without a preset
    # every backbone is a preset's, or one a dataset card names for photographs (torchvision's ResNets)
    assert set(BACKBONES) == {p.backbone for p in PRESETS.values()} | set(TORCHVISION_MODELS)


def test_reverse_if100_profile_gives_class_9_the_head_and_7_head_3_tail():
    counts = longtail_counts(6000, 10, FASHION.imb_factor, FASHION.longtail_order)
    assert counts.tolist() == REVERSE_IF100 and counts.sum() == 14_886
    assert counts.argmax() == 9 and counts.argmin() == 0
    np.testing.assert_array_equal(counts, longtail_counts(6000, 10, 100.0)[::-1])
    groups = assign_groups(counts, FASHION.group_thresholds)
    assert groups.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]  # tail: T-shirt/top, Trouser, Pullover


def test_unknown_longtail_order_is_refused():
    with pytest.raises(ArgseError, match="long-tail order 'sideways'"):
        longtail_counts(10, 3, 10.0, "sideways")


def test_splits_run_on_a_generated_folder_is_reversed_7_3_and_disjoint(store, cli, fashion_dir, offline):
    result = cli("splits", "--dataset", "fashion-mnist-lt", "--data-dir", fashion_dir, "--group-thresholds", "20")
    assert result.code == 0, result.err
    (run,) = _runs("splits")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["classes_head"] == 7 and run.data.metrics["classes_tail"] == 3
    splits = load_splits(run.info.run_id)
    assert splits.train_counts.tolist() == [6, 10, 16, 27, 46, 77, 129, 215, 359, 600]
    assert splits.class_to_group.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    held = [set(splits.indices[s].tolist()) for s in EVAL_SPLITS]
    assert not (held[0] & held[1]) and not (held[0] & held[2]) and not (held[1] & held[2])
    assert sum(map(len, held)) == 300
    assert [int((splits.labels["val"] == c).sum()) for c in range(10)] == [6] * 10


def test_the_preset_threshold_on_the_full_size_profile_via_make_splits(fashion_dir):
    # n_max=600 on the small folder: the profile is the full one scaled by 1/10.
    source = load_fashion_mnist(fashion_dir)
    splits = make_splits(source, imb_factor=100, tunev_ratio=0.3, val_ratio=0.2, group_thresholds=(20,),
                         seed=0, longtail_order="reverse")
    np.testing.assert_array_equal(splits.requested_counts, longtail_counts(600, 10, 100, "reverse"))
    assert np.all(np.diff(splits.train_counts) > 0)


# -- the backbone and the augmentation ------------------------------------------------------------


def test_backbone_is_a_small_resnet_for_28x28_grey_images():
    model = build_backbone(PRESETS["fashion-mnist-lt"].backbone, 10)
    assert 50_000 < count_parameters(model) < 100_000
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_fashion_augmentation_is_a_two_pixel_padded_crop_with_flips():
    source = _images(128, 28, 28, 1)
    data = DeviceImages(source, np.arange(128), augmentation=FASHION.augmentation, **_identity_stats(1))
    seen = set()
    for x, y in data.batches(64, shuffle=True, generator=torch.Generator().manual_seed(0), augment=True,
                             drop_last=False):
        produced = _to_uint8(x)
        for k, index in enumerate(y.tolist()):
            seen.add(_match(produced[k], source[index], padding=2, flip=True))
    assert {(dy, dx) for dy, dx, _ in seen} == {(dy, dx) for dy in range(5) for dx in range(5)}
    assert {f for _, _, f in seen} == {False, True}


# -- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow  # trains and logs an expert in-process: 13 s of CPU, most of it torch's and MLflow's first imports
def test_one_epoch_expert_on_a_generated_folder(store, cli, fashion_dir, offline):
    assert cli("splits", "--dataset", "fashion-mnist-lt", "--data-dir", fashion_dir,
               "--group-thresholds", "20").code == 0
    result = cli("experts", "--dataset", "fashion-mnist-lt", "--data-dir", fashion_dir, "--expert", "ce",
                 "--epochs", "1")
    assert result.code == 0, result.err
    (run,) = _runs("experts")
    assert run.info.status == "FINISHED"
    assert {"final/val_acc_head", "final/val_acc_tail", "final/temperature"} <= set(run.data.metrics)
    files = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "logits")}
    assert files == {f"logits/{s}.npz" for s in EVAL_SPLITS}
