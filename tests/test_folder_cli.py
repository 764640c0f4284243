"""Users' own images through the CLI: every bad folder, list file or card is one line on stderr, exit
2, before any run is created; grey and colour mixed and files left out are said by the dry run; an
image whose header reads but whose pixels do not fails where it is decoded, naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from PIL import Image

from argse import ArgseError
from argse.data.folder import scan_folder
from argse.data.stream import decode_images
from argse.dataset_card import CARD_NAME
from argse.presets import PRESETS

SIZE = 8  # pixels a side: the scan reads headers only, so the images' size is all their cost
TAIL = (12, 9, 7, 5, 4, 3)  # train images per class: groups at 20 are all tail, so the card sets 6


@pytest.fixture(scope="module")
def _written(tmp_path_factory):
    """Each folder layout written once for the module; tests copy it."""
    made: dict = {}

    def write(**kwargs):
        key = repr(sorted(kwargs.items()))
        if key not in made:
            made[key] = datasets.write_image_folder(tmp_path_factory.mktemp("folder"), **{
                "train_counts": TAIL, "per_class_test": 3, "size": SIZE, **kwargs})
        return made[key]

    return write


@pytest.fixture
def folder(_written, tmp_path):
    """``folder(**kwargs)``: a fresh copy of ``write_image_folder(...)`` at ``tmp_path/mine``, with a card
    that puts the group threshold inside the class counts (the defaults' 20 would leave no head)."""

    def make(card: str = "group_thresholds: 6\n", **kwargs) -> Path:
        root = tmp_path / "mine"
        shutil.copytree(_written(**kwargs), root)
        if card:
            (root / CARD_NAME).write_text(card)
        return root

    return make


def _all_runs(uri: str) -> list:
    """Every run in the store at ``uri`` (deleted ones too); none when the store was never created."""
    if not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(experiments, run_view_type=ViewType.ALL)


def _one_usage_line(result, store) -> str:
    """The one line a refused command printed, after checking it exited 2 and created no run."""
    assert result.code == 2, (result.code, result.out, result.err)
    assert "Traceback" not in result.out + result.err
    assert result.out == "", result.out
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].strip() != "error:", result.err
    assert _all_runs(store) == []
    return lines[0]


def _rewrite_line(root: Path, name: str, line: int, text: str) -> None:
    rows = (root / name).read_text().splitlines()
    rows[line] = text
    (root / name).write_text("\n".join(rows) + "\n")


def _no_train(root: Path) -> str:
    shutil.rmtree(root / "train")
    return f"{root} holds neither train/ and test/ class folders nor train.txt and test.txt"


def _no_test(root: Path) -> str:
    shutil.rmtree(root / "test")
    return f"{root} holds neither train/ and test/ class folders nor train.txt and test.txt"


def _empty_class(root: Path) -> str:
    for image in (root / "train" / "digit3").iterdir():
        image.unlink()
    return f"{root / 'train' / 'digit3'} holds no images"


def _test_class_train_lacks(root: Path) -> str:
    (root / "test" / "digit9").mkdir()
    shutil.copy(next((root / "test" / "digit0").iterdir()), root / "test" / "digit9" / "extra.png")
    return f"{root / 'test' / 'digit9'} is a class that {root / 'train'} lacks"


def _corrupt_png(root: Path) -> str:
    broken = root / "train" / "digit2" / "broken.png"
    broken.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return f"{broken} cannot be read as an image (UnidentifiedImageError)"


def _no_test_list(root: Path) -> str:
    (root / "test.txt").unlink()
    return f"{root} has train.txt but no test.txt"


def _list_bad_label(root: Path) -> str:
    path = (root / "train.txt").read_text().splitlines()[2].rsplit(" ", 1)[0]
    _rewrite_line(root, "train.txt", 2, f"{path} cat")
    return f"{root / 'train.txt'} line 3: label 'cat' is not a non-negative integer"


def _list_label_beyond_classes(root: Path) -> str:
    path = (root / "test.txt").read_text().splitlines()[0].rsplit(" ", 1)[0]
    _rewrite_line(root, "test.txt", 0, f"{path} 6")
    return f"{root / 'test.txt'} line 1: label 6, but classes.txt names 6 classes"


def _list_missing_file(root: Path) -> str:
    _rewrite_line(root, "train.txt", 4, "images/digit1/gone.png 1")
    return f"{root / 'train.txt'} line 5: {root / 'images' / 'digit1' / 'gone.png'} does not exist"


def _list_path_outside(root: Path) -> str:
    Image.new("RGB", (SIZE, SIZE)).save(root.parent / "outside.png")  # it exists: refused for where it lies
    _rewrite_line(root, "test.txt", 1, "../outside.png 0")
    return f"{root / 'test.txt'} line 2: ../outside.png lies outside {root}"


