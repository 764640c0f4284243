"""Backbones for the experts: the CIFAR ResNet-32, a ResNet-8 for 28x28 grey images, a small
residual net for 8x8 digits, and torchvision's ResNet-18 and ResNet-50 for photographs.

Pure torch; no MLflow. ``build_backbone`` builds a network by its name (:data:`BACKBONES`; each dataset
preset or dataset card names one) for a number of classes and input channels; ``pretrained_state_dict``
and ``load_weights`` start it from trained weights (``--weights``: a local state dict file, or the name
of torchvision's published weights, which torchvision downloads where there is a network); and
``estimate_training_flops`` gives the rough cost figure that ``--dry-run`` prints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from argse import ArgseUsageError


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


def resnet32(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-32 (3 stages x 5 basic blocks, 16/32/64 channels, option-A shortcuts).

    About 0.46M parameters for 100 classes; expects [B, 3, 32, 32] inputs (``in_channels`` for grey
    images) and returns logits [B, C].
    """
    _check_num_classes(num_classes)
    return CifarResNet(blocks_per_stage=5, num_classes=num_classes, in_channels=in_channels)


class DigitsNet(nn.Module):
    """A small residual net for 8x8 single-channel images (sklearn digits), about 38k parameters.

    A 3x3 conv stem with 32 channels, two basic blocks at full 8x8 resolution, global average pool
    and a linear layer; expects [B, 1, 8, 8] inputs and returns logits [B, C].
    """

    def __init__(self, num_classes: int, width: int = 32, in_channels: int = 1) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.fc = nn.Linear(width, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.blocks(out)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def resnet8_grey(num_classes: int, in_channels: int = 1) -> CifarResNet:
    """A CIFAR-style ResNet-8 for 28x28 single-channel images (Fashion-MNIST).

    One input channel, three stages of one basic block (16/32/64 channels at 28x28, 14x14, 7x7),
    option-A shortcuts: about 75k parameters and 9M multiply-accumulates per image, a sixth of
    ResNet-32's parameters and an eighth of its compute. Expects [B, 1, 28, 28]; returns logits [B, C].
    """
    _check_num_classes(num_classes)
    return CifarResNet(blocks_per_stage=1, num_classes=num_classes, in_channels=in_channels)


def _torchvision_resnet(arch: str) -> Callable[..., nn.Module]:
    """torchvision's ``arch`` (ImageNet ResNet: a 7x7 stride-2 stem and max pool, four stages), with
    ``num_classes`` outputs, randomly initialised as torchvision does; ``in_channels`` other than 3
    replaces the stem's convolution with one of that many input channels."""

    def build(num_classes: int, in_channels: int = 3) -> nn.Module:
        from torchvision import models

        _check_num_classes(num_classes)
        model = getattr(models, arch)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            stem = model.conv1
            model.conv1 = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stride=stem.stride,
                                    padding=stem.padding, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        return model

    build.__name__ = arch
    build.__doc__ = f"torchvision's {arch} for ``num_classes`` classes and ``in_channels`` input channels."
    return build


resnet18 = _torchvision_resnet("resnet18")  # 11.2M parameters before the classifier, 1.8 GMACs at 224x224
resnet50 = _torchvision_resnet("resnet50")  # 23.5M before the classifier, 4.1 GMACs at 224x224: the paper's ImageNet-LT net

# The expert networks by name, built as ``BACKBONES[name](num_classes)`` (the input channels each
# expects by default) or ``BACKBONES[name](num_classes, in_channels=c)``.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet32": resnet32,
    "digits-net": DigitsNet,
    "resnet8-grey": resnet8_grey,
    "resnet18": resnet18,
    "resnet50": resnet50,
}
#: The backbones whose ImageNet weights torchvision publishes (under the same model names).
TORCHVISION_MODELS = ("resnet18", "resnet50")


