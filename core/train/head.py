"""The new classification head: a cosine classifier with an additive angular margin (AAM-softmax).

logit_j = s * cos(theta_j) for other speakers and s * cos(theta_y + m) for the true one
(Deng et al., ArcFace, 2019), as 3D-Speaker trains ERes2NetV2. Cosines are clamped away from
+-1 so that the arc-cosine's gradient never becomes infinite (the source of NaN losses).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6


class AAMSoftmaxHead(nn.Module):
    """Cosine classifier over ``num_classes`` speakers with margin ``margin`` and scale ``scale``."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 32.0, margin: float = 0.2,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_normal_(self.weight)
        self.scale = scale
        self.margin = margin
        self.label_smoothing = label_smoothing

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each embedding to each class centre, clamped inside (-1, 1)."""
        # Autocast would run this product in bf16/fp16, where 1 - _EPS rounds to 1 and the clamp
        # no longer keeps the arc-cosine's gradient finite: the head always computes in fp32.
        with torch.autocast(embeddings.device.type, enabled=False):
            cos = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
        return cos.clamp(-1.0 + _EPS, 1.0 - _EPS)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss (mean over the batch) and the margin-free logits, for accuracy."""
        cos = self.cosine(embeddings)
        target = cos.gather(1, labels.unsqueeze(1))
        theta = torch.acos(target)
        # Past pi - m, cos(theta + m) would turn back up; continue it monotonically instead.
        with_margin = torch.where(
            theta + self.margin <= math.pi,
            torch.cos(theta + self.margin),
            target - self.margin * math.sin(self.margin),
        )
        logits = cos.scatter(1, labels.unsqueeze(1), with_margin) * self.scale
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return loss, cos.detach()
