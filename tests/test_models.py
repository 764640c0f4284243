"""Backbones (shapes, parameter counts, FLOP estimate, DigitsNet learns sklearn digits) and the
training utilities that drive them (optimizer, schedule, device, RNG state)."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from argse.models.backbones import (
    DigitsNet,
    build_backbone,
    count_parameters,
    estimate_training_flops,
    resnet32,
)
from argse.training.utils import (
    autocast_context,
    capture_rng_state,
    make_optimizer_and_scheduler,
    resolve_device,
    restore_rng_state,
    seed_everything,
)


def test_resnet32_has_about_046m_parameters_and_returns_logits() -> None:
    model = resnet32(100)
    # 464,154 for 10 classes (He et al.'s 0.46M) plus 90 * 65 for the larger head.
    assert count_parameters(model) == 470_004
    assert count_parameters(resnet32(10)) == 464_154
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 100)
    assert torch.isfinite(out).all()


def test_resnet32_has_32_weight_layers() -> None:
    model = resnet32(100)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) + len(linears) == 32


def test_resnet32_accepts_channels_last_inputs() -> None:
    torch.manual_seed(0)
    model = resnet32(10).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    got = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(expected, got, atol=1e-4)


def test_digits_net_is_small_and_shapes_match() -> None:
    model = DigitsNet(10)
    assert count_parameters(model) < 100_000
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_each_preset_names_a_backbone_and_an_unknown_name_is_one_sentence() -> None:
    from argse.presets import PRESETS

    assert build_backbone(PRESETS["cifar100-lt"].backbone, 100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    assert isinstance(build_backbone(PRESETS["digits-lt"].backbone, 10), DigitsNet)
    assert build_backbone(PRESETS["fashion-mnist-lt"].backbone, 10)(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    with pytest.raises(ValueError, match="backbone must be one of resnet32, digits-net, resnet8-grey"):
        build_backbone("imagenet", 10)


def test_training_flops_count_conv_and_linear_macs() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5)
    )
    macs = 8 * 4 * 4 * 3 * 9 + 5 * 128
    assert estimate_training_flops(model, (3, 4, 4), n_images=10, epochs=2) == macs * 2 * 3 * 10 * 2
    # ResNet-32: about 69M multiply-accumulates per 32x32 image.
    per_image = estimate_training_flops(resnet32(100), (3, 32, 32), 1, 1) / 6
    assert 65e6 < per_image < 72e6


def test_flop_estimate_leaves_the_model_in_training_mode_with_bn_stats_untouched() -> None:
    model = resnet32(10)
    before = model.bn1.running_mean.clone()
    estimate_training_flops(model, (3, 32, 32), 100, 1)
    assert model.training
    assert torch.equal(model.bn1.running_mean, before)


def test_digits_net_reaches_90_percent_on_sklearn_digits() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = DigitsNet(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    # One thread: on tiny 8x8 batches a second OpenMP thread only adds synchronisation, and on a
    # busy machine it made this test ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(6):
            for batch in train[torch.randperm(len(train))].split(64):
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert accuracy > 0.9, accuracy


def _lrs(epochs: int, steps: int, warmup: float, batch_size: int = 128) -> list[float]:
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer_and_scheduler(
        model,
        lr=0.1,
        batch_size=batch_size,
        epochs=epochs,
        steps_per_epoch=steps,
        warmup_epochs=warmup,
    )
    lrs = []
    for _ in range(epochs * steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_zero() -> None:
    lrs = _lrs(epochs=10, steps=10, warmup=2)
    assert lrs[:20] == pytest.approx([0.1 * (k + 1) / 20 for k in range(20)])
    assert max(lrs) == pytest.approx(0.1)
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * k / 80)) for k in range(80)]
    assert lrs[20:] == pytest.approx(cosine)
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:]))
    assert 0 < lrs[-1] < 1e-3


def test_peak_lr_scales_with_batch_size_and_optimizer_is_nesterov_sgd() -> None:
    assert max(_lrs(epochs=2, steps=3, warmup=0, batch_size=256)) == pytest.approx(0.2)
    optimizer, _ = make_optimizer_and_scheduler(
        torch.nn.Linear(2, 2), lr=0.1, batch_size=128, epochs=1, steps_per_epoch=1, warmup_epochs=0
    )
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 5e-4)


def test_resolve_device_and_autocast() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    with autocast_context(torch.device("cpu")):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    with autocast_context(torch.device("cpu"), cpu_bf16=True):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path) -> None:
    generator = torch.Generator()

    def draw() -> tuple[float, ...]:
        return (
            random.random(),
            np.random.rand(),
            torch.rand(1).item(),
            torch.rand(1, generator=generator).item(),
        )

    seed_everything(11)
    generator.manual_seed(5)
    path = tmp_path / "rng.pt"
    torch.save({"rng": capture_rng_state(generator)}, path)
    expected = draw()
    seed_everything(99)
    generator.manual_seed(0)
    restore_rng_state(torch.load(path, weights_only=True)["rng"], generator)
    assert draw() == expected