BAD_FOLDERS = {
    "no train folder": ({}, _no_train),
    "no test folder": ({}, _no_test),
    "an empty class folder": ({}, _empty_class),
    "a test class train lacks": ({}, _test_class_train_lacks),
    "a single class": ({"train_counts": (5,)}, lambda root: f"{root / 'train'} holds one class (digit0)"),
    "a corrupt png": ({}, _corrupt_png),
    "a train list without a test list": ({"lists": True}, _no_test_list),
    "a list label that is not a number": ({"lists": True}, _list_bad_label),
    "a list label beyond classes.txt": ({"lists": True}, _list_label_beyond_classes),
    "a listed file that is missing": ({"lists": True}, _list_missing_file),
    "a listed path outside the folder": ({"lists": True}, _list_path_outside),
    # 2 held-out images a class: round(0.3 * 2) = 1 for tunev, round(0.2 * 2) = 0 for val in every class
    "too few held-out images for val": ({"per_class_test": 2}, lambda root: (
        f"{root}: the val split would be empty: 2 to 2 held-out images per class are too few")),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_bad_folder_is_one_line_exit_2_naming_the_path_and_no_run(store, cli, folder, case):
    kwargs, damage = BAD_FOLDERS[case]
    root = folder(**kwargs)
    expected = damage(root)
    line = _one_usage_line(cli("splits", "--dataset", "mine", "--data-dir", root), store)
    assert expected in line, line


@pytest.mark.parametrize("data_dir", [None, "missing", "a-file"])
def test_a_name_that_is_no_preset_without_a_folder_names_the_presets_and_data_dir(store, cli, tmp_path, data_dir):
    (tmp_path / "a-file").write_text("not a folder")
    args = ("splits", "--dataset", "mine") + (("--data-dir", tmp_path / data_dir) if data_dir else ())
    line = _one_usage_line(cli(*args), store)
    given = str(tmp_path / data_dir) if data_dir else "data"  # the default --data-dir, absent in the cwd
    assert line.startswith(f"error: unknown dataset 'mine': choose one of {', '.join(PRESETS)}"), line
    assert "--data-dir" in line and f"{given!r} is not a folder" in line, line


BAD_CARDS = {
    "epochs zero": ("epochs: 0\n", "epochs 0 must be at least 1"),
    "negative lr": ("lr: -1\n", "lr -1 must be above 0"),
    "unknown key": ("learning_rate: 0.1\n", "unknown key 'learning_rate'; the card's keys are"),
    "bad yaml": ("epochs: [3\n", "is not valid YAML"),
    "bad storage": ("storage: disk\n", "storage 'disk': choose one of auto, memory, stream"),
    "skip_unreadable not a bool": ("skip_unreadable: perhaps\n", "skip_unreadable 'perhaps' is not true or false"),
}


@pytest.mark.parametrize("case", BAD_CARDS)
def test_a_bad_card_value_is_one_line_exit_2_naming_the_card_and_no_run(store, cli, folder, case):
    card, expected = BAD_CARDS[case]
    root = folder(card=card)
    line = _one_usage_line(cli("splits", "--dataset", "mine", "--data-dir", root), store)
    assert f"{root / CARD_NAME}" in line and expected in line, line


def test_grey_and_colour_mixed_are_converted_and_the_dry_run_says_so(store, cli, folder):
    root = folder(grey="mixed")
    grey = sum(Image.open(p).mode == "L" for p in root.rglob("*.png"))
    assert 0 < grey < len(list(root.rglob("*.png")))  # the folder does mix them
    result = cli("splits", "--dataset", "mine", "--data-dir", root, "--dry-run")
    assert result.code == 0, result.err
    assert "Traceback" not in result.out + result.err
    assert f"read as RGB, 3 channels; grey and colour are mixed: {grey} grey images are converted to RGB" in result.out
    assert _all_runs(store) == []


def test_skip_unreadable_in_the_card_counts_and_names_the_corrupt_file_in_the_dry_run(store, cli, folder):
    root = folder(card="group_thresholds: 6\nskip_unreadable: true\n")
    _corrupt_png(root)
    result = cli("splits", "--dataset", "mine", "--data-dir", root, "--dry-run")
    assert result.code == 0, result.err
    assert ("left out (skip_unreadable): 1 unreadable file(s): train/digit2/broken.png (UnidentifiedImageError)"
            in result.out), result.out
    assert f"card: {root / CARD_NAME} (group_thresholds, skip_unreadable)" in result.out
    assert f"6 classes; images train {sum(TAIL)}, test 18" in result.out  # the broken file not among them
    assert _all_runs(store) == []


def _truncated_jpeg(root: Path) -> Path:
    """A JPEG in the train pool whose header reads and whose data is cut short."""
    target = root / "train" / "digit0" / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(target)
    target.write_bytes(target.read_bytes()[:1500])
    return target


def test_a_truncated_jpeg_passes_the_scan_and_fails_its_decode_naming_the_file(store, cli, folder):
    root = folder()
    target = _truncated_jpeg(root)
    result = cli("splits", "--dataset", "mine", "--data-dir", root, "--dry-run")
    assert result.code == 0, result.err
    assert "unreadable files: none" in result.out
    files = scan_folder(root).files("train")
    with pytest.raises(ArgseError) as err:
        decode_images(files, SIZE, 3)
    text = str(err.value)
    assert "\n" not in text and str(target) in text, text


def test_a_truncated_jpeg_fails_the_experts_stage_in_one_line_naming_the_file(store, cli, folder):
    root = folder()
    target = _truncated_jpeg(root)
    assert cli("splits", "--dataset", "mine", "--data-dir", root).code == 0
    result = cli("experts", "--dataset", "mine", "--data-dir", root, "--expert", "ce", "--epochs", "1")
    assert result.code == 1, (result.code, result.err)
    assert "Traceback" not in result.out + result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0], result.err
    statuses = sorted((r.data.tags.get("argse.stage"), r.info.status) for r in _all_runs(store))
    assert ("experts", "FINISHED") not in statuses and ("splits", "FINISHED") in statuses, statuses
