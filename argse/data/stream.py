"""Images read from their files: decoded in DataLoader worker processes, a whole batch per task.

Two ways to train on a folder's images (:mod:`argse.data.folder` finds them), with one interface
(:class:`argse.data.device.ImageBatches`), so the training loop does not ask which:

* **held in memory** (small images): :func:`decode_images` decodes every image once, at the training
  size, into one uint8 tensor, and :class:`~argse.data.device.DeviceImages` batches and augments it
  on the device as for the built-in datasets;
* **streamed** (:class:`StreamedImages`): every batch is decoded from the files again, in worker
  processes. The main process draws the epoch (the order, and for ``natural`` the resized-crop box of
  each image on its full-size file, from the image sizes the scan read); each worker task decodes one
  batch's files, cuts and resizes each to the training size in one Pillow call (``Image.resize`` with
  a box; JPEGs much larger than needed are decoded at 1/2, 1/4 or 1/8 scale first, ``Image.draft``),
  mirrors those the epoch flips, and returns one tensor per batch. For a GPU it is the uint8
  ``[B, S, S, C]`` batch (a quarter of float32's bytes to copy), and padded crops (the small-image
  augmentations) and the normalisation run on the GPU; for the CPU the workers do those too and
  return the finished float batch, so the training process does no per-batch work or allocation.
  Memory stays bounded whatever the folder's size: the file list is a few numpy arrays (no Python
  object per file, so forked workers do not copy it page by page) and at most ``workers x prefetch``
  batches are in flight.

The deterministic view (evaluation, and what the in-memory path stores): the largest centred square
of the image, resized to S x S (bilinear, antialiased). A decode that fails (a file whose header
reads but whose data is damaged) is an :class:`~argse.ArgseError` naming the file.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from argse import ArgseError
from argse.data.device import DeviceImages, ImageBatches, SplitImages, Step, normalize_stats
from argse.data.folder import FolderSource, ImageFiles
from argse.data.splits import EVAL_SPLITS, SPLITS

PREFETCH = 2  # batches each worker decodes ahead
STATS_SAMPLE = 2000  # images the normalisation statistics are estimated from
MODES = {1: "L", 3: "RGB"}


def centre_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square of a ``width`` x ``height`` image: (top, left, side, side)."""
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


def read_image(path: str | BinaryIO, size: int, channels: int, box: Sequence[int] | None = None) -> np.ndarray:
    """The image at ``path`` (or in a binary file object: encoded bytes as a server receives them) as
    uint8 [size, size, channels]: the box (top, left, height, width, in the file's pixels; default:
    :func:`centre_box`) cut and resized to ``size`` x ``size``, bilinear; grey converted to RGB or
    colour to grey as ``channels`` says, 16-bit grey scaled to 8 bits."""
    from PIL import Image

    mode = MODES[channels]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette transparency, large images: converted as they are
        with Image.open(path) as image:
            width, height = image.size
            top, left, h, w = box if box is not None else centre_box(width, height)
            if image.format == "JPEG" and min(h, w) >= 2 * size:
                # Decode at 1/2, 1/4 or 1/8 scale, as large as still gives the box at least `size` pixels.
                scale = size / min(h, w)
                image.draft(mode, (math.ceil(width * scale), math.ceil(height * scale)))
                fx, fy = width / image.size[0], height / image.size[1]
                top, left, h, w = top / fy, left / fx, h / fy, w / fx
            if image.mode.startswith("I;16"):
                image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
            if image.mode != mode:
                image = image.convert(mode)
            out = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
            pixels = np.asarray(out)
    return pixels[..., None] if pixels.ndim == 2 else pixels


