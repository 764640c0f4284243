"""DistributedDataParallel as ``torchrun`` starts it: which process this is, and its process group.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a process started without it is rank 0
of 1 and needs no group. Under several processes each rank trains on its shard of the on-device
images (gloo on the CPU, nccl on CUDA, one GPU per local rank); only rank 0 reads the inputs it then
broadcasts, and only rank 0 talks to MLflow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def start(ddp: Dist, device: torch.device) -> torch.device:
    """Join the process group (several processes only); the device this rank trains on."""
    if ddp.world_size == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop(ddp: Dist) -> None:
    """Leave the process group, if this process joined one."""
    if ddp.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def from_main(ddp: Dist, value: Any) -> Any:
    """Rank 0's ``value``, on every rank (the others pass anything)."""
    payload = [value]
    if ddp.world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    return payload[0]


def wrap(ddp: Dist, backbone: nn.Module, device: torch.device) -> nn.Module:
    """What the training steps call: the backbone, or its DistributedDataParallel wrapper."""
    if ddp.world_size == 1:
        return backbone
    return nn.parallel.DistributedDataParallel(backbone, device_ids=[device.index] if device.type == "cuda" else None)
