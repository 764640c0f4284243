"""Training images held on the training device, batched and augmented there
(docs/design.md, *Batches on the device*).

A ``DeviceImages`` keeps one uint8 tensor of the images in NHWC layout and the labels on the device.
Each batch is gathered, augmented, converted to float and normalised on the device with a handful of
vectorised tensor operations; there is no per-sample Python, no PIL and no DataLoader worker.

:class:`ImageBatches` is what the training loop reads: ``batches`` (one augmented epoch),
``eval_batches``, ``num_batches``, ``labels``, ``mean`` / ``std`` and ``examples``. ``DeviceImages``
is one; :class:`argse.data.stream.StreamedImages`, which decodes images from files in DataLoader
worker processes, is the other. Both draw an epoch's random numbers here (a :class:`Step` per
batch) and augment and normalise a uint8 batch here (:meth:`ImageBatches.finish`); they differ in
where a batch's pixels come from (and a streamed ``natural`` epoch cuts its boxes from the files).

Augmentations:

* ``"cifar"``: random crop with 4-pixel zero padding and random horizontal flip (the CIFAR recipe;
  the same distribution as torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``).
* ``"digits"``: random shift of up to 1 pixel in each direction (1-pixel zero padding and crop),
  no flip.
* ``"fashion"``: random crop with 2-pixel zero padding and random horizontal flip, for 28x28
  Fashion-MNIST (a mirrored garment or shoe still belongs to its class).
* ``"natural"``: random resized crop (torchvision's ``RandomResizedCrop``: area 8-100%, aspect ratio
  3/4-4/3, bilinear, the same sampling of boxes, :func:`random_resized_crop_boxes`) and random
  horizontal flip, for photographs. Held on the device, the box is cut from the stored image; streamed,
  from the image file at its full size.
* ``"none"``: no augmentation.

All the random numbers of an epoch (the permutation, the crop offsets or boxes and the flips) are
drawn at once on the CPU from the given ``torch.Generator`` and moved to the device, so an epoch is
reproducible from the generator's state and is the same on CPU and CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from argse.data.loaders import SourceData
from argse.data.splits import EVAL_SPLITS, Splits

AUGMENTATIONS = ("cifar", "digits", "fashion", "natural", "none")
#: torchvision's ``RandomResizedCrop`` defaults: the box's share of the image's area, its aspect ratio.
RESIZED_CROP_SCALE = (0.08, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)
RESIZED_CROP_TRIES = 10


@dataclass(frozen=True)
class _AugmentSpec:
    padding: int
    flip: bool
    resized_crop: bool = False


_SPECS = {
    "cifar": _AugmentSpec(padding=4, flip=True),
    "digits": _AugmentSpec(padding=1, flip=False),
    "fashion": _AugmentSpec(padding=2, flip=True),
    "natural": _AugmentSpec(padding=0, flip=True, resized_crop=True),
    "none": _AugmentSpec(padding=0, flip=False),
}


def normalize_stats(
    images_uint8: np.ndarray | torch.Tensor,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images [N, H, W, C], in [0, 1] units.

    Images [N, H, W] are treated as one channel.
    """
    images = _as_uint8_nhwc(images_uint8)
    channels = images.shape[-1]
    flat = images.reshape(-1, channels)
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    chunk = 1 << 20
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk].to(torch.float64)
        total += part.sum(dim=0)
        total_sq += (part * part).sum(dim=0)
    count = float(flat.shape[0])
    mean = total / count
    var = torch.clamp(total_sq / count - mean * mean, min=0.0)
    std = torch.sqrt(var)
    return tuple((mean / 255.0).tolist()), tuple((std / 255.0).tolist())


