"""``spkft embed`` and ``spkft verify``: embeddings and scores from recordings."""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from spkft.core.calibration import bayes_threshold, probability
from spkft.core.checkpoint import LoadedModel, load_model
from spkft.core.embedding import Embedder, SpeakerEmbedder, cosine_score, resolve_device
from spkft.core.errors import AudioError
from spkft.core.files import staged
from spkft.core.model import VARIANTS
from spkft.core.onnx_model import OnnxEmbedder
from spkft.core.plda import score_kind
from spkft.tui.cli.models import fetch_released
from spkft.tui.cli.output import compact_floats, score_against

CHECKPOINT_HELP = ("Model weights: a released model's name (spkft models list; downloaded on first use), a "
                   "3D-Speaker .ckpt or an spkft checkpoint.")
CheckpointOption = Annotated[
    Path, typer.Option("--checkpoint", "-c", help=CHECKPOINT_HELP, envvar="SPKFT_CHECKPOINT",
                       callback=fetch_released),
]
EitherCheckpointOption = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", "-c", help=CHECKPOINT_HELP + " Give this or --model.", envvar="SPKFT_CHECKPOINT",
                 callback=fetch_released),
]
ModelOption = Annotated[
    Optional[Path],
    typer.Option(
        "--model", "-m",
        help="An ONNX model written by 'spkft export', run on the CPU (see --engine). Give this or --checkpoint.",
        envvar="SPKFT_MODEL",
    ),
]
VariantOption = Annotated[
    Optional[str],
    typer.Option(
        "--variant",
        help=f"Model variant ({', '.join(VARIANTS)}); read off the checkpoint when omitted.",
    ),
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="Where to run the model: cpu, cuda or cuda:N.")
]


class Engine(str, Enum):
    auto = "auto"
    openvino = "openvino"
    onnxruntime = "onnxruntime"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    int8 = "int8"


EngineOption = Annotated[
    Engine,
    typer.Option("--engine", envvar="SPKFT_ENGINE",
                 help="What runs an ONNX model: openvino, or onnxruntime (the reference runtime, fp32 or int8); "
                      "auto is OpenVINO, falling back to onnxruntime for a graph it cannot compile."),
]
PrecisionOption = Annotated[
    Precision,
    typer.Option("--precision", envvar="SPKFT_PRECISION",
                 help="Arithmetic of an ONNX model: fp32; bf16 (OpenVINO, on CPUs with native bfloat16; about "
                      "twice as fast, embeddings within a cosine of ~1e-5 of fp32); or int8 (the model's "
                      "<name>.int8.onnx from 'spkft export --quantize int8', or an int8 file itself). auto is the "
                      "int8 model where one verified by its EER check sits beside the model (OpenVINO only), "
                      "else bf16 where available, else fp32."),
]


def check_variant(variant: Optional[str]) -> None:
    if variant is not None and variant not in VARIANTS:
        raise typer.BadParameter(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}",
                                 param_hint="--variant")


def _embedder(checkpoint: Optional[Path], model: Optional[Path], variant: Optional[str], device: str,
              engine: Engine, precision: Precision) -> tuple[SpeakerEmbedder, LoadedModel | None]:
    """The PyTorch checkpoint's or the ONNX model's embedder (exactly one of them must be given), and
    the checkpoint as loaded (None for an ONNX model)."""
    check_variant(variant)
    if (checkpoint is None) == (model is None):
        raise typer.BadParameter("give exactly one of --checkpoint (PyTorch weights) and --model (an ONNX model)",
                                 param_hint="--checkpoint / --model")
    if model is None:
        if (engine, precision) != (Engine.auto, Precision.auto):
            raise typer.BadParameter("apply to --model only; a checkpoint runs in PyTorch (see --device)",
                                     param_hint="--engine / --precision")
        resolved = resolve_device(device)
        loaded = load_model(checkpoint, variant=variant, device=resolved)
        return Embedder(loaded.inference_model, resolved), loaded
    if variant is not None:
        raise typer.BadParameter("applies to --checkpoint only; an ONNX model's metadata names its variant",
                                 param_hint="--variant")
    if device != "cpu":
        raise typer.BadParameter("--model runs on the CPU; --device applies to --checkpoint only",
                                 param_hint="--device")
    return OnnxEmbedder.from_file(model, engine=engine.value, precision=precision.value), None


