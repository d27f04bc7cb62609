from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from spkft.core.audio import load_audio
from spkft.core.embedding import Embedder, cosine_score, l2_normalise, resolve_device, window_starts
from spkft.core.errors import DeviceError
from spkft.core.features import fbank


@pytest.fixture(scope="module")
def embedder(tiny_checkpoint):
    return Embedder.from_checkpoint(tiny_checkpoint, max_whole_seconds=6.0, chunk_seconds=2.0)


@pytest.mark.parametrize("frames, window", [(1000, 1000), (1001, 1000), (6000, 1000), (59999, 1000), (2500, 300)])
def test_windows_are_equal_evenly_spread_and_cover_everything(frames, window):
    starts = window_starts(frames, window)
    count = math.ceil(frames / window)
    length = math.ceil(frames / count)
    assert len(starts) == count and length <= window
    assert starts[0] == 0 and starts[-1] + length == frames
    assert all(b - a <= length for a, b in zip(starts, starts[1:]))  # no gaps


def test_short_recording_is_embedded_whole(embedder, speech_file):
    wave = load_audio(speech_file, stop_seconds=4.0)
    result = embedder.embed_waveform(wave)
    with torch.no_grad():
        direct = embedder.model(fbank(wave.tensor()).unsqueeze(0))[0].numpy()
    assert result.vector.shape == (192,)
    assert abs(np.linalg.norm(result.vector) - 1.0) < 1e-5
    assert np.allclose(result.vector, l2_normalise(direct), atol=1e-6)
    assert result.duration_seconds == pytest.approx(4.0)


def test_long_recording_is_the_mean_of_normalised_windows(embedder, speech_file):
    wave = load_audio(speech_file)  # 14 s > 6 s: windows of at most 2 s
    features = fbank(wave.tensor())
    frames = features.shape[0]
    starts = window_starts(frames, 200)
    length = math.ceil(frames / len(starts))
    with torch.no_grad():
        parts = [l2_normalise(embedder.model(features[s : s + length].unsqueeze(0))[0].numpy()) for s in starts]
    expected = l2_normalise(np.mean(parts, axis=0))
    assert np.allclose(embedder.embed_waveform(wave).vector, expected, atol=1e-5)


def test_ten_minute_recording(tmp_path, speech, tiny_checkpoint):
    data, rate = speech
    path = tmp_path / "long.flac"
    sf.write(path, np.tile(data, math.ceil(600 * rate / len(data)))[: 600 * rate], rate)
    result = Embedder.from_checkpoint(tiny_checkpoint).embed(path)
    assert result.duration_seconds == pytest.approx(600.0)
    assert np.isfinite(result.vector).all() and abs(np.linalg.norm(result.vector) - 1) < 1e-5


def test_files_and_bytes_embed_identically(embedder, fsdd_dir):
    path = fsdd_dir / "3_theo_37.wav"
    assert np.array_equal(embedder.embed(path).vector, embedder.embed(path.read_bytes()).vector)


def test_cosine_score_range_and_symmetry():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=192), rng.normal(size=192)
    assert cosine_score(a, b) == pytest.approx(cosine_score(b, a))
    assert cosine_score(a, 3 * a) == pytest.approx(1.0)
    assert cosine_score(a, -a) == pytest.approx(-1.0)


def test_unavailable_devices_are_clear_errors():
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("gpu0")
    assert resolve_device("cpu").type == "cpu"
