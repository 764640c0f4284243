"""Users' own images: the folder scan, its one-line errors, the dataset card, reading and streaming
the images, and torchvision's ResNets with local weights."""

from __future__ import annotations

import io
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from argse import ArgseError, ArgseUsageError
from argse.presets import PRESETS, DatasetPreset
from argse.data.device import DeviceImages, random_resized_crop_boxes, resized_crop
from argse.data.folder import scan_folder
from argse.data.splits import make_splits
from argse.data.stream import StreamedImages, decode_images, estimate_stats, read_image
from argse.dataset_card import CARD_NAME, CARD_PRESET_KEYS, FROM_FOLDER, folder_dataset
from argse.models.backbones import build_backbone, load_weights, pretrained_state_dict, torchvision_weights
import datasets
from datasets import DIGITS_TAIL

_FOLDERS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _folder_cache(tmp_path_factory):
    _FOLDERS["root"] = tmp_path_factory.mktemp("folders")
    yield
    _FOLDERS.clear()


def write_image_folder(root, *args, **kwargs):
    """``datasets.write_image_folder``, written once per set of arguments in this module and copied."""
    key = repr((args, sorted(kwargs.items())))
    if key not in _FOLDERS:
        _FOLDERS[key] = datasets.write_image_folder(_FOLDERS["root"] / str(len(_FOLDERS)), *args, **kwargs)
    shutil.copytree(_FOLDERS[key], root)
    return root


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text, text
    return text


# -- the scan -----------------------------------------------------------------------------------------


def test_class_folders_are_scanned_with_their_natural_tail_sizes_modes_and_passed_over_files(tmp_path):
    root = write_image_folder(tmp_path / "d", suffix=".jpg", grey="mixed")
    (root / "train" / "digit0" / "notes.txt").write_text("not an image")
    (root / "train" / "digit3" / ".DS_Store").write_bytes(b"\0")
    scan = scan_folder(root)
    assert scan.layout == "folders" and scan.class_names == tuple(f"digit{c}" for c in range(10))
    np.testing.assert_array_equal(scan.counts("train"), DIGITS_TAIL)
    np.testing.assert_array_equal(scan.counts("test"), [4] * 10)
    assert set(scan.pools) == {"train", "test"} and scan.num_images == sum(DIGITS_TAIL) + 40
    assert set(scan.modes) == {"L", "RGB"} and scan.channels == 3  # grey and colour mixed: RGB
    assert any("converted to RGB" in c for c in scan.conversions())
    assert scan.ignored == {".txt": 1, "hidden": 1}
    assert (scan.files("train").sizes == 32).all()
    first = scan.files("train")
    assert os.path.isfile(first.path(0)) and first.labels[0] == 0
    text = "\n".join(scan.describe())
    for needed in ("10 classes", "digit0 40", "digit9 3", "32x32", "grey and colour are mixed", "passed over: 2",
                   "unreadable files: none"):
        assert needed in text, needed


def test_the_file_list_names_every_kept_image_with_its_label_and_size(tmp_path):
    root = write_image_folder(tmp_path / "d", lists=True, per_class_val=1)
    scan = scan_folder(root)
    rows = [line.split("\t") for line in scan.write_file_list(tmp_path / "files.tsv").read_text().splitlines()]
    assert rows[0] == ["pool", "path", "label", "class", "width", "height"] and len(rows) == 1 + scan.num_images
    listed = [(f"{pool}", line.rsplit(" ", 1)) for pool in ("train", "val", "test")
              for line in (root / f"{pool}.txt").read_text().splitlines()]
    assert [(r[0], [r[1], r[2]]) for r in rows[1:]] == listed  # each pool in its list's order
    assert all(r[3] == f"digit{r[2]}" and r[4:] == ["32", "32"] for r in rows[1:])


def test_every_image_grey_is_read_as_one_channel(tmp_path):
    scan = scan_folder(write_image_folder(tmp_path / "d", grey=True))
    assert scan.modes.keys() == {"L"} and scan.channels == 1 and scan.conversions() == []


def test_the_digest_names_the_file_list_and_changes_with_an_image(tmp_path):
    root = write_image_folder(tmp_path / "d")
    first = scan_folder(root).digest
    assert scan_folder(root).digest == first
    target = root / "train" / "digit5" / sorted(os.listdir(root / "train" / "digit5"))[0]
    stat = os.stat(target)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(target)
    assert scan_folder(root).digest != first
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even at the old time, the bytes differ
    assert scan_folder(root).digest != first


