"""Training images held on the training device, batched and augmented there
(docs/design.md, *Batches on the device*).

A ``DeviceImages`` keeps one uint8 tensor of the images in NHWC layout and the labels on the device.
Each batch is gathered, augmented, converted to float and normalised on the device with a handful of
vectorised tensor operations; there is no per-sample Python, no PIL and no DataLoader worker.

Augmentations:

* ``"cifar"``: random crop with 4-pixel zero padding and random horizontal flip (the CIFAR recipe;
  the same distribution as torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``).
* ``"digits"``: random shift of up to 1 pixel in each direction (1-pixel zero padding and crop),
  no flip.
* ``"fashion"``: random crop with 2-pixel zero padding and random horizontal flip, for 28x28
  Fashion-MNIST (a mirrored garment or shoe still belongs to its class).
* ``"none"``: no augmentation.

All the random numbers of an epoch (the permutation, the crop offsets and the flips) are drawn at
once on the CPU from the given ``torch.Generator`` and moved to the device, so an epoch is
reproducible from the generator's state and is the same on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from argse.data.loaders import SourceData
from argse.data.splits import EVAL_SPLITS, Splits

AUGMENTATIONS = ("cifar", "digits", "fashion", "none")


@dataclass(frozen=True)
class _AugmentSpec:
    padding: int
    flip: bool


_SPECS = {
    "cifar": _AugmentSpec(padding=4, flip=True),
    "digits": _AugmentSpec(padding=1, flip=False),
    "fashion": _AugmentSpec(padding=2, flip=True),
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


class DeviceImages:
    """A labelled image set held on ``device`` as uint8, yielding normalised (augmented) batches.

    ``images``: uint8 [N, H, W, C] (or [N, H, W] for one channel); ``labels``: ints [N];
    ``mean``/``std``: per channel, in [0, 1] units (see ``normalize_stats``); ``augmentation``: one of
    ``AUGMENTATIONS``. Batches are float32 [B, C, H, W]; with ``channels_last`` (default: on CUDA only)
    they carry the channels_last memory format.
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
        if augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"augmentation must be one of {', '.join(AUGMENTATIONS)}; got {augmentation!r}."
            )
        images_t = _as_uint8_nhwc(images)
        if isinstance(labels, torch.Tensor):
            labels_t = labels.flatten()
        else:
            labels_t = torch.as_tensor(np.asarray(labels)).flatten()
        if labels_t.dtype.is_floating_point or labels_t.dtype == torch.bool:
            raise ValueError(f"labels must be integers; got dtype {labels_t.dtype}.")
        if labels_t.numel() != images_t.shape[0]:
            raise ValueError(
                f"images and labels must have the same length; got {images_t.shape[0]} images "
                f"and {labels_t.numel()} labels."
            )
        if images_t.shape[0] == 0:
            raise ValueError("images must hold at least one image; got none.")
        channels = images_t.shape[-1]
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
        self.images = images_t.to(self.device).contiguous()
        self.labels = labels_t.to(device=self.device, dtype=torch.long)
        # Normalisation as one fused multiply-add on the uint8 values: x * scale + shift.
        self._scale = (1.0 / (255.0 * std_t)).to(self.device)
        self._shift = (-mean_t / std_t).to(self.device)
        self.mean = tuple(mean_t.tolist())
        self.std = tuple(std_t.tolist())

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """One batch element's shape (C, H, W)."""
        _, height, width, channels = self.images.shape
        return (int(channels), int(height), int(width))

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
        rng_device = generator.device if generator is not None else torch.device("cpu")
        if shuffle:
            order = torch.randperm(n, generator=generator, device=rng_device)
        else:
            order = torch.arange(n, device=rng_device)
        spec = _SPECS[self.augmentation] if augment else _SPECS["none"]
        offsets = flips = None
        if spec.padding > 0:
            offsets = torch.randint(
                0, 2 * spec.padding + 1, (n, 2), generator=generator, device=rng_device
            )
        if spec.flip:
            flips = torch.randint(
                0, 2, (n,), generator=generator, device=rng_device
            ).bool()
        order = order.to(self.device)
        offsets = offsets.to(self.device) if offsets is not None else None
        flips = flips.to(self.device) if flips is not None else None

        steps = self.num_batches(batch_size, drop_last=drop_last, world_size=world_size)
        global_batch = batch_size * world_size
        for step in range(steps):
            start = step * global_batch
            stop = n if (step == steps - 1 and not drop_last) else start + global_batch
            lo, hi = _part(start, stop, rank, world_size)
            index = order[lo:hi]
            x = self._augment(
                self.images[index],
                spec.padding,
                offsets[lo:hi] if offsets is not None else None,
                flips[lo:hi] if flips is not None else None,
            )
            yield self._normalize(x), self.labels[index]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All images in order, not augmented: (x float32 [B, C, H, W] normalised, y long [B])."""
        _check_batching(batch_size, 0, 1)
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield self._normalize(self.images[start:stop]), self.labels[start:stop]

    def _augment(
        self,
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

    def _normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> normalised float32 NCHW (channels_last strides when enabled)."""
        x = torch.addcmul(self._shift, batch.to(torch.float32), self._scale)
        x = x.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW is exactly channels_last
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()


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

    train: DeviceImages
    evaluation: dict[str, DeviceImages]


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
