"""An expert as it is logged: the backbone with its input normalisation and calibration temperature.

``ExpertModel`` takes raw uint8 images ``[N, H, W, C]`` (``[N, H, W]`` for one channel) and returns
calibrated logits ``backbone(normalise(x)) / T``, so a logged expert needs nothing beside it to run.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ExpertModel(nn.Module):
    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float], temperature: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, C]`` or ``[N, H, W]`` -> normalised float ``[N, C, H, W]``."""
        if images.dim() == 3:
            images = images.unsqueeze(-1)
        x = images.to(self.mean.device, torch.float32).permute(0, 3, 1, 2)
        return (x - self.mean) / self.std

    def raw_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalise(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.raw_logits(images) / self.temperature