def test_list_files_read_like_imagenet_lt_with_names_from_classes_txt_or_folders(tmp_path):
    root = write_image_folder(tmp_path / "d", lists=True, per_class_val=3)
    scan = scan_folder(root)
    assert scan.layout == "lists" and scan.class_names == tuple(f"digit{c}" for c in range(10))
    np.testing.assert_array_equal(scan.counts("train"), DIGITS_TAIL)
    np.testing.assert_array_equal(scan.counts("val"), [3] * 10)
    (root / "classes.txt").unlink()
    assert scan_folder(root).class_names == tuple(f"digit{c}" for c in range(10))  # the images' folders


def test_a_val_list_is_the_pool_of_tunev_and_val_and_the_test_list_the_test_split(tmp_path):
    scan = scan_folder(write_image_folder(tmp_path / "d", lists=True, per_class_val=5, per_class_test=3))
    source = scan.source("digits-folder")
    splits = make_splits(source, imb_factor=None, tunev_ratio=0.3, val_ratio=0.2, group_thresholds=(20,), seed=0,
                         heldout_test=source.heldout_test)
    np.testing.assert_array_equal(splits.train_counts, DIGITS_TAIL)  # the natural tail, every image
    test_files = source.files("test", splits.indices["test"])
    assert sorted(test_files.paths.tolist()) == sorted(scan.files("test").paths.tolist())
    for split, per_class in (("tunev", 3), ("val", 2)):  # 5 val images: 0.3 : 0.2 of them
        np.testing.assert_array_equal(np.bincount(splits.labels[split], minlength=10), [per_class] * 10)
        assert all(p.startswith(b"images/") and b"/val-" in p for p in source.files(split, splits.indices[split]).paths)
    assert splits.class_to_group.tolist() == [0, 0, 0] + [1] * 7  # tail: at most 20 training images
    unused = scan.source("digits-folder", val_pool=False)
    assert unused.heldout_test is None and len(unused.heldout) == 30


BAD_FOLDERS = {
    "nothing": (lambda root: root.mkdir(), "holds neither train/ and test/"),
    "not a folder": (lambda root: None, "is not a folder"),
    "train list only": (lambda root: (write_image_folder(root, lists=True), (root / "test.txt").unlink()),
                        "has train.txt but no test.txt"),
    "empty class folder": (lambda root: (write_image_folder(root), (root / "train" / "digit9x").mkdir()),
                           "digit9x holds no images"),
    "test class train lacks": (lambda root: (write_image_folder(root), (root / "test" / "zebra").mkdir(),
                                             Image.new("L", (8, 8)).save(root / "test" / "zebra" / "z.png")),
                               "is a class that"),
    "train class test lacks": (lambda root: (write_image_folder(root), _remove(root / "test" / "digit4")),
                               "'digit4' has no folder in"),
    "single class": (lambda root: write_image_folder(root, train_counts=(5,), per_class_test=2),
                     "holds one class (digit0)"),
    "images outside class folders": (lambda root: (write_image_folder(root), Image.new("L", (8, 8)).save(
        root / "train" / "stray.png")), "holds images outside class folders (stray.png)"),
    "list label not an integer": (lambda root: _edit_list(root, "train.txt", 0, lambda line: line.rsplit(" ", 1)[0] + " cat"),
                                  "train.txt line 1: label 'cat' is not a non-negative integer"),
    "list label negative": (lambda root: _edit_list(root, "test.txt", 2, lambda line: line.rsplit(" ", 1)[0] + " -1"),
                            "test.txt line 3: label '-1' is not a non-negative integer"),
    "list label beyond classes.txt": (lambda root: _edit_list(root, "train.txt", 1, lambda line: line.rsplit(" ", 1)[0] + " 10"),
                                      "line 2: label 10, but classes.txt names 10 classes"),
    "list line without a label": (lambda root: _edit_list(root, "train.txt", 4, lambda line: line.rsplit(" ", 1)[0]),
                                  "line 5:"),
    "list names a missing file": (lambda root: _edit_list(root, "train.txt", 6, lambda line: "images/gone.png 0"),
                                  "line 7: " ),
    "list path outside the folder": (lambda root: _edit_list(root, "test.txt", 0, lambda line: "../../etc/passwd 0"),
                                     "test.txt line 1: ../../etc/passwd lies outside"),
    "list absolute path": (lambda root: _edit_list(root, "test.txt", 0, lambda line: "/etc/passwd 0"),
                           "test.txt line 1: /etc/passwd lies outside"),
    "list class without training images": (
        lambda root: _edit_list(root, "train.txt", None, lambda lines: [x for x in lines if not x.endswith(" 9")]),
        "lists no image of class 9 ('digit9')"),
    "list test label train lacks": (
        lambda root: (_edit_list(root, "train.txt", None, lambda lines: [x for x in lines if not x.endswith(" 9")]),
                      (root / "classes.txt").unlink()),
        "a class that train.txt lacks"),
    "list file in train and test": (
        lambda root: _edit_list(root, "test.txt", 0, lambda line: (root / "train.txt").read_text().splitlines()[0]),
        "is listed for train and for test"),
    "unreadable image": (lambda root: (write_image_folder(root), (root / "train" / "digit2" / "broken.png").write_bytes(
        b"not a png")), "digit2/broken.png cannot be read as an image (UnidentifiedImageError)"),
}


