"""Backbones for the experts: the CIFAR ResNet-32, a ResNet-8 for 28x28 grey images and a small
residual net for 8x8 digits.

Pure torch; no MLflow. ``build_backbone`` builds a network by its name (:data:`BACKBONES`; each dataset
preset names one), and ``estimate_training_flops`` gives the rough cost figure that ``--dry-run`` prints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _OptionAShortcut(nn.Module):
    """The parameter-free CIFAR shortcut of He et al. (2016), option A.

    Subsamples the input by ``stride`` and zero-pads the new channels, so a stage transition adds no
    parameters (this is what gives ResNet-32 its 0.46M parameters).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads the last dimensions first: (W_left, W_right, H_left, H_right, C_left, C_right).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = _OptionAShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _kaiming_init(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): a 3x3 stem, three stages of basic blocks, pool, linear."""

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64),
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        channels = widths[0]
        for index, width in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stages(out)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def resnet32(num_classes: int) -> CifarResNet:
    """CIFAR ResNet-32 (3 stages x 5 basic blocks, 16/32/64 channels, option-A shortcuts).

    About 0.46M parameters for 100 classes; expects [B, 3, 32, 32] inputs and returns logits [B, C].
    """
    _check_num_classes(num_classes)
    return CifarResNet(blocks_per_stage=5, num_classes=num_classes)


class DigitsNet(nn.Module):
    """A small residual net for 8x8 single-channel images (sklearn digits), about 38k parameters.

    A 3x3 conv stem with 32 channels, two basic blocks at full 8x8 resolution, global average pool
    and a linear layer; expects [B, 1, 8, 8] inputs and returns logits [B, C].
    """

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        self.conv1 = nn.Conv2d(1, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.fc = nn.Linear(width, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.blocks(out)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def resnet8_grey(num_classes: int) -> CifarResNet:
    """A CIFAR-style ResNet-8 for 28x28 single-channel images (Fashion-MNIST).

    One input channel, three stages of one basic block (16/32/64 channels at 28x28, 14x14, 7x7),
    option-A shortcuts: about 75k parameters and 9M multiply-accumulates per image, a sixth of
    ResNet-32's parameters and an eighth of its compute. Expects [B, 1, 28, 28]; returns logits [B, C].
    """
    _check_num_classes(num_classes)
    return CifarResNet(blocks_per_stage=1, num_classes=num_classes, in_channels=1)


# The expert networks by name, built as ``BACKBONES[name](num_classes)``.
BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "resnet32": resnet32,
    "digits-net": DigitsNet,
    "resnet8-grey": resnet8_grey,
}


def build_backbone(name: str, num_classes: int) -> nn.Module:
    """The expert network called ``name`` (:data:`BACKBONES`) for ``num_classes`` classes."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got {name!r}.")
    return BACKBONES[name](num_classes)


def count_parameters(model: nn.Module) -> int:
    """The number of scalar parameters of a model (trainable and frozen)."""
    return sum(parameter.numel() for parameter in model.parameters())


def estimate_training_flops(
    model: nn.Module, input_shape: Sequence[int], n_images: int, epochs: int
) -> float:
    """Approximate FLOPs to train ``model`` for ``epochs`` epochs over ``n_images`` images.

    ``input_shape`` is one image's shape (C, H, W). One forward pass of one image is counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products: 2 FLOPs per
    multiply-accumulate), tripled for forward plus backward; normalisation, activations and the
    optimizer are ignored.
    """
    from torch.utils.flop_counter import FlopCounterMode

    shape = tuple(int(size) for size in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be one image's (C, H, W); got {tuple(input_shape)}.")
    if n_images < 0 or epochs < 0:
        raise ValueError(f"n_images and epochs must be >= 0; got {n_images} and {epochs}.")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(torch.zeros((1, *shape), device=device))
    finally:
        model.train(was_training)
    return float(counter.get_total_flops()) * 3.0 * float(n_images) * float(epochs)


def _check_num_classes(num_classes: int) -> None:
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2; got {num_classes}.")