class _Decode(Dataset):
    """A worker task is one batch: ``(indices, boxes, flips, step)`` -> ``(batch, failures)``. The images
    are read (cut to ``boxes`` and mirrored where ``flips`` says, when given) into one uint8
    [B, S, S, C] batch; with a ``step``, ``finisher.finish`` then augments and normalises it there."""

    def __init__(self, files: ImageFiles, size: int, channels: int, finisher: ImageBatches | None = None) -> None:
        self.files, self.size, self.channels, self.finisher = files, size, channels, finisher

    def __len__(self) -> int:  # tasks come from the sampler; this is only the file count
        return len(self.files)

    def __getitem__(self, task: tuple) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        indices, boxes, flips, step = task
        out = np.zeros((len(indices), self.size, self.size, self.channels), dtype=np.uint8)
        failures = []
        for row, i in enumerate(indices):
            path = self.files.path(int(i))
            try:
                pixels = read_image(path, self.size, self.channels, None if boxes is None else boxes[row])
                out[row] = pixels[:, ::-1] if flips is not None and flips[row] else pixels
            except Exception as exc:  # a damaged file: reported by the main process, with its path
                failures.append((path, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]))
        batch = torch.from_numpy(out)
        if step is not None and not failures:
            batch = self.finisher.finish(batch, step)
        return batch, failures


#: glibc's M_MMAP_THRESHOLD (malloc.h): allocations from this size up are mapped and unmapped on their own.
_M_MMAP_THRESHOLD = -3
WORKER_MMAP_THRESHOLD = 1 << 20


def _worker_start(worker_id: int) -> None:
    """In each worker process (glibc only): allocations of 1 MiB or more (the batch buffers) are
    mapped and returned on their own. glibc otherwise raises that threshold to the size of the last
    buffer freed and serves such buffers from its heap, where small allocations in between split them;
    the heap then grew by hundreds of MB over an epoch (measured with bench/folder_stream.py)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its allocator's own policy stands
        pass


def _read_batches(files: ImageFiles, size: int, channels: int, tasks: list, workers: int,
                  finisher: ImageBatches | None = None, pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """The batch of each task, in order, made by ``workers`` processes (0: this one)."""
    loader = DataLoader(_Decode(files, size, channels, finisher), batch_size=None, sampler=tasks,
                        num_workers=workers, prefetch_factor=PREFETCH if workers else None, pin_memory=pin_memory,
                        worker_init_fn=_worker_start if workers else None)
    for batch, failures in loader:
        if failures:
            path, reason = failures[0]
            raise ArgseError(f"{path} cannot be decoded ({reason}): replace or remove it"
                             + (f" (and {len(failures) - 1} more file(s) of its batch)" if len(failures) > 1 else ""))
        yield batch


def decode_images(files: ImageFiles, size: int, channels: int, *, workers: int = 0,
                  batch_size: int = 256) -> torch.Tensor:
    """Every image once, the deterministic view at ``size``: uint8 [N, size, size, channels] (the
    in-memory path, handed to :class:`~argse.data.device.DeviceImages`)."""
    images = torch.empty((len(files), size, size, channels), dtype=torch.uint8)
    tasks = [(np.arange(start, min(start + batch_size, len(files))), None, None, None)
             for start in range(0, len(files), batch_size)]
    for (indices, *_), batch in zip(tasks, _read_batches(files, size, channels, tasks, workers)):
        images[indices[0]:indices[-1] + 1] = batch
    return images


def estimate_stats(files: ImageFiles, size: int, channels: int, *, workers: int = 0, sample: int = STATS_SAMPLE,
                   seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of a fixed random sample of ``sample`` images (all,
    when there are fewer) in the deterministic view: the streamed path's normalisation."""
    count = min(sample, len(files))
    chosen = np.sort(np.random.default_rng(seed).choice(len(files), size=count, replace=False))
    return normalize_stats(decode_images(files.subset(chosen), size, channels, workers=workers))


