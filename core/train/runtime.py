"""Where and how a run computes: device, precision, distributed context, learning-rate schedule."""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist

from spkft.core.embedding import resolve_device


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True on CPUs with native BF16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast pays."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16``; ``auto`` picks the fastest that trains as well as fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


# Narrowest network (``m_channels``) whose CPU training step runs faster in channels_last. Measured
# (forward + backward, fp32, batch 8 x 3 s, 2 threads, AVX2 CPU): m_channels 8, 16 and 32 ran
# 1.8x, 1.7x and 1.1x slower in it; the released width (64, w24s4ep4) 1.3x faster there and 1.5x
# on an AVX-512 CPU.
CHANNELS_LAST_CPU_MIN_CHANNELS = 64


def pick_channels_last(setting: bool | str, device: torch.device, m_channels: int) -> bool:
    """Whether the convolutions run in channels_last; ``auto``: on CUDA, and on the CPU for networks
    at least :data:`CHANNELS_LAST_CPU_MIN_CHANNELS` wide."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" or m_channels >= CHANNELS_LAST_CPU_MIN_CHANNELS


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self, device: torch.device) -> torch.device:
        """Join the process group (gloo on CPU, nccl on GPUs); returns this rank's device."""
        if not self.enabled:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast_flag(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        tensor = torch.tensor([1 if flag else 0])
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
