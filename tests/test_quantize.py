"""int8: NNCF's static quantization calibrated on recordings, the EER check, and running the int8 twin.

The model is ``spkft_demo_base`` (m_channels 8, trained by spkft on LibriSpeech), so its EER means
something: quantization damage shows as a higher EER, which random weights could not show.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import soundfile as sf
from typer.testing import CliRunner

from spkft.core.errors import ExportError, ModelError
from spkft.core.export import export_int8
from spkft.core.files import sha256_of
from spkft.core.onnx_model import OnnxEmbedder, cpu_has_bf16, int8_twin
from spkft.core.evaluate import evaluate
from spkft.core.quantize import EerCheck, EerRoseError, Int8Settings, fp32_layers, quantization_data
from spkft.core.train.config import TrainConfig
from spkft.serve.client import SpeakerClient
from spkft.serve.server import ServerConfig, create_server
from spkft.tui.cli import app

runner = CliRunner()
# Generous, so that the speech-calibrated model passes on any CPU's int8 kernels and the hum-calibrated one
# (an EER some 40 % higher) still fails.
TOLERANCE = 0.25


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def metadata_of(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def data(tmp_path_factory, fsdd_dir, librispeech_dir):
    """Calibration speech (8 LibriSpeech speakers), mains hum, and 60 spoken digits of 6 speakers to measure on."""
    root = tmp_path_factory.mktemp("int8-data")
    speech = sorted(librispeech_dir.glob("*.flac"))[:8]
    (root / "calibration.csv").write_text("path,speaker\n" + "".join(f"{p},{p.stem.split('-')[0]}\n" for p in speech))
    digits = [p for p in sorted(fsdd_dir.glob("*.wav")) if int(p.stem.split("_")[2]) < 2 and int(p.stem[0]) < 5]
    (root / "eval.csv").write_text("path,speaker\n" + "".join(f"{p},{p.stem.split('_')[1]}\n" for p in digits))
    hum = root / "hum"
    hum.mkdir()
    t = np.arange(3 * 16000) / 16000
    for level in (0.5, 0.25):  # a 50 Hz square wave: nothing like speech
        sf.write(hum / f"hum{level}.wav", level * np.sign(np.sin(2 * np.pi * 50 * t)), 16000)
    return root


@pytest.fixture(scope="module")
def exported(data, tmp_path_factory):
    """``spkft export --quantize int8`` of the demo base model, calibrated on speech: its output and fp32 file."""
    output = tmp_path_factory.mktemp("int8") / "demo.onnx"
    result = run("export", "-c", "spkft_demo_base", "-o", output, "--quantize", "int8",
                 "--calibration", data / "calibration.csv", "--eval-data", data / "eval.csv",
                 "--calibration-crops", 40, "--max-eer-increase", TOLERANCE)
    assert result.exit_code == 0, result.output
    return result, output


def test_the_int8_twin_is_written_with_fp32_and_int8_figures(exported):
    result, output = exported
    twin = output.with_name("demo.int8.onnx")
    assert int8_twin(output) == twin and twin.stat().st_size < 0.5 * output.stat().st_size
    metadata = metadata_of(twin)
    assert metadata["spkft_quantization"] == "int8" and metadata["spkft_int8_check"] == "passed"
    assert metadata["spkft_int8_source_sha256"] == sha256_of(output)
    assert metadata["spkft_int8_calibration"].startswith("40 crops of csv:")
    assert metadata["spkft_int8_fp32_layers"] == ""  # it passed fully quantized: no search, every layer in int8
    assert metadata["spkft_evaluation_data"].endswith("eval.csv") and metadata["spkft_trials"] == "1770"
    fp32, int8 = float(metadata["spkft_fp32_eer"]), float(metadata["spkft_eer"])
    assert 0 < fp32 < 0.5 and 0 < int8 < 0.5 and fp32 != int8  # measured, not copied
    assert float(metadata["spkft_int8_eer_increase"]) == pytest.approx((int8 - fp32) / fp32)
    assert float(metadata["spkft_int8_max_eer_increase"]) == TOLERANCE
    # Served by default: the int8 model's own EER threshold, not the fp32 model's or the checkpoint's.
    assert metadata["spkft_threshold"] == metadata["spkft_eer_threshold"] != metadata["spkft_fp32_eer_threshold"]
    assert metadata["spkft_threshold_source"] == "eer" and metadata["framework"] == "3d-speaker"
    assert "int8 against fp32 on 1770 trials" in result.stdout and "within the 25 % allowed" in result.stdout
    assert f"  int8: EER {100 * int8:.2f} %" in result.stdout and f"  fp32: EER {100 * fp32:.2f} %" in result.stdout


@pytest.fixture(scope="module")
def hum_data(exported, data):
    return quantization_data({}, Int8Settings(data / "hum", data / "eval.csv", crops=20, max_eer_increase=TOLERANCE))


def test_a_model_whose_eer_rose_is_refused_and_force_marks_it(exported, hum_data, tmp_path):
    fp32_file = tmp_path / "hum.onnx"
    shutil.copy(exported[1], fp32_file)
    settings = Int8Settings(crops=20, max_eer_increase=TOLERANCE, max_fp32_layers=0)
    with pytest.raises(EerRoseError, match=r"^int8 raised the EER from \d+\.\d\d % to \d+\.\d\d % \(\+\d+\.\d % "
                                           r"relative, more than the 25 % allowed\): .*hum\.int8\.onnx was not "
                                           r"written, only the fp32 .*hum\.onnx; --force writes the int8 model "
                                           r"anyway, marked as forced$") as refused:
        export_int8(fp32_file, hum_data, settings)
    assert refused.value.int8.eer > refused.value.fp32.eer * (1 + TOLERANCE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hum.onnx"]

    forced = export_int8(fp32_file, hum_data, Int8Settings(crops=20, max_eer_increase=TOLERANCE, max_fp32_layers=0,
                                                           force=True))
    assert forced.forced and forced.eer_increase > TOLERANCE and forced.path == int8_twin(fp32_file)
    assert metadata_of(forced.path)["spkft_int8_check"] == "forced"
    # Asked for by name it runs; auto never takes it.
    assert OnnxEmbedder.from_file(fp32_file, precision="int8").path == forced.path
    auto = OnnxEmbedder.from_file(fp32_file)
    assert auto.path == fp32_file and auto.engine.precision == ("bf16" if cpu_has_bf16() else "fp32")


def test_the_eer_check_measures_as_evaluate_does_and_tells_nncf_how_far_embeddings_moved(exported, hum_data):
    fp32_file = exported[1]
    model = onnx.load(str(fp32_file))
    check = EerCheck(model, hum_data.recordings, hum_data.trials)
    reference = evaluate(OnnxEmbedder.from_file(fp32_file, engine="openvino", precision="fp32"),
                         hum_data.recordings, hum_data.trials).metrics
    assert check.fp32.eer == pytest.approx(reference.eer) and check.fp32.min_dcf == pytest.approx(reference.min_dcf)
    # All items: minus the EER (NNCF's metrics grow with quality); each item's cosine to fp32.
    metric, cosines = check(model, check.items)
    assert metric == -check.fp32.eer and len(cosines) == len(hum_data.recordings)
    assert cosines == pytest.approx([1.0] * len(cosines))
    int8 = onnx.load(str(int8_twin(fp32_file)))
    metric, cosines = check(int8, check.items)
    assert metric == pytest.approx(-float(metadata_of(int8_twin(fp32_file))["spkft_eer"]))
    assert 0.5 < np.mean(cosines) < 0.99999 and max(cosines) <= 1.0  # near fp32's, not fp32's
    # Some items (NNCF ranks layers on those int8 moved most): their mean cosine to fp32.
    subset, subset_cosines = check(int8, check.items[:5])
    assert subset == pytest.approx(np.mean(cosines[:5])) and subset_cosines == pytest.approx(cosines[:5])


def test_when_int8_fails_the_check_the_worst_layers_go_back_to_fp32(exported, data, tmp_path):
    fp32_file = tmp_path / "search.onnx"
    shutil.copy(exported[1], fp32_file)
    # Few recordings, so that ranking every layer takes seconds: 3 speakers' digits, 66 trials.
    few = data / "few.csv"
    lines = (data / "eval.csv").read_text().splitlines()
    few.write_text("\n".join([lines[0]] + [line for line in lines[1:] if line.split(",")[1] in
                                              ("george", "jackson", "lucas")][:12]) + "\n")
    hum = quantization_data({}, Int8Settings(data / "hum", few))
    # Hum-calibrated int8 fails any tolerance; one step of the search may put back one group of layers.
    searched = export_int8(fp32_file, hum, Int8Settings(crops=20, max_eer_increase=0.0, max_fp32_layers=1,
                                                        force=True))
    convolutions = {node.name for node in onnx.load(str(fp32_file)).graph.node if node.op_type == "Conv"}
    assert 1 <= len(searched.fp32_layers) <= 3 and set(searched.fp32_layers) <= convolutions
    int8 = onnx.load(str(searched.path))
    assert fp32_layers(int8) == list(searched.fp32_layers)
    metadata = {p.key: p.value for p in int8.metadata_props}
    assert metadata["spkft_int8_fp32_layers"] == ",".join(searched.fp32_layers)
    # The figures stored are the written file's own.
    assert float(metadata["spkft_eer"]) == pytest.approx(EerCheck(onnx.load(str(fp32_file)), hum.recordings,
                                                                  hum.trials).measure(int8).eer)


def test_auto_takes_the_int8_twin_only_when_it_is_verified_for_this_file(exported, tmp_path):
    output = exported[1]
    auto = OnnxEmbedder.from_file(output)
    assert (auto.engine.name, auto.engine.precision, auto.path) == ("openvino", "int8", int8_twin(output))
    assert auto.default_threshold == float(metadata_of(int8_twin(output))["spkft_threshold"])
    # The check measured it in OpenVINO: onnxruntime runs it only when asked.
    assert OnnxEmbedder.from_file(output, engine="onnxruntime").engine.precision == "fp32"
    assert OnnxEmbedder.from_file(output, engine="onnxruntime", precision="int8").engine.precision == "int8"
    assert OnnxEmbedder.from_file(output, precision="fp32").engine.precision == "fp32"

    # An int8 twin left beside a re-exported fp32 file belongs to the old one.
    stale = tmp_path / "demo.onnx"
    proto = onnx.load(str(output))
    onnx.helper.set_model_props(proto, metadata_of(output) | {"language": "English"})
    onnx.save(proto, str(stale))
    shutil.copy(int8_twin(output), int8_twin(stale))
    assert OnnxEmbedder.from_file(stale).engine.precision != "int8"
    with pytest.raises(ModelError, match=r"demo\.onnx: cannot run it in int8: demo\.int8\.onnx was quantized from "
                                         r"another version of demo\.onnx: export again with --quantize int8$"):
        OnnxEmbedder.from_file(stale, precision="int8")
    int8_twin(stale).unlink()
    with pytest.raises(ModelError, match=r"demo\.onnx: not an int8 model, and there is no int8 model beside it "
                                         r"\(demo\.int8\.onnx; spkft export --quantize int8 writes one\)$"):
        OnnxEmbedder.from_file(stale, precision="int8")
    # The int8 file named itself runs in int8 only.
    assert OnnxEmbedder.from_file(int8_twin(output)).engine.precision == "int8"
    with pytest.raises(ModelError, match=r"an int8 model runs in precision int8 only; for bf16, give its fp32 model$"):
        OnnxEmbedder.from_file(int8_twin(output), precision="bf16")


def test_embed_verify_and_serve_run_the_int8_model(exported, fsdd_dir, tmp_path):
    output = exported[1]
    a, b = fsdd_dir / "0_george_0.wav", fsdd_dir / "1_george_1.wav"
    vectors = {}
    for precision in ("int8", "fp32"):
        embedded = run("embed", a, "--model", output, "--precision", precision)
        assert embedded.exit_code == 0, embedded.output
        vectors[precision] = np.array(json.loads(embedded.stdout)["embedding"])
    cosine = vectors["int8"] @ vectors["fp32"] / np.linalg.norm(vectors["int8"]) / np.linalg.norm(vectors["fp32"])
    assert 0.9 < cosine < 0.99999  # close, and not the fp32 model under another name
    verified = run("verify", a, b, "--model", output, "--precision", "int8", "--json")
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["threshold"] == float(metadata_of(int8_twin(output))["spkft_threshold"])

    server = create_server(ServerConfig(model=output, port=0, precision="int8", enroll_db=tmp_path / "e.sqlite"))
    server.start()
    try:
        server.load()
        with SpeakerClient(server.address) as client:
            info = client.info()
            served = np.asarray(client.embed(a).embedding)
    finally:
        server.drain(0)
    assert (info.engine, info.precision) == ("openvino", "int8")
    assert info.metadata["spkft_quantization"] == "int8" and info.metadata["spkft_int8_check"] == "passed"
    assert served @ vectors["int8"] / np.linalg.norm(vectors["int8"]) > 0.99999


def test_calibration_and_trials_default_to_the_runs_training_and_validation_data(fsdd_dir, tmp_path, monkeypatch):
    listing = tmp_path / "digits.csv"
    digits = [p for p in sorted(fsdd_dir.glob("*.wav")) if int(p.stem.split("_")[2]) < 3 and int(p.stem[0]) < 3]
    listing.write_text("path,speaker\n" + "".join(f"{p},{p.stem.split('_')[1]}\n" for p in digits))
    config = TrainConfig.model_validate({"data": {"train": "digits.csv", "val_speakers": 2}})
    checkpoint = {"config": config.model_dump(mode="json")}
    monkeypatch.chdir(tmp_path)  # a run's relative paths are relative to where it was trained
    data = quantization_data(checkpoint, Int8Settings())
    calibrated = {r.speaker for r in data.calibration}
    measured = {r.speaker for r in data.recordings}
    assert len(calibrated) == 4 and len(measured) == 2 and not calibrated & measured
    assert data.evaluation_source == "validation" and data.calibration_source == "the run's training data (digits.csv)"
    assert {t.enrol for t in data.trials} | {t.test for t in data.trials} == {r.utt_id for r in data.recordings}

    with pytest.raises(ExportError, match=r"this checkpoint has no run config \(spkft train writes one\): give "
                                          r"--calibration DATA and --eval-data DATA$"):
        quantization_data({}, Int8Settings(calibration=listing))
    monkeypatch.chdir(fsdd_dir)
    with pytest.raises(ExportError, match=r"the run's data\.train, digits\.csv, is not here \(a relative path is "
                                          r"relative to the folder the run was trained in\)"):
        quantization_data(checkpoint, Int8Settings())


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--calibration", "x.csv", "--force"], 2, "--calibration, --force: only with --quantize int8"),
        (["--max-fp32-layers", "3"], 2, "--max-fp32-layers: only with --quantize int8"),
        (["--quantize", "int8", "--max-fp32-layers", "-1"], 2, "Input should be greater than or equal to 0"),
        (["--quantize", "int8", "--opset", "12"], 1, "int8 needs ONNX opset 13 or later (per-channel quantization), "
                                                    "got 12"),
        (["--quantize", "int8"], 1, "this checkpoint has no run config"),
        (["--quantize", "int8", "--max-eer-increase", "-0.1"], 2, "Input should be greater than or equal to 0"),
    ],
)
def test_int8_usage_errors(tiny_checkpoint, tmp_path, extra, code, message):
    result = run("export", "-c", tiny_checkpoint, "-o", tmp_path / "m.onnx", *extra)
    assert result.exit_code == code and message in result.stderr
    assert not (tmp_path / "m.onnx").exists()
