"""ERes2NetV2, the speaker-embedding network of 3D-Speaker, written for spkft.

The module and parameter names follow upstream exactly, so that the released checkpoints
(``pretrained_eres2netv2.ckpt``, ``pretrained_eres2netv2w24s4ep4.ckpt``) load with strict key
matching. Input is a batch of mean-normalised 80-bin fbank features ``[batch, frames, 80]``;
output is the un-normalised 192-dim embedding ``[batch, 192]``.

Structure (Chen et al., "ERes2NetV2", Interspeech 2024):
- a 3x3 stem, then four stages of bottleneck blocks; each block splits its channels into
  ``scale`` sub-bands that are processed in a chain, each one fed with the previous one's output;
- in ``layer1``/``layer2`` the chain adds the previous sub-band, in ``layer3``/``layer4`` it
  fuses them with attentional feature fusion (AFF);
- the output of ``layer3`` is downsampled (``layer3_ds``) and fused with ``layer4`` (``fuse34``);
- temporal statistics pooling (mean and standard deviation) and one linear layer (``seg_1``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from spkft.core.errors import InputTooShortError
from spkft.core.features import FEATURE_DIM, seconds_for_frames

# Statistics pooling takes an unbiased variance over time after three stride-2 stages: with
# 8 input frames or fewer that is a variance over a single step, which is NaN.
MIN_FRAMES = 9

EMBEDDING_DIM = 192


def check_frames(frames: int) -> None:
    """Refuse feature sequences too short to embed (they would give NaN, not an error)."""
    if frames < MIN_FRAMES:
        raise InputTooShortError(
            f"input has {frames} frames; ERes2NetV2 needs at least {MIN_FRAMES} "
            f"(about {seconds_for_frames(MIN_FRAMES):.2f} s of audio)"
        )


@dataclass(frozen=True)
class ERes2NetV2Config:
    """Constructor arguments of :class:`ERes2NetV2`; names match upstream's."""

    num_blocks: tuple[int, int, int, int] = (3, 4, 6, 3)
    m_channels: int = 64
    feat_dim: int = FEATURE_DIM
    embedding_size: int = EMBEDDING_DIM
    baseWidth: int = 26  # noqa: N815 - upstream's argument name
    scale: int = 2
    expansion: int = 2
    two_emb_layer: bool = False

    def to_dict(self) -> dict:
        data = asdict(self)
        data["num_blocks"] = list(self.num_blocks)
        return data


VARIANTS: dict[str, ERes2NetV2Config] = {
    "eres2netv2": ERes2NetV2Config(baseWidth=26, scale=2, expansion=2),
    "eres2netv2_w24s4ep4": ERes2NetV2Config(baseWidth=24, scale=4, expansion=4),
}
DEFAULT_VARIANT = "eres2netv2_w24s4ep4"


