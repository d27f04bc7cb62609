"""``spkft calibrate``: fit the map from a model's scores to log-likelihood ratios and store it with the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from spkft.core.calibrate import calibrate_checkpoint
from spkft.core.calibration import bayes_threshold, odds
from spkft.tui.cli.evaluate import Feedback, _check_p_target, _scan, _trials
from spkft.tui.cli.inference import CheckpointOption, DeviceOption


def calibrate_command(
    checkpoint: CheckpointOption,
    data: Annotated[
        Path,
        typer.Option("--data", "-d", help="Labelled recordings of speakers the model was not trained on (its "
                                          "validation speakers will do): a CSV list, a folder of speaker folders "
                                          "or a Kaldi data directory.", show_default=False),
    ],
    trials_file: Annotated[
        Optional[Path],
        typer.Option("--trials", help="Trial list naming utterance ids of --data; generated when omitted."),
    ] = None,
    durations: Annotated[
        bool, typer.Option("--durations/--no-durations",
                           help="Let the shorter side's speech duration weigh the evidence (short recordings give "
                                "less reliable scores).")
    ] = True,
    p_target: Annotated[
        float, typer.Option("--p-target", callback=_check_p_target,
                            help="The prior of a same-speaker trial at which the decision is described.")
    ] = 0.01,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write the calibrated checkpoint here [default: replace CKPT in place, "
                                            "atomically]."),
    ] = None,
    segment_seconds: Annotated[
        float, typer.Option("--segment-seconds", help="Generated trials: recordings at least twice this long are "
                                                      "cut into segments of at least this length.")
    ] = 4.0,
    max_trials: Annotated[
        int, typer.Option("--max-trials", min=20, help="Generated trials: at most half of these are same-speaker.")
    ] = 20_000,
    seed: Annotated[int, typer.Option("--seed", help="Generated trials: seed of the sampled pairs.")] = 0,
    device: DeviceOption = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of lines.")] = False,
) -> None:
    """Fit the map from the model's scores to calibrated log-likelihood ratios and store it with the model.

    The trials are scored as the model scores them (its PLDA when it carries one, else the cosine).
    eval then reports Cllr and actual DCF, and serve answers Verify with an LLR and a probability
    and decides at the Bayes threshold of the prior and costs it is given.
    """
    with Feedback(show_progress=not as_json) as feedback:
        report = _scan(data, "data", feedback)
        recordings, trials = _trials(report, trials_file, segment_seconds, max_trials, seed)
        result = calibrate_checkpoint(checkpoint, recordings, trials, output=output, durations=durations,
                                      source=report.source_label, device=device,
                                      progress=feedback.track("embedding"))
    calibration, measures = result.calibration, result.measures
    threshold = bayes_threshold(p_target)
    if as_json:
        typer.echo(json.dumps({"calibration": calibration.to_dict(), "measures": measures.to_dict(),
                               "p_target": p_target, "llr_threshold": threshold, "output": str(result.output)}))
        return
    replaced = ", replacing its calibration" if result.replaced else ""
    typer.echo(f"fitted a map of {calibration.describe()}; wrote {result.output}{replaced}")
    typer.echo(f"on these trials: Cllr {measures.cllr:.3f} bits (min {measures.min_cllr:.3f}); "
               + "; ".join(f"actual DCF at p_target {p:g} {value:.4f} (min {measures.min_dcf[p]:.4f})"
                           for p, value in measures.act_dcf.items()))
    typer.echo(f"at p_target {p_target:g} (equal costs) it accepts when the evidence favours the same speaker at "
               f"least {odds(threshold)}: LLR >= {threshold:.2f}")


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_command)
