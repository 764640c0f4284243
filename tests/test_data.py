"""Loaders and splits: the CIFAR-100 reader on a generated folder, the long-tail profile, disjoint
stratified splits, groups and prior weights."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest

from argse import ArgseError
from argse.data.loaders import CIFAR_FOLDER, load_cifar100, load_digits
from datasets import write_cifar100_folder
from argse.data.splits import EVAL_SPLITS, Splits, assign_groups, longtail_counts, make_splits


def test_cifar100_lt_profile_matches_the_benchmark():
    counts = longtail_counts(500, 100, 100)
    assert counts[0] == 500 and counts[-1] == 5
    assert counts.sum() == 10847
    assert np.all(np.diff(counts) <= 0)
    groups = assign_groups(counts, (20,))
    assert (groups == 0).sum() == 69 and (groups == 1).sum() == 31
    three = assign_groups(counts, (100, 20))
    assert [(three == k).sum() for k in range(3)] == [35, 34, 31]


def test_empty_group_is_refused_with_the_option_name():
    with pytest.raises(ArgseError, match="--group-thresholds 1000"):
        assign_groups(np.array([50, 10, 5]), (1000,))


def test_cifar_loader_reads_a_generated_folder_with_a_checksum_warning(cifar_dir, caplog):
    with caplog.at_level(logging.WARNING):
        source = load_cifar100(cifar_dir)
    assert source.train_images.shape == (3000, 32, 32, 3) and source.train_images.dtype == np.uint8
    assert source.heldout_images.shape == (1000, 32, 32, 3)
    assert np.bincount(source.train_labels).tolist() == [30] * 100
    assert source.class_names[3] == "class_03"
    assert any("checksums" in r.message for r in caplog.records)
    # The pixels are the pickle's rows laid out as CHW -> HWC.
    with open(cifar_dir / CIFAR_FOLDER / "train", "rb") as fh:
        raw = pickle.load(fh, encoding="latin1")
    np.testing.assert_array_equal(source.train_images[7], raw["data"][7].reshape(3, 32, 32).transpose(1, 2, 0))


@pytest.mark.parametrize("damage, message", [
    ("missing_meta", "meta is missing"),
    ("no_labels", "no 'fine_labels'"),
    ("wrong_shape", "must be uint8 of shape"),
    ("label_range", "must lie in 0..99"),
])
def test_cifar_loader_refuses_a_wrong_layout(tmp_path, damage, message):
    folder = write_cifar100_folder(tmp_path, per_class_train=1, per_class_test=1)
    if damage == "missing_meta":
        (folder / "meta").unlink()
    else:
        with open(folder / "train", "rb") as fh:
            batch = pickle.load(fh)
        if damage == "no_labels":
            del batch["fine_labels"]
        elif damage == "wrong_shape":
            batch["data"] = batch["data"][:, :100]
        else:
            batch["fine_labels"][0] = 100
        with open(folder / "train", "wb") as fh:
            pickle.dump(batch, fh)
    with pytest.raises(ArgseError, match=message):
        load_cifar100(tmp_path)


def test_cifar_loader_offline_with_nothing_names_the_folder_and_file(tmp_path, offline):
    with pytest.raises(ArgseError) as err:
        load_cifar100(tmp_path / "empty")
    text = str(err.value)
    assert str(tmp_path / "empty") in text and "cifar-100-python.tar.gz" in text
    assert "\n" not in text


def test_digits_source_is_fixed_and_half_held_out():
    a, b = load_digits(), load_digits()
    assert a.fingerprint == b.fingerprint
    assert a.train_images.shape[1:] == (8, 8, 1) and a.train_images.max() == 255
    assert abs(len(a.heldout_labels) - len(a.train_labels)) <= 10


def _splits(seed=0, **kw):
    args = dict(imb_factor=20.0, tunev_ratio=0.3, val_ratio=0.2, group_thresholds=(20,), seed=seed)
    args.update(kw)
    return make_splits(load_digits(), **args)


def test_splits_follow_the_profile_and_are_disjoint_and_stratified():
    source = load_digits()
    splits = _splits()
    pool = np.bincount(source.train_labels, minlength=10)
    np.testing.assert_array_equal(splits.train_counts, longtail_counts(int(pool.min()), 10, 20.0))
    assert len(set(splits.indices["train"])) == len(splits.indices["train"])
    held = [set(splits.indices[s].tolist()) for s in EVAL_SPLITS]
    assert not (held[0] & held[1]) and not (held[0] & held[2]) and not (held[1] & held[2])
    assert sum(map(len, held)) == len(source.heldout_labels)  # every held-out image used once
    for c in range(10):
        n_c = int((source.heldout_labels == c).sum())
        tunev = int((splits.labels["tunev"] == c).sum())
        val = int((splits.labels["val"] == c).sum())
        assert tunev == round(0.3 * n_c) and val == round(0.2 * n_c)
    np.testing.assert_array_equal(source.heldout_labels[splits.indices["test"]], splits.labels["test"])


def test_same_seed_same_indices_other_seed_other_indices():
    a, b, c = _splits(seed=3), _splits(seed=3), _splits(seed=4)
    for name in ("train", "tunev", "val", "test"):
        np.testing.assert_array_equal(a.indices[name], b.indices[name])
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert not np.array_equal(a.indices["val"], c.indices["val"])


def test_digits_split_indices_are_pinned():
    # `argse splits --dataset digits-lt --seed 0` as it was before the long-tail order became a
    # preset property: the index-order presets must keep drawing exactly the same images.
    assert _splits(seed=0).fingerprint == "5e64ab52972e0582269d3a41b6dffa75024948ecdae1adafb2225fc7e2cb0bb7"


@pytest.mark.parametrize("target", ["lt", "balanced"])
def test_weights_reproduce_the_target_prior(target):
    splits = _splits()
    for split in EVAL_SPLITS:
        w = splits.weights(split, target)
        assert w.mean() == pytest.approx(1.0)
        mass = np.bincount(splits.labels[split], weights=w, minlength=10) / w.sum()
        np.testing.assert_allclose(mass, splits.prior(target), atol=1e-12)


def test_short_class_takes_what_it_has(cifar_dir):
    source = load_cifar100(cifar_dir)
    splits = make_splits(source, imb_factor=100, tunev_ratio=0.3, val_ratio=0.2, group_thresholds=(20,),
                         seed=0, n_max=500)
    assert splits.requested_counts[0] == 500 and splits.train_counts[0] == 30
    assert splits.train_counts[-1] == 5  # the tail asks for 5 and gets them


def test_splits_round_trip_through_a_folder(tmp_path):
    splits = _splits()
    loaded = Splits.load(splits.save(tmp_path / "splits"))
    assert loaded.fingerprint == splits.fingerprint
    np.testing.assert_array_equal(loaded.class_to_group, splits.class_to_group)
    np.testing.assert_allclose(np.load(tmp_path / "splits" / "weights.npz")["val_balanced"], splits.weights("val", "balanced"))