def model_config(variant: str = DEFAULT_VARIANT, **overrides) -> ERes2NetV2Config:
    """The config of a named variant with any constructor argument overridden."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    known = {f.name for f in fields(ERes2NetV2Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown model argument(s) {', '.join(unknown)}; valid ones: {', '.join(sorted(known))}"
        )
    base = VARIANTS[variant].to_dict() | overrides
    problems = [f"{name} must be a whole number of at least 1, got {base[name]!r}"
                for name in ("m_channels", "feat_dim", "embedding_size", "baseWidth", "scale", "expansion")
                if not _positive_int(base[name])]
    blocks = base["num_blocks"]
    if not (isinstance(blocks, (list, tuple)) and len(blocks) == 4 and all(_positive_int(n) for n in blocks)):
        problems.append(f"num_blocks must be 4 whole numbers of at least 1, got {blocks!r}")
    if not isinstance(base["two_emb_layer"], bool):
        problems.append(f"two_emb_layer must be true or false, got {base['two_emb_layer']!r}")
    if not problems and base["m_channels"] * base["baseWidth"] < 64:
        # Each branch of the first stage is floor(m_channels * baseWidth / 64) channels wide.
        problems.append(f"m_channels {base['m_channels']} is too narrow for baseWidth {base['baseWidth']}: "
                        f"m_channels x baseWidth must be at least 64")
    if problems:
        raise ValueError("; ".join(problems))
    base["num_blocks"] = tuple(base["num_blocks"])
    return ERes2NetV2Config(**base)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def build_model(variant: str = DEFAULT_VARIANT, **overrides) -> ERes2NetV2:
    """A freshly initialised ERes2NetV2 of the named variant."""
    return ERes2NetV2(model_config(variant, **overrides))


class ClippedReLU(nn.Hardtanh):
    """ReLU clipped at 20, the activation inside every residual block."""

    def __init__(self) -> None:
        super().__init__(min_val=0.0, max_val=20.0)


class AFF(nn.Module):
    """Attentional feature fusion of two equally shaped maps.

    ``a = 1 + tanh(local_att([x, y]))`` lies in (0, 2); the output ``x*a + y*(2-a)`` leans to
    whichever input the attention favours, per channel and position.
    """

    def __init__(self, channels: int, r: int = 4) -> None:
        super().__init__()
        inter = channels // r
        self.local_att = nn.Sequential(
            nn.Conv2d(2 * channels, inter, kernel_size=1),
            nn.BatchNorm2d(inter),
            nn.SiLU(),
            nn.Conv2d(inter, channels, kernel_size=1),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = 1.0 + torch.tanh(self.local_att(torch.cat((x, y), dim=1)))
        return x * a + y * (2.0 - a)


class Bottleneck(nn.Module):
    """An ERes2NetV2 block: 1x1 expand into ``scale`` sub-bands, a chain of 3x3 convs, 1x1 out.

    With ``fuse=True`` each sub-band joins the chain through AFF instead of addition.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        base_width: int,
        scale: int,
        expansion: int,
        fuse: bool,
    ) -> None:
        super().__init__()
        width = int(math.floor(planes * base_width / 64.0))
        out_planes = planes * expansion
        self.width = width
        self.conv1 = nn.Conv2d(in_planes, width * scale, kernel_size=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False) for _ in range(scale)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale))
        if fuse:
            self.fuse_models = nn.ModuleList(AFF(width) for _ in range(scale - 1))
        else:
            self.fuse_models = None
        self.relu = ClippedReLU()
        self.conv3 = nn.Conv2d(width * scale, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bands = torch.split(self.relu(self.bn1(self.conv1(x))), self.width, dim=1)
        outputs = []
        carry = bands[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            if i > 0:
                if self.fuse_models is None:
                    carry = carry + bands[i]
                else:
                    carry = self.fuse_models[i - 1](carry, bands[i])
            carry = self.relu(bn(conv(carry)))
            outputs.append(carry)
        out = self.bn3(self.conv3(torch.cat(outputs, dim=1)))
        return self.relu(out + self.shortcut(x))


def temporal_statistics(x: torch.Tensor) -> torch.Tensor:
    """Mean and unbiased standard deviation over the last (time) axis, flattened per sample."""
    mean = x.mean(dim=-1).flatten(start_dim=1)
    std = torch.sqrt(torch.var(x, dim=-1) + 1e-8).flatten(start_dim=1)
    return torch.cat((mean, std), dim=1)


class ERes2NetV2(nn.Module):
    """ERes2NetV2 speaker-embedding network (state_dict compatible with 3D-Speaker)."""

    def __init__(self, config: ERes2NetV2Config | None = None) -> None:
        super().__init__()
        config = config or VARIANTS["eres2netv2"]
        self.config = config
        m = config.m_channels
        stats_dim = (config.feat_dim // 8) * m * 8 * config.expansion

        self.conv1 = nn.Conv2d(1, m, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m)
        self._in_planes = m
        self.layer1 = self._stage(m, config.num_blocks[0], stride=1, fuse=False)
        self.layer2 = self._stage(2 * m, config.num_blocks[1], stride=2, fuse=False)
        self.layer3 = self._stage(4 * m, config.num_blocks[2], stride=2, fuse=True)
        self.layer4 = self._stage(8 * m, config.num_blocks[3], stride=2, fuse=True)
        self.layer3_ds = nn.Conv2d(
            4 * m * config.expansion, 8 * m * config.expansion,
            kernel_size=3, stride=2, padding=1, bias=False,
        )
        self.fuse34 = AFF(8 * m * config.expansion, r=4)
        self.seg_1 = nn.Linear(2 * stats_dim, config.embedding_size)
        if config.two_emb_layer:
            self.seg_bn_1 = nn.BatchNorm1d(config.embedding_size, affine=False)
            self.seg_2 = nn.Linear(config.embedding_size, config.embedding_size)
        else:
            self.seg_bn_1 = None
            self.seg_2 = None

    def _stage(self, planes: int, blocks: int, stride: int, fuse: bool) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(
                Bottleneck(
                    self._in_planes, planes, block_stride,
                    base_width=self.config.baseWidth,
                    scale=self.config.scale,
                    expansion=self.config.expansion,
                    fuse=fuse,
                )
            )
            self._in_planes = planes * self.config.expansion
        return nn.Sequential(*layers)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Embed fbank features ``[batch, frames, feat_dim]`` into ``[batch, embedding_size]``."""
        if feature.dim() != 3 or feature.shape[-1] != self.config.feat_dim:
            raise ValueError(
                f"expected features [batch, frames, {self.config.feat_dim}], "
                f"got {list(feature.shape)}"
            )
        if not torch.onnx.is_in_onnx_export():
            check_frames(feature.shape[1])
        x = feature.transpose(1, 2).unsqueeze(1)  # [batch, 1, feat_dim, frames]
        x = F.relu(self.bn1(self.conv1(x)))
        out3 = self.layer3(self.layer2(self.layer1(x)))
        out4 = self.layer4(out3)
        fused = self.fuse34(out4, self.layer3_ds(out3))
        embedding = self.seg_1(temporal_statistics(fused))
        if self.seg_2 is not None:
            embedding = self.seg_2(self.seg_bn_1(F.relu(embedding)))
        return embedding


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
