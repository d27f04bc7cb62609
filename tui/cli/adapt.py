"""``spkft adapt``: fit a backend adaptation on in-domain recordings and store it in the checkpoint."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from spkft.core.adapt import adapt_checkpoint
from spkft.core.adaptation import AUTO, DEFAULT_SHRINKAGE, MIN_COVARIANCE_SAMPLES
from spkft.tui.cli.evaluate import Feedback
from spkft.tui.cli.inference import CheckpointOption, DeviceOption

class Method(str, Enum):
    auto = AUTO
    center = "center"
    whiten = "whiten"
    wccn = "wccn"


def adapt_command(
    checkpoint: CheckpointOption,
    data: Annotated[
        Path,
        typer.Option("--data", "-d", help="In-domain recordings: a CSV list, a folder of speaker folders, a Kaldi "
                                          "data directory, or a folder of audio files without labels.",
                     show_default=False),
    ],
    method: Annotated[
        Method,
        typer.Option("--method", help="center: subtract the domain's mean embedding. whiten: also even out its "
                                      "variation across directions (no labels needed). wccn: instead suppress "
                                      "within-speaker variation (needs labels). auto: wccn when labels give "
                                      f"{MIN_COVARIANCE_SAMPLES} within-speaker degrees of freedom, else whiten "
                                      f"from {MIN_COVARIANCE_SAMPLES} recordings, else center."),
    ] = Method.auto,
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
    """Fit a backend adaptation on in-domain recordings, with no retraining, and store it with the model.

    The recordings are embedded by the checkpoint's network without any earlier adaptation, which
    the new one replaces. eval, embed, verify and export (and so serve) apply it.
    """
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
    replaced = "" if result.replaced is None else f", replacing its {result.replaced} adaptation"
    typer.echo(f"fitted {result.adaptation.describe()} ({result.reason}); wrote {result.output}{replaced}")


def register(app: typer.Typer) -> None:
    app.command("adapt")(adapt_command)
