"""``spkft export``: a checkpoint to ONNX (checked against PyTorch) or to 3D-Speaker's own format."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from spkft.core.export import (
    DEFAULT_LANGUAGE,
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    ExportResult,
    export_3dspeaker,
    export_onnx,
)
from spkft.core.metrics import VerificationMetrics
from spkft.core.quantize import (
    DEFAULT_CALIBRATION_CROPS,
    DEFAULT_MAX_EER_INCREASE,
    DEFAULT_MAX_FP32_LAYERS,
    Int8Settings,
    eer_increase,
    relative,
)
from spkft.tui.cli.inference import CHECKPOINT_HELP, VariantOption, check_variant
from spkft.tui.cli.models import fetch_released


class ExportFormat(str, Enum):
    onnx = "onnx"
    threedspeaker = "3dspeaker"


class Quantization(str, Enum):
    int8 = "int8"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _summary(result: ExportResult) -> list[str]:
    parity = result.parity
    kind = f"ONNX opset {result.opset}" if result.format == "onnx" else "3D-Speaker state_dict"
    checked = (f"batch sizes {', '.join(map(str, parity.batch_sizes))}; "
               f"lengths {', '.join(map(str, parity.frame_counts))} frames")
    against = "onnxruntime vs PyTorch" if result.format == "onnx" else "reloaded vs original"
    lines = [
        f"wrote {result.output} ({kind}, {_megabytes(result.size_bytes)}) in {result.seconds:.1f} s",
        f"parity, {against}: worst cosine {parity.worst_cosine:.7f}, max abs diff {parity.max_abs_diff:.2g} ({checked})",
    ]
    if result.quantized is not None:
        q = result.quantized
        forced = " (forced: its EER rose beyond the tolerance)" if q.forced else ""
        lines.append(f"int8: wrote {q.path}{forced} ({_megabytes(q.size_bytes)}, "
                     f"{q.size_bytes / result.size_bytes:.0%} of fp32), calibrated on {q.calibration}")
        if q.fp32_layers:
            lines.append(f"int8: {len(q.fp32_layers)} layer(s) in fp32: {', '.join(q.fp32_layers)}")
        lines.extend(int8_comparison(q.fp32, q.int8, q.max_eer_increase, q.evaluation_source))
    if result.metadata:
        lines.append("metadata:")
        lines.extend(f"  {key} = {value}" for key, value in result.metadata.items())
    return lines


def int8_comparison(fp32: VerificationMetrics, int8: VerificationMetrics, allowed: float, trials_of: str) -> list[str]:
    """Both models' EER, minDCF and thresholds on the same trials, and the verdict of the check."""
    trials = fp32.target_trials + fp32.nontarget_trials
    increase = eer_increase(fp32.eer, int8.eer)
    within = "within" if increase <= allowed else "beyond"
    return [
        f"int8 against fp32 on {trials} trials ({trials_of}), both in OpenVINO: EER "
        f"{relative(increase)}, {within} the {100 * allowed:g} % allowed",
        *(_figures(name, metrics) for name, metrics in (("fp32", fp32), ("int8", int8))),
    ]


def _figures(name: str, metrics: VerificationMetrics) -> str:
    return (f"  {name}: EER {100 * metrics.eer:.2f} % (threshold {metrics.eer_threshold:.4f}), minDCF "
            f"{metrics.min_dcf:.4f} (threshold {metrics.min_dcf_threshold:.4f})")