def embed(
    files: Annotated[list[Path], typer.Argument(help="Audio files (WAV, FLAC, OGG, MP3).", metavar="FILE...", show_default=False)],
    checkpoint: EitherCheckpointOption = None,
    model: ModelOption = None,
    variant: VariantOption = None,
    device: DeviceOption = "cpu",
    engine: EngineOption = Engine.auto,
    precision: PrecisionOption = Precision.auto,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write a float32 [files, dim] array to this .npy file instead of JSON lines."),
    ] = None,
) -> None:
    """Print one JSON object per file: path, L2-normalised embedding and duration.

    A file that cannot be read is reported on stderr and the exit code is 1; with --output,
    nothing is written unless every file was embedded.
    """
    embedder, _ = _embedder(checkpoint, model, variant, device, engine, precision)
    vectors = []
    failed = 0
    for path in files:
        try:
            result = embedder.embed(path)
        except AudioError as exc:
            typer.echo(f"error: {exc}", err=True)
            failed += 1
            continue
        if output is None:
            record = {"path": str(path), "embedding": compact_floats(result.vector),
                      "duration_seconds": round(result.duration_seconds, 4)}
            typer.echo(json.dumps(record))
        else:
            vectors.append(result.vector)
    if failed:
        if output is not None:
            typer.echo(f"error: {failed} of {len(files)} file(s) failed; {output} was not written", err=True)
        raise typer.Exit(1)
    if output is not None:
        with staged(output) as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.stack(vectors).astype(np.float32))
        typer.echo(f"wrote {len(vectors)} embedding(s) of dimension {vectors[0].shape[0]} to {output}", err=True)


def verify(
    file_a: Annotated[Path, typer.Argument(help="First recording.", metavar="FILE_A", show_default=False)],
    file_b: Annotated[Path, typer.Argument(help="Second recording.", metavar="FILE_B", show_default=False)],
    checkpoint: EitherCheckpointOption = None,
    model: ModelOption = None,
    variant: VariantOption = None,
    device: DeviceOption = "cpu",
    engine: EngineOption = Engine.auto,
    precision: PrecisionOption = Precision.auto,
    threshold: Annotated[
        Optional[float],
        typer.Option("--threshold", "-t",
                     help="Accept as the same speaker when the score is at least this (in [-1, 1] for cosine "
                          "scores). Without it: a calibrated model decides at the Bayes threshold of --p-target; "
                          "else, with --model, the threshold stored at export (the validation EER threshold, or "
                          "export's --threshold), when the model has one."),
    ] = None,
    p_target: Annotated[
        float, typer.Option("--p-target", help="Calibrated models: the prior of the same speaker, for the "
                                               "probability and the decision (equal costs).")
    ] = 0.01,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Score two recordings (cosine, or PLDA LLR) and, with a threshold or a calibration, decide."""
    if not 0 < p_target < 1:
        raise typer.BadParameter(f"must lie strictly between 0 and 1, got {p_target:g}", param_hint="--p-target")
    embedder, loaded = _embedder(checkpoint, model, variant, device, engine, precision)
    scorer = loaded if loaded is not None else embedder  # both carry the PLDA and calibration, if any
    plda, calibration = scorer.plda, scorer.calibration
    if threshold is not None and (not math.isfinite(threshold) or (plda is None and not -1 <= threshold <= 1)):
        raise typer.BadParameter(f"must be {'finite' if plda is not None else 'in [-1, 1] for cosine scores'}, "
                                 f"got {threshold:g}", param_hint="--threshold")
    threshold_source = None if threshold is None else "option"
    if threshold is None and calibration is None and isinstance(embedder, OnnxEmbedder) \
            and embedder.default_threshold is not None:
        threshold, threshold_source = embedder.default_threshold, "model"
    first, second = embedder.embed(file_a), embedder.embed(file_b)
    if plda is None:
        score = cosine_score(first.vector, second.vector)
    else:
        score = float(plda.llr(first.vector[None, :], second.vector[None, :])[0])
    llr = chance = llr_threshold = None
    if calibration is not None:
        llr = float(calibration.llr(score, first.duration_seconds, second.duration_seconds))
        chance = float(probability(llr, p_target))
        if threshold is None:
            llr_threshold = bayes_threshold(p_target)
    accepted = (llr >= llr_threshold if llr_threshold is not None else
                None if threshold is None else score >= threshold)
    if as_json:
        record = {"file_a": str(file_a), "file_b": str(file_b), "scoring": score_kind(plda),
                  "score": round(score, 6), "threshold": threshold, "threshold_source": threshold_source,
                  "accepted": accepted}
        if llr is not None:
            record |= {"llr": round(llr, 6), "probability": round(chance, 6), "p_target": p_target,
                       "llr_threshold": llr_threshold}
        typer.echo(json.dumps(record))
        return
    if llr is not None:
        evidence = f"score {score:.4f}, LLR {llr:.2f}: P(same speaker) {chance:.3f} at prior {p_target:g}"
        if llr_threshold is None:
            shown, bar = score_against(score, threshold)
            verdict = "same speaker" if accepted else "different speakers"
            typer.echo(f"{evidence}; score {shown} {'>=' if accepted else '<'} threshold {bar}: {verdict}")
        else:
            verdict = "same speaker" if accepted else "different speakers"
            typer.echo(f"{evidence}; LLR {'>=' if accepted else '<'} {llr_threshold:.2f} (the Bayes threshold at "
                       f"that prior): {verdict}")
        return
    if threshold is None:
        typer.echo(f"score {score:.4f}")
        return
    shown, bar = score_against(score, threshold)
    decision = (f"score {shown} >= threshold {bar}: same speaker" if accepted
                else f"score {shown} < threshold {bar}: different speakers")
    typer.echo(decision + (" (the threshold in the model's metadata)" if threshold_source == "model" else ""))


def register(app: typer.Typer) -> None:
    app.command()(embed)
    app.command()(verify)
