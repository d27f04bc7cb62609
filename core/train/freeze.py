"""Choosing what fine-tuning may change: stages of ERes2NetV2, frozen or trainable.

Two small pure functions decide (which parameter belongs to which stage, which stages are frozen);
:func:`apply_freezing` applies the decision. A frozen stage keeps its BatchNorm running
statistics too: its BatchNorm layers are held in eval mode whenever the model is in training.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from spkft.core.train.config import STAGES

_STEM = ("conv1.", "bn1.")


def stage_of(parameter_name: str) -> str:
    """The stage a state_dict/parameter name belongs to (``stem``, ``layer1`` ... ``seg_1``)."""
    if parameter_name.startswith(_STEM):
        return "stem"
    head = parameter_name.split(".", 1)[0]
    if head in STAGES:
        return head
    if head in ("seg_bn_1", "seg_2"):  # the optional second embedding layer belongs with seg_1
        return "seg_1"
    raise ValueError(f"parameter {parameter_name!r} belongs to no known ERes2NetV2 stage")


def trainable_names(model: nn.Module, frozen: tuple[str, ...]) -> set[str]:
    """Names of the parameters that stay trainable when ``frozen`` stages are frozen."""
    return {name for name, _ in model.named_parameters() if stage_of(name) not in frozen}


@dataclass(frozen=True)
class FreezeSummary:
    """Parameter counts per stage, split into trainable and frozen."""

    stages: dict[str, tuple[int, bool]]  # stage -> (parameter count, frozen?)

    @property
    def trainable(self) -> int:
        return sum(n for n, frozen in self.stages.values() if not frozen)

    @property
    def frozen(self) -> int:
        return sum(n for n, frozen in self.stages.values() if frozen)

    def lines(self) -> list[str]:
        rows = [f"{stage:<10} {count:>12,}  {'frozen' if frozen else 'trainable'}"
                for stage, (count, frozen) in self.stages.items()]
        rows.append(f"{'total':<10} {self.trainable + self.frozen:>12,}  "
                    f"{self.trainable:,} trainable, {self.frozen:,} frozen")
        return rows


def summarise(model: nn.Module, frozen: tuple[str, ...]) -> FreezeSummary:
    counts = dict.fromkeys(STAGES, 0)
    for name, parameter in model.named_parameters():
        counts[stage_of(name)] += parameter.numel()
    return FreezeSummary({stage: (count, stage in frozen) for stage, count in counts.items()})


def apply_freezing(model: nn.Module, frozen: tuple[str, ...]) -> None:
    """Set ``requires_grad`` by stage; :func:`hold_frozen_batchnorm` must follow every ``train()``."""
    keep = trainable_names(model, frozen)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in keep)


def hold_frozen_batchnorm(model: nn.Module, frozen: tuple[str, ...]) -> None:
    """Put BatchNorm layers of frozen stages in eval mode so their running statistics stay put."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and name and stage_of(name + ".") in frozen:
            module.eval()