def random_resized_crop_boxes(
    heights: torch.Tensor | Sequence[int],
    widths: torch.Tensor | Sequence[int],
    generator: torch.Generator | None = None,
    *,
    scale: tuple[float, float] = RESIZED_CROP_SCALE,
    ratio: tuple[float, float] = RESIZED_CROP_RATIO,
) -> torch.Tensor:
    """One random box per image of the given sizes, as torchvision's ``RandomResizedCrop.get_params``
    draws it: up to 10 tries of an area share in ``scale`` and a log-uniform aspect ratio in ``ratio``,
    the first box that fits placed uniformly; when none fits, the whole image clamped to ``ratio``,
    centred. Vectorised: int64 ``[N, 4]`` of (top, left, height, width), drawn on the generator's
    device with a fixed number of draws per image."""
    heights = torch.as_tensor(heights, dtype=torch.float64).flatten()
    widths = torch.as_tensor(widths, dtype=torch.float64).flatten()
    device = generator.device if generator is not None else torch.device("cpu")
    heights, widths = heights.to(device), widths.to(device)
    n = len(heights)
    w, h = torch.zeros(n, dtype=torch.float64, device=device), torch.zeros(n, dtype=torch.float64, device=device)
    found = torch.zeros(n, dtype=torch.bool, device=device)
    for _ in range(RESIZED_CROP_TRIES):  # every try drawn for every image: a fixed number of draws
        target = heights * widths * torch.empty(n, dtype=torch.float64, device=device).uniform_(*scale, generator=generator)
        aspect = torch.exp(torch.empty(n, dtype=torch.float64, device=device).uniform_(
            math.log(ratio[0]), math.log(ratio[1]), generator=generator))
        try_w, try_h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
        take = ~found & (try_w > 0) & (try_w <= widths) & (try_h > 0) & (try_h <= heights)
        w, h = torch.where(take, try_w, w), torch.where(take, try_h, h)
        found |= take
    # The fallback: the whole image, cut to the nearest allowed aspect ratio.
    shape = widths / heights
    narrow, wide = shape < min(ratio), shape > max(ratio)
    fallback_w = torch.where(wide, torch.round(heights * max(ratio)), widths)
    fallback_h = torch.where(narrow, torch.round(widths / min(ratio)), heights)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    place = torch.rand((n, 2), dtype=torch.float64, device=device, generator=generator)
    top = torch.where(found, torch.floor(place[:, 0] * (heights - h + 1)), torch.floor((heights - h) / 2))
    left = torch.where(found, torch.floor(place[:, 1] * (widths - w + 1)), torch.floor((widths - w) / 2))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cut each box (top, left, height, width) from float ``images`` [N, C, H, W] and resize it to
    ``size`` (height, width), bilinear, pixel centres mapped onto pixel centres; one ``grid_sample``."""
    n, _, height, width = images.shape
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros((n, 2, 3), dtype=torch.float32, device=images.device)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, images.shape[1], *size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class Step:
    """One batch of an epoch: its images (positions in the image set) and the augmentation drawn for
    each (crop offsets with their padding, flips, resized-crop boxes); numpy, so a worker process can
    be sent it cheaply."""

    index: np.ndarray  # int64 [B]
    padding: int = 0
    offsets: np.ndarray | None = None  # int64 [B, 2]: row and column of the padded crop
    flips: np.ndarray | None = None  # bool [B]
    boxes: np.ndarray | None = None  # int64 [B, 4]: top, left, height, width of the resized crop


class ImageBatches:
    """A labelled image set that yields normalised (augmented) float32 batches [B, C, H, W] on
    ``device``; what the training loop reads. Subclasses say where a batch comes from
    (:meth:`_batches`); the epoch's random numbers (:class:`Step`) and the augmentation and
    normalisation of a uint8 batch (:meth:`finish`) are here.

    ``labels``: ints [N]; ``channels``: the images' channels; ``mean``/``std``: per channel, in [0, 1]
    units (see ``normalize_stats``); ``augmentation``: one of ``AUGMENTATIONS``. With
    ``channels_last`` (default: on CUDA only) batches carry the channels_last memory format.
    """

    def __init__(
        self,
        labels: np.ndarray | torch.Tensor | Sequence[int],
        *,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        augmentation: str,
        device: torch.device | str = "cpu",
        channels_last: bool | None = None,
    ) -> None:
        if augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"augmentation must be one of {', '.join(AUGMENTATIONS)}; got {augmentation!r}."
            )
        if isinstance(labels, torch.Tensor):
            labels_t = labels.flatten()
        else:
            labels_t = torch.as_tensor(np.asarray(labels)).flatten()
        if labels_t.dtype.is_floating_point or labels_t.dtype == torch.bool:
            raise ValueError(f"labels must be integers; got dtype {labels_t.dtype}.")
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != channels or std_t.numel() != channels:
            raise ValueError(
                f"mean and std need one value per channel ({channels}); "
                f"got {mean_t.numel()} and {std_t.numel()}."
            )
        if not bool(torch.all(std_t > 0)):
            raise ValueError(f"std must be positive for every channel; got {std_t.tolist()}.")
        self.device = torch.device(device)
        self.augmentation = augmentation
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.labels = labels_t.to(device=self.device, dtype=torch.long)
        # Normalisation as one fused multiply-add on the uint8 values: x * scale + shift.
        self._scale = (1.0 / (255.0 * std_t)).to(self.device)
        self._shift = (-mean_t / std_t).to(self.device)
        self.mean = tuple(mean_t.tolist())
        self.std = tuple(std_t.tolist())

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """One batch element's shape (C, H, W)."""
        raise NotImplementedError

    def examples(self, count: int) -> torch.Tensor:
        """The first ``count`` images as the logged model takes them: uint8 [n, H, W, C] on the CPU."""
        raise NotImplementedError

    def _batches(self, steps: list[Step]) -> Iterator[torch.Tensor]:
        """The normalised float batch of each step, on the device, in order."""
        raise NotImplementedError

    def _source_sizes(self, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Heights and widths of the images ``order`` names, where resized-crop boxes are cut."""
        _, height, width = self.image_shape
        return torch.full((len(order),), height), torch.full((len(order),), width)

    def num_batches(self, batch_size: int, *, drop_last: bool, world_size: int = 1) -> int:
        """The number of batches ``batches`` yields per epoch on each rank."""
        _check_batching(batch_size, 0, world_size)
        global_batch = batch_size * world_size
        if drop_last:
            return len(self) // global_batch
        steps = -(-len(self) // global_batch)
        remainder = len(self) - (steps - 1) * global_batch
        if steps > 1 and remainder < world_size:
            steps -= 1  # too few images left to give every rank one: folded into the previous step
        return steps

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None,
        augment: bool,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of training batches (x float32 [B, C, H, W] normalised, y long [B]).

        With ``world_size > 1`` every rank must pass a generator in the same state: each global step
        takes ``batch_size * world_size`` images of the shared permutation and gives rank ``rank`` its
        own contiguous part, so the ranks' shards are disjoint, together cover the permutation (minus
        the dropped tail with ``drop_last``), and every rank gets ``num_batches`` batches. Without
        ``drop_last`` the last step's parts may be smaller, and a tail too short to give every rank an
        image is folded into the previous step (whose parts then exceed ``batch_size`` by at most one).
        """
        _check_batching(batch_size, rank, world_size)
        n = len(self)
        if world_size > n:
            raise ValueError(f"world_size ({world_size}) exceeds the number of images ({n}).")
        order, offsets, flips, boxes, padding = self._draw(
            n, _SPECS[self.augmentation] if augment else _SPECS["none"], shuffle, generator)
        count = self.num_batches(batch_size, drop_last=drop_last, world_size=world_size)
        global_batch = batch_size * world_size
        steps = []
        for step in range(count):
            start = step * global_batch
            stop = n if (step == count - 1 and not drop_last) else start + global_batch
            lo, hi = _part(start, stop, rank, world_size)
            steps.append(Step(order[lo:hi], padding, *(a[lo:hi] if a is not None else None for a in (offsets, flips, boxes))))
        for step, x in zip(steps, self._batches(steps)):
            yield x, self.labels[torch.from_numpy(step.index).to(self.device)]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All images in order, not augmented: (x float32 [B, C, H, W] normalised, y long [B])."""
        _check_batching(batch_size, 0, 1)
        steps = [Step(np.arange(start, min(start + batch_size, len(self)))) for start in range(0, len(self), batch_size)]
        for step, x in zip(steps, self._batches(steps)):
            yield x, self.labels[torch.from_numpy(step.index).to(self.device)]

    def _draw(self, n: int, spec: _AugmentSpec, shuffle: bool, generator: torch.Generator | None) -> tuple:
        """The epoch's permutation, then its crop offsets, flips and resized-crop boxes, drawn in that
        order (numpy, by position in the epoch), and the padding."""
        rng_device = generator.device if generator is not None else torch.device("cpu")
        if shuffle:
            order = torch.randperm(n, generator=generator, device=rng_device)
        else:
            order = torch.arange(n, device=rng_device)
        offsets = flips = boxes = None
        if spec.padding > 0:
            offsets = torch.randint(0, 2 * spec.padding + 1, (n, 2), generator=generator, device=rng_device)
        if spec.flip:
            flips = torch.randint(0, 2, (n,), generator=generator, device=rng_device).bool()
        order = order.cpu()
        if spec.resized_crop:
            boxes = random_resized_crop_boxes(*self._source_sizes(order), generator)
        return (order.numpy(), *(a.cpu().numpy() if a is not None else None for a in (offsets, flips, boxes)),
                spec.padding)

    def finish(self, batch: torch.Tensor, step: Step) -> torch.Tensor:
        """A uint8 NHWC batch augmented as ``step`` says, on the batch's device, and normalised:
        float32 NCHW (channels_last strides when enabled)."""
        device = batch.device
        offsets, flips, boxes = (torch.from_numpy(a).to(device) if a is not None else None
                                 for a in (step.offsets, step.flips, step.boxes))
        if boxes is None:
            return self._normalize(_pad_crop_flip(batch, step.padding, offsets, flips))
        _, height, width, channels = batch.shape
        x = resized_crop(batch.permute(0, 3, 1, 2).to(torch.float32), boxes, (height, width))
        if flips is not None:
            x = torch.where(flips[:, None, None, None], x.flip(3), x)
        x = torch.addcmul(self._shift.to(device).view(1, channels, 1, 1), x, self._scale.to(device).view(1, channels, 1, 1))
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> normalised float32 NCHW (channels_last strides when enabled)."""
        x = torch.addcmul(self._shift.to(batch.device), batch.to(torch.float32), self._scale.to(batch.device))
        x = x.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW is exactly channels_last
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()


class DeviceImages(ImageBatches):
    """A labelled image set held on ``device`` as uint8, yielding normalised (augmented) batches.

    ``images``: uint8 [N, H, W, C] (or [N, H, W] for one channel); the rest as :class:`ImageBatches`.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | Sequence[int],
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augmentation: str,
        device: torch.device | str = "cpu",
        channels_last: bool | None = None,
    ) -> None:
        images_t = _as_uint8_nhwc(images)
        super().__init__(labels, channels=images_t.shape[-1], mean=mean, std=std, augmentation=augmentation,
                         device=device, channels_last=channels_last)
        if len(self) != images_t.shape[0]:
            raise ValueError(
                f"images and labels must have the same length; got {images_t.shape[0]} images "
                f"and {len(self)} labels."
            )
        if images_t.shape[0] == 0:
            raise ValueError("images must hold at least one image; got none.")
        self.images = images_t.to(self.device).contiguous()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """One batch element's shape (C, H, W)."""
        _, height, width, channels = self.images.shape
        return (int(channels), int(height), int(width))

    def examples(self, count: int) -> torch.Tensor:
        return self.images[:count].cpu()

    def _batches(self, steps: list[Step]) -> Iterator[torch.Tensor]:
        for step in steps:
            yield self.finish(self.images[torch.from_numpy(step.index).to(self.device)], step)


def _pad_crop_flip(
    batch: torch.Tensor,
    padding: int,
    offsets: torch.Tensor | None,
    flips: torch.Tensor | None,
) -> torch.Tensor:
    """Zero-pad, crop at the given offsets and mirror the flagged images of a uint8 NHWC batch."""
    if offsets is None and flips is None:
        return batch
    size, height, width, _ = batch.shape
    rows = torch.arange(height, device=batch.device).expand(size, height)
    cols = torch.arange(width, device=batch.device).expand(size, width)
    if flips is not None:
        cols = torch.where(flips[:, None], width - 1 - cols, cols)
    if offsets is not None:
        batch = torch.nn.functional.pad(batch, (0, 0, padding, padding, padding, padding))
        rows = rows + offsets[:, 0:1]
        cols = cols + offsets[:, 1:2]
    sample = torch.arange(size, device=batch.device)[:, None, None]
    return batch[sample, rows[:, :, None], cols[:, None, :]]


def _as_uint8_nhwc(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        tensor = images
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 (0-255); got dtype {tensor.dtype}. Scale and convert them first."
        )
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(-1)
    if tensor.ndim != 4:
        raise ValueError(
            f"images must have shape [N, H, W, C] or [N, H, W]; got {list(tensor.shape)}."
        )
    return tensor


def _part(start: int, stop: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part of [start, stop) split into ``world_size`` near-equal parts."""
    size, extra = divmod(stop - start, world_size)
    lo = start + rank * size + min(rank, extra)
    return lo, lo + size + (1 if rank < extra else 0)


def _check_batching(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must lie in [0, world_size) with world_size >= 1; got rank {rank}, "
            f"world_size {world_size}."
        )


@dataclass
class SplitImages:
    """A splits run's images on the training device: train, augmented as the dataset's preset says,
    and each evaluation split (tunev, val, test), not augmented; all normalised with train's statistics."""

    train: ImageBatches
    evaluation: dict[str, ImageBatches]


def split_images(splits: Splits, source: SourceData, *, augmentation: str, device: torch.device,
                 channels_last: bool) -> SplitImages:
    """The images ``splits`` index in ``source`` (refused when it is not the data they were drawn
    from), on ``device``."""
    splits.check_source(source)
    train = splits.images(source, "train")
    mean, std = normalize_stats(train)

    def holder(images: np.ndarray, split: str, aug: str) -> DeviceImages:
        return DeviceImages(images, splits.labels[split], mean=mean, std=std, augmentation=aug, device=device,
                            channels_last=channels_last)

    return SplitImages(holder(train, "train", augmentation),
                       {split: holder(splits.images(source, split), split, "none") for split in EVAL_SPLITS})