def _remove(folder):
    for name in os.listdir(folder):
        os.remove(folder / name)
    folder.rmdir()


def _edit_list(root, name, line, change):
    if not (root / name).exists():
        write_image_folder(root, lists=True)
    rows = (root / name).read_text().splitlines()
    if line is None:
        rows = change(rows)
    else:
        rows[line] = change(rows[line])
    (root / name).write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_bad_folder_is_one_line_saying_what_is_wrong_and_what_to_do(tmp_path, case):
    make, expected = BAD_FOLDERS[case]
    root = tmp_path / "d"
    make(root)
    with pytest.raises(ArgseUsageError) as err:
        scan_folder(root)
    text = _one_line(err)
    assert expected in text, text
    assert ":" in text  # what is wrong: what to do


def test_a_missing_listed_file_is_named_with_how_many_more_are_missing(tmp_path):
    root = write_image_folder(tmp_path / "d", lists=True)
    rows = (root / "train.txt").read_text().splitlines()
    for i in (3, 8):
        os.remove(root / rows[i].rsplit(" ", 1)[0])
    with pytest.raises(ArgseUsageError) as err:
        scan_folder(root)
    assert f"train.txt line 4: {root / rows[3].rsplit(' ', 1)[0]} does not exist (nor do 1 more" in _one_line(err)