def build_backbone(name: str, num_classes: int, in_channels: int | None = None) -> nn.Module:
    """The expert network called ``name`` (:data:`BACKBONES`) for ``num_classes`` classes and
    ``in_channels`` input channels (default: the network's own, 1 for the grey ones, else 3)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got {name!r}.")
    if in_channels is None:
        return BACKBONES[name](num_classes)
    return BACKBONES[name](num_classes, in_channels=in_channels)


# -- starting from trained weights ------------------------------------------------------------------


def pretrained_state_dict(backbone: str, weights: str) -> dict[str, torch.Tensor]:
    """The state dict ``--weights`` names, on the CPU: a local file (``torch.save`` of a state dict,
    or of a checkpoint that holds one under ``model`` or ``state_dict``; DistributedDataParallel's and
    ``torch.compile``'s key prefixes are removed), else the name of one of torchvision's published
    weights for ``backbone`` (``IMAGENET1K_V1``, ``ResNet50_Weights.IMAGENET1K_V2``, ``DEFAULT``), which
    torchvision downloads into its cache: that needs a network, and nothing here downloads otherwise."""
    path = Path(weights).expanduser()
    if path.is_file():
        return _read_state_dict(path, weights)
    enum = torchvision_weights(backbone, weights)
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # offline, or a failed download
        raise ArgseUsageError(f"--weights {weights}: torchvision could not download {enum} ({type(exc).__name__}); "
                              f"fetch {enum.url} where there is a network and pass the file") from None


def torchvision_weights(backbone: str, name: str):
    """torchvision's weights enum member called ``name`` for ``backbone`` (no download), or one line
    saying that ``name`` is neither a file nor such weights."""
    if backbone not in TORCHVISION_MODELS:
        raise ArgseUsageError(f"--weights {name}: no such file (torchvision publishes no weights of the {backbone} "
                              "backbone): pass a state dict saved with torch.save(model.state_dict(), FILE)")
    from torchvision.models import get_model_weights

    enum = get_model_weights(backbone)
    prefix, _, member = name.rpartition(".")
    members = [m for m in enum.__members__ if m != "DEFAULT"] + ["DEFAULT"]
    if (prefix and prefix != enum.__name__) or member not in enum.__members__:
        raise ArgseUsageError(f"--weights {name}: no such file, nor weights of torchvision's {backbone}: give a state "
                              f"dict file or one of {', '.join(members)}")
    return enum[member]


def _read_state_dict(path: Path, given: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArgseUsageError(f"--weights {given}: not a torch state dict ({type(exc).__name__}); save one with "
                              "torch.save(model.state_dict(), FILE)") from None
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArgseUsageError(f"--weights {given}: holds no state dict (names to tensors); save one with "
                              "torch.save(model.state_dict(), FILE)")
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Load trained weights into ``model`` to fine-tune it, and say what was adapted (a list of
    phrases, empty when every tensor loaded as it was). The classifier (the model's last
    ``nn.Linear``) keeps its initialisation where its shape differs (weights trained for another number
    of classes); a first convolution trained on RGB is summed over its input channels for a grey model;
    every other parameter and buffer must match by name and shape, else one line says which does not."""
    own = model.state_dict()
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    head = linears[-1] + "." if linears else None
    stem = convs[0] + ".weight" if convs else None
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")
               and not (head and k.startswith(head))]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        problems = ([f"{len(missing)} of its tensors missing (e.g. {missing[0]})"] if missing else []) + (
            [f"{len(unexpected)} unknown ones (e.g. {unexpected[0]})"] if unexpected else [])
        raise ArgseUsageError(f"the weights do not fit {type(model).__name__}: {' and '.join(problems)}; pass weights "
                              "saved from the same backbone")
    loaded, notes = dict(own), []
    for key, value in state.items():
        target = own[key]
        if value.shape == target.shape:
            loaded[key] = value.to(target.dtype)
        elif head and key.startswith(head):
            if not notes or not notes[-1].startswith("classifier"):
                notes.append(f"classifier {head[:-1]} kept at its initialisation (the weights' is "
                             f"{'x'.join(map(str, state[head + 'weight'].shape))}, the model's "
                             f"{'x'.join(map(str, own[head + 'weight'].shape))})")
        elif key == stem and value.dim() == 4 and target.shape[1] == 1 and value.shape[1] == 3 \
                and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
            loaded[key] = value.sum(dim=1, keepdim=True).to(target.dtype)
            notes.append(f"{key} trained on RGB summed over its channels for grey images")
        else:
            raise ArgseUsageError(f"the weights do not fit {type(model).__name__}: {key} is "
                                  f"{'x'.join(map(str, value.shape))}, the model's {'x'.join(map(str, target.shape))}; "
                                  "pass weights saved from the same backbone")
    model.load_state_dict(loaded)
    return notes


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
