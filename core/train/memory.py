"""How many training crops fit in a device's free memory: a batch size measured on the model itself.

What one crop costs is measured, not modelled: a forward pass records the bytes of every tensor
autograd keeps for the backward pass (``saved_tensors_hooks``), once for one crop and once for
two; the difference is the cost of each further crop. Weights, gradients and optimiser state
are paid once per run and come off the free memory first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from spkft.core.features import FEATURE_DIM, SAMPLE_RATE, num_frames

# Only part of the free memory is planned for: the allocator fragments, the backward pass needs
# transient buffers beside the saved activations, and other processes share the device.
_USABLE_FRACTION = 0.5
# Bytes per parameter held for a whole run: weights, gradients and up to two optimiser moments.
_STATE_BYTES_PER_PARAMETER = 16
LARGEST_SUGGESTION = 128


@dataclass(frozen=True)
class BatchSuggestion:
    """A batch size and the figures it was derived from."""

    batch_size: int
    free_bytes: int
    bytes_per_crop: int
    state_bytes: int


def free_memory_bytes(device: torch.device) -> int:
    """Memory the device can still give: CUDA's free memory, or the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def saved_activation_bytes(model: nn.Module, batch: int, frames: int) -> int:
    """Bytes autograd saves for the backward pass of one forward pass over ``batch`` crops."""
    saved: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # A tensor that feeds several operations (a block's input, its shortcut's input) is kept once.
        saved[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size()
        return tensor

    features = torch.zeros(batch, frames, FEATURE_DIM, device=next(model.parameters()).device)
    # In eval mode BatchNorm keeps its running statistics; what autograd saves is the same as in training.
    training = model.training
    model.eval()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(features)
    finally:
        model.train(training)
    return sum(saved.values())


def suggest_batch_size(model: nn.Module, crop_seconds: float, device: torch.device) -> BatchSuggestion:
    """The largest power of two of crops (at most 128) whose activations fit the device's free memory.

    ``model`` is measured on the device it is on, with every parameter trainable as it stands.
    """
    frames = num_frames(int(crop_seconds * SAMPLE_RATE))
    per_crop = max(1, saved_activation_bytes(model, 2, frames) - saved_activation_bytes(model, 1, frames))
    state = _STATE_BYTES_PER_PARAMETER * sum(p.numel() for p in model.parameters())
    free = free_memory_bytes(device)
    fits = int((free * _USABLE_FRACTION - state) // per_crop)
    batch = 1
    while batch * 2 <= min(fits, LARGEST_SUGGESTION):
        batch *= 2
    return BatchSuggestion(batch, free, per_crop, state)