def test_unreadable_images_are_left_out_and_counted_when_the_card_says_so(tmp_path):
    root = write_image_folder(tmp_path / "d")
    (root / "train" / "digit2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "train" / "digit2" / "empty.jpg").write_bytes(b"")
    strict = None
    with pytest.raises(ArgseUsageError) as err:
        strict = scan_folder(root)
    assert strict is None and "nor can 1 more file(s)" in _one_line(err)
    scan = scan_folder(root, skip_unreadable=True)
    assert sorted(u.path for u in scan.unreadable) == ["train/digit2/broken.png", "train/digit2/empty.jpg"]
    assert scan.counts("train")[2] == DIGITS_TAIL[2]
    assert "left out (skip_unreadable): 2 unreadable file(s)" in "\n".join(scan.describe())
    (root / CARD_NAME).write_text("skip_unreadable: true\ngroup_thresholds: 20\n")
    dataset = folder_dataset(root, "digits-folder")
    assert dataset.options.skip_unreadable and len(dataset.scan.unreadable) == 2


def test_storage_is_memory_when_the_decoded_images_fit_and_stream_otherwise(tmp_path):
    scan = scan_folder(write_image_folder(tmp_path / "d"))
    need = scan.num_images * 64 * 64 * 3
    assert scan.decoded_bytes(64) == need
    assert scan.storage(64, available=2 * need).kind == "memory"
    assert scan.storage(64, available=2 * need - 1).kind == "stream"
    assert scan.storage(64, available=2 * need, copies=3).kind == "stream"  # three experts, three copies
    assert scan.storage(64, available=10, choice="memory").kind == "memory"
    with pytest.raises(ArgseUsageError, match="choose one of auto, memory, stream"):
        scan.storage(64, choice="disk")


# -- the card and the preset ---------------------------------------------------------------------------


def test_the_card_keys_are_the_preset_fields_the_folder_does_not_fix():
    fields = [f for f in DatasetPreset.__dataclass_fields__ if f not in FROM_FOLDER]
    assert list(CARD_PRESET_KEYS) == fields


def test_without_a_card_a_folder_gets_the_cifar_recipe_with_its_natural_tail_and_size(tmp_path):
    dataset = folder_dataset(write_image_folder(tmp_path / "mine"))
    p, base = dataset.preset, PRESETS["cifar100-lt"]
    assert (p.name, p.source, p.num_classes, p.image_shape, p.imb_factor) == ("mine", "folder", 10, (32, 32, 3), None)
    assert (p.backbone, p.augmentation) == ("resnet32", "cifar")  # 32x32: the CIFAR network and recipe
    for key in ("tunev_ratio", "val_ratio", "group_thresholds", "epochs", "batch_size", "lr", "warmup_epochs",
                "gating_epochs", "gating_batch_size"):
        assert getattr(p, key) == getattr(base, key), key
    assert dataset.card_path is None and dataset.storage.kind == "memory"
    np.testing.assert_array_equal(dataset.train_counts(), DIGITS_TAIL)
    text = "\n".join(dataset.describe())
    for needed in ("card: none", "the natural long tail kept: 40 to 3 per class", "groups at 20: head 3 classes "
                   "(92 images), tail 7 classes (56 images)", "images held in memory"):
        assert needed in text, needed


def test_large_images_default_to_resnet18_random_resized_crops_and_at_most_224(tmp_path):
    root = write_image_folder(tmp_path / "d", size=72, train_counts=(25, 5), per_class_test=1, grey=True)
    p = folder_dataset(root, "big").preset
    assert (p.image_shape, p.backbone, p.augmentation) == ((72, 72, 1), "resnet18", "natural")


def test_the_card_sets_preset_fields_by_name_and_how_the_folder_is_read(tmp_path):
    root = write_image_folder(tmp_path / "d", lists=True, per_class_val=2)
    (root / CARD_NAME).write_text("# ImageNet-LT-like\nimage_size: 48\nbackbone: resnet50\nepochs: 90\nlr: 1e-1\n"
                                  "imb_factor: 5\ngroup_thresholds: [2, 1]\nstorage: stream\nval_pool: no\n")
    dataset = folder_dataset(root, "lt")
    p = dataset.preset
    assert (p.image_shape, p.backbone, p.augmentation, p.epochs, p.lr, p.imb_factor, p.group_thresholds) == (
        (48, 48, 3), "resnet50", "natural", 90, 0.1, 5.0, (2, 1))
    assert dataset.options.storage == "stream" and dataset.options.val_pool is False
    assert dataset.storage.kind == "stream" and sorted(dataset.card) == sorted(
        ["image_size", "backbone", "epochs", "lr", "imb_factor", "group_thresholds", "storage", "val_pool"])
    # drawn at IF 5 from the smallest class's 3: floor(3 * 5 ** (-c / 9))
    np.testing.assert_array_equal(dataset.train_counts(), [3, 2, 2, 1, 1, 1, 1, 1, 1, 1])


BAD_CARDS = {
    "unknown key": ("epoch: 3\n", "unknown key 'epoch'; the card's keys are image_size, backbone"),
    "not a number": ("lr: fast\n", "lr 'fast' is not a number"),
    "not an integer": ("epochs: 2.5\n", "epochs 2.5 is not an integer"),
    "bad choice": ("backbone: vgg\n", "backbone 'vgg': choose one of resnet32"),
    "imbalance below 1": ("imb_factor: 0.5\n", "imb_factor 0.5 must be >= 1 (1: balanced), or natural"),
    "thresholds increasing": ("group_thresholds: 5,10\n", "group_thresholds '5,10' must be positive integers"),
    "no tail": ("group_thresholds: 2\n", "group_thresholds 2 leaves a group without classes (the classes have 3 to 40"),
    "not yaml": ("epochs: [3\n", "is not valid YAML"),
    "not a mapping": ("- epochs\n", "must hold `key: value` lines, not a list"),
    "tiny image size": ("image_size: 4\n", "image_size 4 is too small"),
}


@pytest.mark.parametrize("case", BAD_CARDS)
def test_a_bad_card_is_one_line_naming_the_card_and_the_key(tmp_path, case):
    text, expected = BAD_CARDS[case]
    root = write_image_folder(tmp_path / "d")
    (root / CARD_NAME).write_text(text)
    with pytest.raises(ArgseUsageError) as err:
        folder_dataset(root, "mine")
    assert expected in _one_line(err)


@pytest.mark.parametrize("name, expected", [("cifar100-lt", "is a built-in dataset"), ("my data", "use letters")])
def test_a_folder_dataset_name_must_be_new_and_plain(tmp_path, name, expected):
    with pytest.raises(ArgseUsageError, match=expected):
        folder_dataset(tmp_path, name)


# -- reading images ------------------------------------------------------------------------------------


def test_read_image_cuts_the_centre_square_and_resizes_as_pillow_does(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = Image.fromarray(pixels)
    centre = read_image(str(tmp_path / "a.png"), 32, 3)
    np.testing.assert_array_equal(centre, np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR, box=(8, 0, 56, 48))))
    # Inside, the same as cutting first and resizing then; at the edges the filter also reads the
    # pixels just outside the box, where a cut image repeats its edge.
    cut = np.asarray(image.crop((8, 0, 56, 48)).resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(centre[1:-1, 1:-1], cut[1:-1, 1:-1])
    box = (5, 10, 20, 30)  # top, left, height, width
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.png"), 16, 3, box), np.asarray(
        image.resize((16, 16), Image.Resampling.BILINEAR, box=(10, 5, 40, 25))))
    grey = read_image(str(tmp_path / "a.png"), 32, 1)
    assert grey.shape == (32, 32, 1)
    with open(tmp_path / "a.png", "rb") as fh:  # encoded bytes, as a server receives them
        assert np.array_equal(read_image(io.BytesIO(fh.read()), 32, 3), centre)