def export_command(
    checkpoints: Annotated[
        list[Path],
        typer.Option("--checkpoint", "-c", envvar="SPKFT_CHECKPOINT", show_default=False, callback=fetch_released,
                     help=CHECKPOINT_HELP + " Repeat it to export the average of several checkpoints of one "
                                            "network (e.g. a run's epochs/ snapshots)."),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="File to write (model.onnx, or a .ckpt with --format 3dspeaker).",
                           show_default=False),
    ],
    export_format: Annotated[
        ExportFormat,
        typer.Option("--format", help="onnx: an ONNX model with metadata, for onnxruntime, sherpa-onnx and spkft "
                                      "serve (with the checkpoint's adaptation, if any, in the graph). 3dspeaker: "
                                      "the plain embedding-model state_dict of upstream's pretrained_*.ckpt, for "
                                      "3D-Speaker's own tools (the network alone: an adaptation is left out, with "
                                      "a warning)."),
    ] = ExportFormat.onnx,
    opset: Annotated[
        Optional[int], typer.Option("--opset", min=MIN_OPSET, max=MAX_OPSET,
                                    help=f"ONNX opset version [default: {DEFAULT_OPSET}].")
    ] = None,
    quantize: Annotated[
        Optional[Quantization],
        typer.Option("--quantize", help="Also write <name>.int8.onnx beside the output: NNCF's static int8 "
                                        "quantization, calibrated on --calibration, written only if its EER on the "
                                        "evaluation trials stays within --max-eer-increase of fp32's."),
    ] = None,
    calibration: Annotated[
        Optional[Path],
        typer.Option("--calibration", help="int8: recordings to calibrate on (a data source; speaker labels not "
                                           "needed) [default: the run's training data, from the checkpoint]."),
    ] = None,
    eval_data: Annotated[
        Optional[Path],
        typer.Option("--eval-data", help="int8: labelled recordings whose generated trials measure fp32 and int8 "
                                         "[default: the run's validation trials, from the checkpoint]."),
    ] = None,
    calibration_crops: Annotated[
        Optional[int],
        typer.Option("--calibration-crops", min=1, show_default=False,
                     help=f"int8: how many 3 s crops calibrate it [default: {DEFAULT_CALIBRATION_CROPS}]."),
    ] = None,
    max_eer_increase: Annotated[
        Optional[float],
        typer.Option("--max-eer-increase", min=0.0, show_default=False,
                     help="int8: refuse to write it when its EER exceeds fp32's by more than this fraction of it "
                          f"[default: {DEFAULT_MAX_EER_INCREASE:g}, i.e. 2 % relative]."),
    ] = None,
    max_fp32_layers: Annotated[
        Optional[int],
        typer.Option("--max-fp32-layers", min=0, show_default=False,
                     help="int8: when the fully quantized model's EER rises too much, put back in fp32, one at a "
                          "time, up to this many of the layers int8 damages most (NNCF's accuracy control; each "
                          f"costs a little speed and a search) [default: {DEFAULT_MAX_FP32_LAYERS}; 0: no search]."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="int8: write it even when its EER rose too much (marked as forced, "
                                           "so serving never picks it on its own).")
    ] = False,
    language: Annotated[
        Optional[str], typer.Option("--language", help="Free-text 'language' metadata (sherpa-onnx shows it) "
                                                       f"[default: {DEFAULT_LANGUAGE}].")
    ] = None,
    threshold: Annotated[
        Optional[float],
        typer.Option("--threshold", "-t", min=-1.0, max=1.0,
                     help="Decision threshold stored in the metadata as the default for serving and verify "
                          "[default: the checkpoint's validation EER threshold, if it has one]."),
    ] = None,
    variant: VariantOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Export a checkpoint and check the result against the PyTorch model before writing it.

    The ONNX model has input 'feature' [batch, frames, 80] (mean-normalised fbank) and output
    'embedding' [batch, 192]; nothing is written unless onnxruntime's embeddings match PyTorch's
    (cosine >= 0.99999) for several batch sizes and lengths.
    """
    check_variant(variant)
    onnx_options = {"opset": opset, "quantize": quantize and quantize.value, "language": language,
                    "threshold": threshold}
    given = {name: value for name, value in onnx_options.items() if value is not None}
    if export_format is ExportFormat.threedspeaker and given:
        shown = ", ".join(f"--{name}" for name in given)
        raise typer.BadParameter(f"{shown} only apply to --format onnx", param_hint="--format")
    int8_options = {"calibration": calibration, "eval-data": eval_data, "calibration-crops": calibration_crops,
                    "max-eer-increase": max_eer_increase, "max-fp32-layers": max_fp32_layers, "force": force or None}
    int8_given = [f"--{name}" for name, value in int8_options.items() if value is not None]
    if int8_given and quantize is None:
        raise typer.BadParameter(f"{', '.join(int8_given)}: only with --quantize int8", param_hint="--quantize")
    int8 = Int8Settings(calibration, eval_data, calibration_crops or DEFAULT_CALIBRATION_CROPS,
                        DEFAULT_MAX_EER_INCREASE if max_eer_increase is None else max_eer_increase,
                        DEFAULT_MAX_FP32_LAYERS if max_fp32_layers is None else max_fp32_layers, force)
    checkpoint = checkpoints[0] if len(checkpoints) == 1 else checkpoints
    if len(checkpoints) > 1:
        note = (" (averaged weights carry no validation result: no threshold is stored unless --threshold "
                   "is given)" if export_format is ExportFormat.onnx and threshold is None else "")
        typer.echo(f"exporting the average of {len(checkpoints)} checkpoints: "
                   f"{', '.join(map(str, checkpoints))}{note}", err=as_json)
    if export_format is ExportFormat.threedspeaker:
        result = export_3dspeaker(checkpoint, output, variant=variant)
    else:
        result = export_onnx(checkpoint, output, variant=variant, **given, int8=int8,
                             note=lambda line: typer.echo(line, err=True))
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo("\n".join(_summary(result)))


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
