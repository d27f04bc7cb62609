"""Fitting a checkpoint's backend adaptation on a data source and storing it in the checkpoint.

The recordings are embedded by the checkpoint's bare network, never through an adaptation it
already carries, so fitting again replaces the earlier adaptation rather than stacking on it.
The result is written atomically (a temporary file beside the output, renamed over it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spkft.core.adaptation import (
    AUTO,
    DEFAULT_SHRINKAGE,
    Adaptation,
    check_shrinkage,
    fit_adaptation,
    resolve_method,
)
from spkft.core.checkpoint import SPKFT_FORMAT, LoadedModel, embedding_checkpoint, load_model
from spkft.core.data import ScanReport, scan
from spkft.core.embedding import Embedder, resolve_device
from spkft.core.errors import CheckpointError, DataError
from spkft.core.evaluate import Progress, embed_recordings
from spkft.core.files import staged


@dataclass(frozen=True)
class AdaptResult:
    """What ``adapt_checkpoint`` fitted, why, on what, and where it wrote it."""

    adaptation: Adaptation
    reason: str
    output: Path
    report: ScanReport  # the scan of the data source, with any excluded rows
    replaced: str | None  # the method of the adaptation the checkpoint carried before, if any
    dropped_evaluation: bool  # the checkpoint's validation figures, measured without adaptation, were removed


def adapt_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    output: str | Path | None = None,
    method: str = AUTO,
    unlabelled: bool = False,
    shrinkage: float = DEFAULT_SHRINKAGE,
    device: str | torch.device = "cpu",
    scan_progress: Progress | None = None,
    embed_progress: Progress | None = None,
) -> AdaptResult:
    """Embed ``data``'s recordings with the checkpoint's bare model, fit an adaptation, write the checkpoint.

    ``output`` defaults to ``checkpoint`` itself (replaced atomically); a 3D-Speaker state_dict
    needs an ``output``, since the adapted file is an spkft checkpoint that 3D-Speaker's tools
    cannot read. ``unlabelled`` ignores the source's speaker labels; a folder of audio files has
    none. A checkpoint's stored validation result describes the unadapted model, so it is dropped
    (its thresholds would not fit the adapted embeddings).
    """
    check_shrinkage(shrinkage)
    checkpoint = Path(checkpoint)
    device = resolve_device(device)
    loaded = load_model(checkpoint, device=device)
    is_spkft = loaded.checkpoint.get("format") == SPKFT_FORMAT
    if output is None:
        if not is_spkft:
            raise CheckpointError(f"{checkpoint} is a 3D-Speaker state_dict, which cannot hold an adaptation; "
                                  "give an output file for the adapted spkft checkpoint")
        output = checkpoint
    output = Path(output)

    report = scan(data, allow_unlabelled=True, progress=scan_progress)
    if not report.recordings:
        first = f": e.g. {report.excluded[0].where}: {report.excluded[0].detail}" if report.excluded else ""
        raise DataError(f"{report.source}: no usable recordings{first}")
    speakers = [r.speaker for r in report.recordings] if report.labelled and not unlabelled else None
    # Counts and labels decide what can be fitted: fail before the slow part, not after it.
    method, reason = resolve_method(method, len(report.recordings), speakers)
    embeddings = embed_recordings(Embedder(loaded.model, device), report.recordings, embed_progress)
    vectors = np.stack([embeddings[r.utt_id] for r in report.recordings])
    adaptation, _ = fit_adaptation(vectors, speakers, method=method, shrinkage=shrinkage,
                                   source=report.source_label)

    stored = _adapted_checkpoint(loaded, adaptation)
    with staged(output) as tmp:
        torch.save(stored, tmp)
    return AdaptResult(
        adaptation=adaptation,
        reason=reason,
        output=output,
        report=report,
        replaced=None if loaded.adaptation is None else loaded.adaptation.method,
        dropped_evaluation=is_spkft and loaded.checkpoint.get("evaluation") is not None,
    )


def _adapted_checkpoint(loaded: LoadedModel, adaptation: Adaptation) -> dict[str, Any]:
    """The checkpoint as read, with ``adaptation`` in place of any earlier one and no stale evaluation."""
    if loaded.checkpoint.get("format") != SPKFT_FORMAT:
        return embedding_checkpoint(loaded.model, loaded.variant, adaptation=adaptation.to_dict())
    kept = {k: v for k, v in loaded.checkpoint.items() if k not in ("adaptation", "evaluation")}
    return kept | {"adaptation": adaptation.to_dict()}