def test_grey_is_repeated_over_rgb_and_16_bit_grey_is_scaled_to_8_bits(tmp_path):
    values = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    grey = read_image(str(tmp_path / "deep.png"), 32, 1)[..., 0]
    np.testing.assert_array_equal(grey, (values >> 8).astype(np.uint8))
    rgb = read_image(str(tmp_path / "deep.png"), 32, 3)
    assert (rgb == grey[..., None]).all()


def test_large_jpegs_are_decoded_at_a_reduced_scale_close_to_a_full_decode(tmp_path):
    y, x = np.mgrid[0:400, 0:600]
    pixels = np.stack([x * 255 // 600, y * 255 // 400, (x + y) * 255 // 1000], -1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    fast = read_image(str(tmp_path / "big.jpg"), 64, 3).astype(float)
    with Image.open(tmp_path / "big.jpg") as image:
        full = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR, box=(100, 0, 500, 400)))
    assert np.abs(fast - full).mean() < 2.0


def test_a_damaged_file_found_when_decoding_is_one_line_naming_it(tmp_path):
    root = write_image_folder(tmp_path / "d", suffix=".jpg")
    target = root / "test" / "digit1" / "noise.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(target)
    target.write_bytes(target.read_bytes()[:2000])  # the header reads, the data is cut short
    scan = scan_folder(root)
    with pytest.raises(ArgseError) as err:
        decode_images(scan.files("test"), 32, 3)
    assert str(target) in _one_line(err) and "replace or remove it" in str(err.value)


# -- random resized crops ------------------------------------------------------------------------------


def test_resized_crop_boxes_follow_torchvisions_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    n = 4000
    ours = random_resized_crop_boxes(torch.full((n,), 48), torch.full((n,), 64), torch.Generator().manual_seed(0))
    top, left, h, w = ours.T.double()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 48).all() and (left + w <= 64).all()
    torch.manual_seed(0)
    image = torch.zeros(3, 48, 64)
    theirs = torch.tensor([RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]).double()
    for column in range(4):  # the same distribution: means within a few standard errors
        a, b = ours[:, column].double(), theirs[:, column]
        assert abs(a.mean() - b.mean()) < 4 * math.sqrt((a.var() + b.var()) / n), column
    # An image too narrow for any try: both fall back to the centred box of the nearest allowed ratio.
    fallback = random_resized_crop_boxes([100], [2], torch.Generator().manual_seed(1))
    assert tuple(fallback[0].tolist()) == RandomResizedCrop.get_params(torch.zeros(1, 100, 2), (0.08, 1.0), (3 / 4, 4 / 3))


