"""Fitting a checkpoint's backend on a data source and storing it in the checkpoint.

A checkpoint carries at most one backend: an embedding adaptation (center, whiten, wccn; part of
the embedding everywhere) or a PLDA scorer (the embedding unchanged, trials scored by its LLR).
The recordings are embedded by the checkpoint's bare network, never through a backend it already
carries, so fitting again replaces the earlier backend rather than stacking on it; a calibration
and validation figures measured on the earlier scores are dropped with it. The result is written
atomically (a temporary file beside the output, renamed over it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
from spkft.core.checkpoint import LoadedModel, load_model, output_for, with_entries
from spkft.core.data import ScanReport, scan
from spkft.core.embedding import Embedder, resolve_device
from spkft.core.errors import CheckpointError, DataError
from spkft.core.evaluate import Progress, embed_recordings
from spkft.core.files import staged
from spkft.core.plda import DEFAULT_LDA_DIM, Plda, adapt_plda, fit_plda, plda_shortfall

# Checkpoint entries that describe scores of the backend being replaced.
_STALE_WITH_BACKEND = ("adaptation", "plda", "calibration", "evaluation")


@dataclass(frozen=True)
class AdaptResult:
    """What ``adapt_checkpoint`` fitted, why, on what, and where it wrote it."""

    adaptation: Adaptation
    reason: str
    output: Path
    report: ScanReport  # the scan of the data source, with any excluded rows
    replaced: str | None  # the backend the checkpoint carried before (center, whiten, wccn or plda), if any
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
    output = output_for(checkpoint, loaded, output, "an adaptation")

    report = _usable(scan(data, allow_unlabelled=True, progress=scan_progress))
    speakers = [r.speaker for r in report.recordings] if report.labelled and not unlabelled else None
    # Counts and labels decide what can be fitted: fail before the slow part, not after it.
    method, reason = resolve_method(method, len(report.recordings), speakers)
    embeddings = embed_recordings(Embedder(loaded.model, device), report.recordings, embed_progress)
    vectors = np.stack([embeddings[r.utt_id] for r in report.recordings])
    adaptation, _ = fit_adaptation(vectors, speakers, method=method, shrinkage=shrinkage,
                                   source=report.source_label)

    stored = with_entries(loaded, {"adaptation": adaptation.to_dict()}, drop=_STALE_WITH_BACKEND)
    with staged(output) as tmp:
        torch.save(stored, tmp)
    return AdaptResult(
        adaptation=adaptation,
        reason=reason,
        output=output,
        report=report,
        replaced=_backend_of(loaded),
        dropped_evaluation=loaded.checkpoint.get("evaluation") is not None,
    )


@dataclass(frozen=True)
class PldaResult:
    """What ``plda_checkpoint`` fitted (and adapted), on what, and where it wrote it."""

    plda: Plda
    output: Path
    reports: dict[str, ScanReport]  # "data" and/or "adapt_data": the scans, with any excluded rows
    replaced: str | None
    dropped_evaluation: bool
    dropped_calibration: bool


def _backend_of(loaded: LoadedModel) -> str | None:
    if loaded.plda is not None:
        return "plda"
    return None if loaded.adaptation is None else loaded.adaptation.method


def _usable(report: ScanReport) -> ScanReport:
    if not report.recordings:
        first = f": e.g. {report.excluded[0].where}: {report.excluded[0].detail}" if report.excluded else ""
        raise DataError(f"{report.source}: no usable recordings{first}")
    return report


def plda_checkpoint(
    checkpoint: str | Path,
    data: str | Path | None,
    adapt_data: str | Path | None = None,
    output: str | Path | None = None,
    lda_dim: int = DEFAULT_LDA_DIM,
    device: str | torch.device = "cpu",
    scan_progress: Progress | None = None,
    embed_progress: Progress | None = None,
) -> PldaResult:
    """Fit a PLDA scorer on ``data``'s labelled recordings, adapt it to ``adapt_data``'s unlabelled
    ones when given, and write the checkpoint. With no ``data``, the PLDA the checkpoint carries is
    adapted; one already adapted is adapted further (its unadapted fit is not kept)."""
    if data is None and adapt_data is None:
        raise DataError("give --data (labelled recordings to fit the PLDA on), --adapt-data (unlabelled in-domain "
                        "recordings to adapt it to), or both")
    checkpoint = Path(checkpoint)
    device = resolve_device(device)
    loaded = load_model(checkpoint, device=device)
    output = output_for(checkpoint, loaded, output, "a PLDA")
    if data is None and loaded.plda is None:
        raise CheckpointError(f"{checkpoint} carries no PLDA to adapt; give --data to fit one")
    reports: dict[str, ScanReport] = {}
    if data is not None:
        reports["data"] = _usable(scan(data, progress=scan_progress))
    if adapt_data is not None:
        reports["adapt_data"] = _usable(scan(adapt_data, allow_unlabelled=True, progress=scan_progress))
    if data is not None:
        # Counts and labels decide whether PLDA can be fitted: fail before the slow part, not after it.
        recordings = reports["data"].recordings
        problem = plda_shortfall(len(recordings), [r.speaker for r in recordings])
        if problem is not None:
            raise DataError(f"{reports['data'].source}: cannot fit plda: {problem}")
    embedder = Embedder(loaded.model, device)

    def vectors(report: ScanReport) -> np.ndarray:
        found = embed_recordings(embedder, report.recordings, embed_progress)
        return np.stack([found[r.utt_id] for r in report.recordings])

    if data is not None:
        report = reports["data"]
        plda = fit_plda(vectors(report), [r.speaker for r in report.recordings], lda_dim=lda_dim,
                        source=report.source_label)
    else:
        plda = loaded.plda
    if adapt_data is not None:
        plda = adapt_plda(plda, vectors(reports["adapt_data"]), source=reports["adapt_data"].source_label)

    with staged(output) as tmp:
        torch.save(with_entries(loaded, {"plda": plda.to_dict()}, drop=_STALE_WITH_BACKEND), tmp)
    return PldaResult(plda=plda, output=output, reports=reports, replaced=_backend_of(loaded),
                      dropped_evaluation=loaded.checkpoint.get("evaluation") is not None,
                      dropped_calibration=loaded.calibration is not None)
