"""On-device batches: exact crop/flip/shift augmentation, normalisation, sharding, determinism."""

import numpy as np
import pytest
import torch

from argse.data.device import DeviceImages, normalize_stats


def _images(n: int, h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    # Values 1..255 so that the zero padding is distinguishable from image content.
    return np.random.default_rng(seed).integers(1, 256, size=(n, h, w, c), dtype=np.uint8)


def _identity_stats(c: int) -> dict:
    return {"mean": [0.0] * c, "std": [1.0] * c}


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """Undo mean 0 / std 1 normalisation: float [B, C, H, W] -> uint8 [B, H, W, C]."""
    return torch.round(x * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _candidates(
    image: np.ndarray, padding: int, flip: bool
) -> list[tuple[int, int, bool, np.ndarray]]:
    """Every padded crop (and its mirror image when ``flip``) as (dy, dx, flipped, image)."""
    h, w, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[dy : dy + h, dx : dx + w]
            for flipped in ([False, True] if flip else [False]):
                out.append((dy, dx, flipped, crop[:, ::-1] if flipped else crop))
    return out


def _match(
    produced: np.ndarray, source: np.ndarray, padding: int, flip: bool
) -> tuple[int, int, bool]:
    candidates = _candidates(source, padding, flip)
    hits = [(dy, dx, f) for dy, dx, f, c in candidates if np.array_equal(c, produced)]
    assert hits, "augmented image is not a padded crop (and flip) of its source"
    return hits[0]


def test_cifar_augmentation_is_an_exact_padded_crop_and_flip_of_the_source() -> None:
    source = _images(64, 32, 32, 3)
    data = DeviceImages(source, np.arange(64), augmentation="cifar", **_identity_stats(3))
    generator = torch.Generator().manual_seed(1)
    seen = set()
    for x, y in data.batches(32, shuffle=True, generator=generator, augment=True, drop_last=False):
        assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
        produced = _to_uint8(x)
        for k, index in enumerate(y.tolist()):
            seen.add(_match(produced[k], source[index], padding=4, flip=True))
    offsets = {(dy, dx) for dy, dx, _ in seen}
    assert len(offsets) > 20  # crops really vary ...
    assert {f for _, _, f in seen} == {False, True}  # ... and so do flips


def test_digits_augmentation_shifts_by_at_most_one_pixel_without_flips() -> None:
    source = _images(200, 8, 8, 1)[..., 0]  # [N, H, W] is taken as one channel
    data = DeviceImages(source, np.arange(200), augmentation="digits", **_identity_stats(1))
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for x, y in data.batches(50, shuffle=True, generator=generator, augment=True, drop_last=False):
        assert x.shape[1:] == (1, 8, 8)
        produced = _to_uint8(x)
        for k, index in enumerate(y.tolist()):
            seen.add(_match(produced[k], source[index][..., None], padding=1, flip=False))
    assert {(dy, dx) for dy, dx, _ in seen} == {(dy, dx) for dy in range(3) for dx in range(3)}


def test_without_augmentation_batches_are_the_normalised_source() -> None:
    source = _images(10, 32, 32, 3)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    data = DeviceImages(source, np.arange(10) % 3, mean=mean, std=std, augmentation="cifar")
    expected = (torch.from_numpy(source).float() / 255 - torch.tensor(mean)) / torch.tensor(std)
    expected = expected.permute(0, 3, 1, 2)
    x_all, y_all = zip(*data.eval_batches(4))
    assert [len(y) for y in y_all] == [4, 4, 2]
    assert torch.allclose(torch.cat(x_all), expected, atol=1e-5)
    assert torch.equal(torch.cat(y_all), torch.arange(10) % 3)
    (x, y), *_ = data.batches(10, shuffle=False, generator=None, augment=False, drop_last=False)
    assert torch.allclose(x, expected, atol=1e-5)


def test_normalize_stats_are_per_channel_in_unit_range() -> None:
    images = _images(20, 6, 5, 3)
    mean, std = normalize_stats(images)
    as_float = images.reshape(-1, 3).astype(np.float64) / 255
    assert np.allclose(mean, as_float.mean(0)) and np.allclose(std, as_float.std(0))
    gray_mean, gray_std = normalize_stats(torch.from_numpy(images[..., 0]))
    assert len(gray_mean) == 1 and gray_mean[0] == pytest.approx(mean[0])


@pytest.mark.parametrize("n, drop_last", [(103, False), (103, True), (128, False), (33, False)])
def test_rank_shards_are_disjoint_cover_the_permutation_and_have_equal_batch_counts(
    n: int, drop_last: bool
) -> None:
    source = _images(n, 4, 4, 1)
    data = DeviceImages(source, np.arange(n), augmentation="digits", **_identity_stats(1))
    world_size, batch_size = 2, 16
    per_rank = []
    for rank in range(world_size):
        generator = torch.Generator().manual_seed(7)  # the same state on every rank
        batches = list(
            data.batches(batch_size, shuffle=True, generator=generator, augment=True,
                         drop_last=drop_last, rank=rank, world_size=world_size)
        )
        expected = data.num_batches(batch_size, drop_last=drop_last, world_size=world_size)
        assert len(batches) == expected
        per_rank.append([y for _, y in batches])
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    # Step by step, rank 0's part then rank 1's part reproduce the shared permutation in order.
    interleaved = torch.cat([torch.cat([r0, r1]) for r0, r1 in zip(*per_rank)])
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    assert torch.equal(interleaved, permutation[: len(interleaved)])
    rank0, rank1 = (set(torch.cat(parts).tolist()) for parts in per_rank)
    assert not rank0 & rank1
    if drop_last:
        assert all(len(y) == batch_size for parts in per_rank for y in parts)
        assert len(interleaved) == n // (batch_size * world_size) * batch_size * world_size
    else:
        assert rank0 | rank1 == set(range(n))
        assert all(len(y) <= batch_size + 1 for parts in per_rank for y in parts)


def test_same_generator_state_gives_identical_batches() -> None:
    images = _images(50, 32, 32, 3)
    data = DeviceImages(images, np.arange(50), augmentation="cifar", **_identity_stats(3))

    def epoch(seed: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        batches = data.batches(16, shuffle=True, generator=generator, augment=True, drop_last=True)
        return [x for x, _ in batches]

    first, again, other = epoch(3), epoch(3), epoch(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_channels_last_layout_is_optional_and_values_are_unchanged() -> None:
    source = _images(8, 32, 32, 3)
    plain = DeviceImages(source, np.arange(8), augmentation="none", **_identity_stats(3))
    cl = DeviceImages(
        source, np.arange(8), augmentation="none", channels_last=True, **_identity_stats(3)
    )
    (x_plain, _), = plain.eval_batches(8)
    (x_cl, _), = cl.eval_batches(8)
    assert x_plain.is_contiguous()
    assert x_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x_plain, x_cl)


def test_bad_inputs_are_rejected_with_a_sentence() -> None:
    with pytest.raises(ValueError, match="uint8"):
        floats = np.zeros((2, 8, 8), np.float32)
        DeviceImages(floats, [0, 1], augmentation="digits", mean=[0], std=[1])
    with pytest.raises(ValueError, match="cifar, digits, fashion, natural, none"):
        DeviceImages(_images(2, 8, 8, 1), [0, 1], augmentation="mixup", mean=[0], std=[1])
    with pytest.raises(ValueError, match="same length"):
        DeviceImages(_images(2, 8, 8, 1), [0], augmentation="digits", mean=[0], std=[1])
    with pytest.raises(ValueError, match="one value per channel"):
        DeviceImages(_images(2, 8, 8, 3), [0, 1], augmentation="cifar", mean=[0], std=[1])