def test_resized_crop_of_the_whole_image_is_the_image_and_of_a_half_is_a_bilinear_upscale():
    x = torch.rand(2, 3, 16, 16)
    whole = resized_crop(x, torch.tensor([[0, 0, 16, 16]] * 2), (16, 16))
    assert torch.allclose(whole, x, atol=1e-5, rtol=0)
    half = resized_crop(x, torch.tensor([[4, 2, 8, 8], [0, 8, 8, 8]]), (16, 16))
    expected = torch.stack([F.interpolate(x[i:i + 1, :, t:t + 8, l:l + 8], size=(16, 16), mode="bilinear",
                                          align_corners=False)[0] for i, (t, l) in enumerate([(4, 2), (0, 8)])])
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # the border samples the cut's neighbours
    assert torch.allclose(half[inner], expected[inner], atol=1e-5, rtol=0)


# -- the two paths, one interface ----------------------------------------------------------------------


def _both(tmp_path, augmentation="natural", workers=0):
    scan = scan_folder(write_image_folder(tmp_path / "d", grey="mixed", suffix=".jpg"))
    files = scan.files("train")
    mean, std = estimate_stats(files, 32, 3)
    streamed = StreamedImages(files, image_size=32, channels=3, mean=mean, std=std, augmentation=augmentation,
                              workers=workers)
    held = DeviceImages(decode_images(files, 32, 3), files.labels, mean=mean, std=std, augmentation=augmentation)
    return files, streamed, held


def test_streamed_and_held_images_give_the_same_evaluation_batches(tmp_path):
    files, streamed, held = _both(tmp_path)
    assert streamed.image_shape == held.image_shape == (3, 32, 32) and len(streamed) == len(held) == len(files)
    for (xs, ys), (xh, yh) in zip(streamed.eval_batches(50), held.eval_batches(50), strict=True):
        assert torch.equal(xs, xh)
        assert torch.equal(ys, yh)
    assert torch.equal(streamed.examples(4), held.examples(4)) and streamed.examples(4).dtype == torch.uint8
    for data in (streamed, held):
        assert data.num_batches(64, drop_last=False) == 3


def test_an_augmented_epoch_visits_every_image_once_and_repeats_from_the_generator_state(tmp_path):
    files, streamed, held = _both(tmp_path)
    for data in (streamed, held):
        runs = []
        for _ in range(2):
            batches = list(data.batches(40, shuffle=True, generator=torch.Generator().manual_seed(3), augment=True,
                                        drop_last=False))
            assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 for x, _ in batches)
            labels = torch.cat([y for _, y in batches])
            assert sorted(labels.tolist()) == sorted(files.labels.tolist())
            runs.append(torch.cat([x for x, _ in batches]))
        assert torch.equal(runs[0], runs[1])
        plain = torch.cat([x for x, _ in data.eval_batches(len(files))])
        assert not torch.allclose(runs[0].mean(0), plain.mean(0))  # augmented: not the plain images


def test_a_natural_epoch_is_each_images_random_box_resized_and_mirrored_as_drawn(tmp_path):
    scan = scan_folder(write_image_folder(tmp_path / "d", train_counts=(6, 5), per_class_test=1, size=40))
    files = scan.files("train")
    data = StreamedImages(files, image_size=24, channels=3, mean=[0.0] * 3, std=[1.0] * 3, augmentation="natural")
    x = torch.cat([x for x, _ in data.batches(4, shuffle=True, generator=torch.Generator().manual_seed(7),
                                              augment=True, drop_last=False)])
    # The epoch's draws, in their documented order: the permutation, the flips, the boxes.
    generator = torch.Generator().manual_seed(7)
    order = torch.randperm(len(files), generator=generator)
    flips = torch.randint(0, 2, (len(files),), generator=generator).bool()
    boxes = random_resized_crop_boxes(torch.full((len(files),), 40), torch.full((len(files),), 40), generator)
    assert flips.any() and not flips.all() and (boxes[:, 2] < 40).any()
    for position, i in enumerate(order.tolist()):
        expected = read_image(files.path(i), 24, 3, boxes[position].tolist())
        expected = expected[:, ::-1] if flips[position] else expected
        produced = torch.round(x[position] * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(produced, expected)
    # Held in memory, the same draws cut the stored 24x24 images on the device.
    stored = decode_images(files, 24, 3)
    held = DeviceImages(stored, files.labels, mean=[0.0] * 3, std=[1.0] * 3, augmentation="natural")
    x = torch.cat([x for x, _ in held.batches(4, shuffle=True, generator=torch.Generator().manual_seed(7),
                                              augment=True, drop_last=False)])
    generator = torch.Generator().manual_seed(7)
    order = torch.randperm(len(files), generator=generator)
    flips = torch.randint(0, 2, (len(files),), generator=generator).bool()
    boxes = random_resized_crop_boxes(torch.full((len(files),), 24), torch.full((len(files),), 24), generator)
    expected = resized_crop(stored[order].permute(0, 3, 1, 2).float(), boxes, (24, 24)) / 255
    expected = torch.where(flips[:, None, None, None], expected.flip(3), expected)
    assert torch.allclose(x, expected, atol=1e-5, rtol=0)


def test_a_streamed_epoch_is_the_same_decoded_by_worker_processes(tmp_path):
    files, streamed, _ = _both(tmp_path, augmentation="cifar")
    workers = StreamedImages(files, image_size=32, channels=3, mean=streamed.mean, std=streamed.std,
                             augmentation="natural", workers=2)
    here = StreamedImages(files, image_size=32, channels=3, mean=streamed.mean, std=streamed.std,
                          augmentation="natural", workers=0)
    for a, b in zip(here.batches(32, shuffle=True, generator=torch.Generator().manual_seed(5), augment=True,
                                 drop_last=True, rank=1, world_size=2),
                    workers.batches(32, shuffle=True, generator=torch.Generator().manual_seed(5), augment=True,
                                    drop_last=True, rank=1, world_size=2), strict=True):
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[1], b[1])
    # Padded-crop augmentations run on the device for streamed batches as for held ones.
    x, _ = next(streamed.batches(16, shuffle=False, generator=torch.Generator().manual_seed(0), augment=True,
                                 drop_last=False))
    assert x.shape == (16, 3, 32, 32)