class StreamedImages(ImageBatches):
    """Training or evaluation batches decoded from image files by ``workers`` DataLoader processes
    (0: in this process); the same interface as :class:`~argse.data.device.DeviceImages`.

    ``files``: the images and labels (:meth:`argse.data.folder.FolderSource.files`); ``image_size``:
    the side S of every batch's images; ``channels``: 1 (grey) or 3 (RGB); the rest as
    :class:`~argse.data.device.ImageBatches`. A ``natural`` epoch's boxes are cut from the files and
    its flips made as they are read. On a GPU, uint8 batches are pinned, copied asynchronously, and
    augmented and normalised there; on the CPU the workers augment and normalise them too (the main
    process, which trains, then only receives finished batches and allocates nothing per batch: the
    float batches it made itself split glibc's heap, which grew by hundreds of MB over an epoch).
    """

    def __init__(
        self,
        files: ImageFiles,
        *,
        image_size: int,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        augmentation: str,
        workers: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool | None = None,
    ) -> None:
        if channels not in MODES:
            raise ValueError(f"channels must be 1 or 3; got {channels}.")
        if image_size < 1 or workers < 0:
            raise ValueError(f"image_size must be >= 1 and workers >= 0; got {image_size} and {workers}.")
        if len(files) == 0:
            raise ValueError("files must hold at least one image; got none.")
        super().__init__(files.labels, channels=channels, mean=mean, std=std, augmentation=augmentation,
                         device=device, channels_last=channels_last)
        self.files = files
        self.image_size = image_size
        self.channels = channels
        self.workers = workers

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def examples(self, count: int) -> torch.Tensor:
        return decode_images(self.files.subset(np.arange(min(count, len(self)))), self.image_size, self.channels)

    def _source_sizes(self, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = torch.from_numpy(self.files.sizes)[order]
        return sizes[:, 1], sizes[:, 0]

    def _batches(self, steps: list[Step]) -> Iterator[torch.Tensor]:
        tasks, rest = [], []
        for step in steps:
            if step.boxes is not None:  # cut and mirrored where the file is read
                read, step = (step.boxes, step.flips), Step(step.index, step.padding, step.offsets)
            else:
                read = (None, None)
            tasks.append((step.index, *read, step if self.device.type == "cpu" else None))
            rest.append(step)
        if self.device.type == "cpu":
            yield from _read_batches(self.files, self.image_size, self.channels, tasks, self.workers, finisher=self)
            return
        batches = _read_batches(self.files, self.image_size, self.channels, tasks, self.workers, pin_memory=True)
        for step, batch in zip(rest, batches):
            yield self.finish(batch.to(self.device, non_blocking=True), step)


def folder_split_images(splits, source: FolderSource, *, image_size: int, channels: int, augmentation: str,
                        stream: bool, device: torch.device, channels_last: bool, workers: int) -> SplitImages:
    """The images ``splits`` index in a folder (refused when the folder is not the one they were drawn
    from), as :func:`argse.data.device.split_images` gives a built-in dataset's: held in memory
    (decoded once at ``image_size``, then batched on ``device``) or, with ``stream``, decoded again
    for every batch by ``workers`` processes. Normalised with the train images' statistics (streamed:
    estimated from a fixed sample of them)."""
    splits.check_source(source)
    files = {split: source.files(split, splits.indices[split]) for split in SPLITS}
    if stream:
        mean, std = estimate_stats(files["train"], image_size, channels, workers=workers)

        def holder(split: str, aug: str) -> ImageBatches:
            return StreamedImages(files[split], image_size=image_size, channels=channels, mean=mean, std=std,
                                  augmentation=aug, workers=workers, device=device, channels_last=channels_last)
    else:
        pixels = {split: decode_images(f, image_size, channels, workers=workers) for split, f in files.items()}
        mean, std = normalize_stats(pixels["train"])

        def holder(split: str, aug: str) -> ImageBatches:
            return DeviceImages(pixels[split], splits.labels[split], mean=mean, std=std, augmentation=aug,
                                device=device, channels_last=channels_last)

    return SplitImages(holder("train", augmentation), {split: holder(split, "none") for split in EVAL_SPLITS})


def split_pixels(splits, source, split: str, count: int | None, image_shape: tuple[int, int, int]) -> np.ndarray:
    """The first ``count`` images of ``split`` (None: all) as uint8 [n, H, W, C] in the deterministic view (what a
    served model is sent): indexed in a built-in dataset's arrays, or decoded from a folder's files."""
    splits.check_source(source)
    if not isinstance(source, FolderSource):
        return splits.images(source, split)[:count]
    files = source.files(split, splits.indices[split][:count])
    return decode_images(files, image_shape[0], image_shape[2]).numpy()


def default_workers() -> int:
    """Decoding processes for streaming: one per CPU core this process may use, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


__all__ = ["StreamedImages", "centre_box", "decode_images", "default_workers", "estimate_stats", "folder_split_images",
           "read_image", "split_pixels"]
