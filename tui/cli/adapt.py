"""``spkft adapt``: fit a backend (an embedding adaptation or a PLDA scorer) and store it in the checkpoint."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from spkft.core.adapt import adapt_checkpoint, plda_checkpoint
from spkft.core.adaptation import AUTO, DEFAULT_SHRINKAGE, MIN_COVARIANCE_SAMPLES
from spkft.core.plda import DEFAULT_LDA_DIM
from spkft.tui.cli.evaluate import Feedback
from spkft.tui.cli.inference import CheckpointOption, DeviceOption

# Below this many training speakers, adapt says that a PLDA fitted on them is a rough one.
FEW_PLDA_SPEAKERS = 100

class Method(str, Enum):
    auto = AUTO
    center = "center"
    whiten = "whiten"
    wccn = "wccn"
    plda = "plda"


def adapt_command(
    checkpoint: CheckpointOption,
    data: Annotated[
        Optional[Path],
        typer.Option("--data", "-d", help="Recordings to fit on: a CSV list, a folder of speaker folders, a Kaldi "
                                          "data directory, or a folder of audio files without labels. center, "
                                          "whiten and wccn: in-domain ones. plda: labelled ones of many speakers "
                                          "heard several times (a general corpus will do).",
                     show_default=False),
    ] = None,
    method: Annotated[
        Method,
        typer.Option("--method", "--backend",
                     help="center: subtract the domain's mean embedding. whiten: also even out its "
                          "variation across directions (no labels needed). wccn: instead suppress "
                          "within-speaker variation (needs labels). auto: wccn when labels give "
                          f"{MIN_COVARIANCE_SAMPLES} within-speaker degrees of freedom, else whiten "
                          f"from {MIN_COVARIANCE_SAMPLES} recordings, else center. plda: score trials by a "
                          "PLDA log-likelihood ratio instead of the cosine (needs labels; --adapt-data adapts "
                          "it to unlabelled in-domain recordings)."),
    ] = Method.auto,
    adapt_data: Annotated[
        Optional[Path],
        typer.Option("--adapt-data", help="plda: unlabelled recordings of the domain it will serve; the PLDA's "
                                          "mean and covariances move toward them. Without --data, the "
                                          "checkpoint's own PLDA is adapted.", show_default=False),
    ] = None,
    lda_dim: Annotated[
        int, typer.Option("--lda-dim", min=1, help="plda: LDA dimensions kept (at most speakers - 1).")
    ] = DEFAULT_LDA_DIM,
    unlabelled: Annotated[
        bool, typer.Option("--unlabelled", help="Ignore the data's speaker labels (so no wccn).")
    ] = False,
    shrinkage: Annotated[
        float,
        typer.Option("--shrinkage", min=0.0, max=1.0,
                     help="whiten and wccn: the weight of a scaled identity in the covariance (0: none, 1: the "
                          "same as center); guards few recordings in many dimensions."),
    ] = DEFAULT_SHRINKAGE,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write the adapted checkpoint here [default: replace CKPT in place, "
                                            "atomically]."),
    ] = None,
    device: DeviceOption = "cpu",
) -> None:
    """Fit a backend on recordings, with no retraining, and store it with the model.

    The recordings are embedded by the checkpoint's network without any earlier backend, which the
    new one replaces (with any calibration of the old scores). An adaptation is part of the
    embedding in eval, embed, verify and export (and so serve); a PLDA scores eval's and verify's
    trials.
    """
    if method is Method.plda:
        if unlabelled:
            raise typer.BadParameter("plda learns from speaker labels; give unlabelled recordings as --adapt-data",
                                     param_hint="--unlabelled")
        _fit_plda(checkpoint, data, adapt_data, output, lda_dim, device)
        return
    if adapt_data is not None:
        raise typer.BadParameter("only plda is adapted to other recordings; center, whiten and wccn are fitted "
                                 "on --data itself", param_hint="--adapt-data")
    if data is None:
        raise typer.BadParameter("the in-domain recordings to fit on are required", param_hint="--data")
    if unlabelled and method is Method.wccn:
        raise typer.BadParameter("wccn needs speaker labels, which --unlabelled ignores", param_hint="--method")
    with Feedback(show_progress=True) as feedback:
        result = adapt_checkpoint(
            checkpoint, data, output=output, method=method.value, unlabelled=unlabelled, shrinkage=shrinkage,
            device=device, scan_progress=feedback.track("scanning data"),
            embed_progress=feedback.track("embedding"),
        )
        report = result.report
        if report.excluded:
            first = report.excluded[0]
            feedback.note(f"{report.source}: {len(report.excluded)} row(s) excluded, "
                          f"e.g. {first.where}: {first.detail}")
        if result.dropped_evaluation:
            feedback.note("note: the checkpoint's validation figures were measured without adaptation and are "
                          "dropped; measure the adapted model with spkft eval")
    replaced = "" if result.replaced is None else f", replacing its {result.replaced} backend"
    typer.echo(f"fitted {result.adaptation.describe()} ({result.reason}); wrote {result.output}{replaced}")


def _fit_plda(checkpoint: Path, data: Optional[Path], adapt_data: Optional[Path], output: Optional[Path],
              lda_dim: int, device: str) -> None:
    if data is None and adapt_data is None:
        raise typer.BadParameter("plda needs --data (labelled recordings to fit on), --adapt-data (unlabelled "
                                 "in-domain recordings to adapt the checkpoint's PLDA to), or both",
                                 param_hint="--data")
    with Feedback(show_progress=True) as feedback:
        result = plda_checkpoint(checkpoint, data, adapt_data, output=output, lda_dim=lda_dim, device=device,
                                 scan_progress=feedback.track("scanning data"),
                                 embed_progress=feedback.track("embedding"))
        for report in result.reports.values():
            if report.excluded:
                first = report.excluded[0]
                feedback.note(f"{report.source}: {len(report.excluded)} row(s) excluded, "
                              f"e.g. {first.where}: {first.detail}")
        if "data" in result.reports and result.plda.speakers < FEW_PLDA_SPEAKERS:
            feedback.note(f"note: a PLDA learns how speakers differ from {result.plda.speakers} speakers here; "
                          f"from fewer than {FEW_PLDA_SPEAKERS} its between-speaker covariance is rough: fit it on a "
                          "general corpus of many speakers and adapt it to yours with --adapt-data")
        dropped = [what for what, gone in (("validation figures", result.dropped_evaluation),
                                           ("calibration", result.dropped_calibration)) if gone]
        if dropped:
            feedback.note(f"note: dropped the checkpoint's {' and '.join(dropped)}, which described its earlier "
                          "scores; measure with spkft eval"
                          + (", calibrate with spkft calibrate" if result.dropped_calibration else ""))
    replaced = "" if result.replaced is None else f", replacing its {result.replaced} backend"
    typer.echo(f"fitted {result.plda.describe()}; wrote {result.output}{replaced}")


def register(app: typer.Typer) -> None:
    app.command("adapt")(adapt_command)