# -- backbones for photographs -------------------------------------------------------------------------


def test_torchvision_resnets_build_for_any_class_count_and_channels():
    model = build_backbone("resnet18", 7, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 7)
    resnet50 = build_backbone("resnet50", 3)
    assert resnet50.conv1.in_channels == 3 and resnet50.fc.out_features == 3 and resnet50.fc.in_features == 2048
    assert build_backbone("resnet32", 5, in_channels=1).conv1.in_channels == 1


def test_local_weights_load_with_a_new_classifier_and_a_grey_stem(tmp_path):
    trained = build_backbone("resnet18", 1000)
    torch.save({"model": {"module." + k: v for k, v in trained.state_dict().items()}}, tmp_path / "w.pt")
    model = build_backbone("resnet18", 10, in_channels=1)
    head = model.fc.weight.detach().clone()
    notes = load_weights(model, pretrained_state_dict("resnet18", str(tmp_path / "w.pt")))
    assert len(notes) == 2 and any("classifier fc kept" in n for n in notes) and any("conv1.weight" in n for n in notes)
    assert torch.allclose(model.conv1.weight, trained.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer3[1].conv2.weight, trained.layer3[1].conv2.weight)
    assert torch.equal(model.fc.weight, head)
    same = build_backbone("resnet18", 1000)
    assert load_weights(same, trained.state_dict()) == []
    assert torch.equal(same.fc.weight, trained.fc.weight)


def test_weights_that_do_not_fit_or_are_not_weights_are_one_line(tmp_path):
    torch.save(build_backbone("resnet32", 10).state_dict(), tmp_path / "cifar.pt")
    with pytest.raises(ArgseUsageError, match="the weights do not fit ResNet"):
        load_weights(build_backbone("resnet18", 10), pretrained_state_dict("resnet18", str(tmp_path / "cifar.pt")))
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(ArgseUsageError, match="not a torch state dict"):
        pretrained_state_dict("resnet18", str(tmp_path / "notes.pt"))
    with pytest.raises(ArgseUsageError, match="no such file, nor weights of torchvision's resnet50: give a state dict"):
        pretrained_state_dict("resnet50", "IMAGENET9K")
    with pytest.raises(ArgseUsageError, match="torchvision publishes no weights of the resnet32"):
        pretrained_state_dict("resnet32", "missing.pt")


def test_torchvision_weight_names_resolve_without_downloading():
    from torchvision.models import ResNet18_Weights, ResNet50_Weights

    assert torchvision_weights("resnet50", "IMAGENET1K_V2") is ResNet50_Weights.IMAGENET1K_V2
    assert torchvision_weights("resnet50", "ResNet50_Weights.DEFAULT") is ResNet50_Weights.DEFAULT
    assert torchvision_weights("resnet18", "IMAGENET1K_V1") is ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(ArgseUsageError):
        torchvision_weights("resnet18", "ResNet50_Weights.IMAGENET1K_V1")
