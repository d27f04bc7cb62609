from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from spkft.core.audio import MIN_SECONDS, decode_pcm, load_audio, resample
from spkft.core.errors import (
    AudioNotFoundError,
    AudioTooLongError,
    AudioTooShortError,
    EmptyAudioError,
    InvalidPcmError,
    SilentAudioError,
    UndecodableAudioError,
)
from spkft.core.features import fbank


@pytest.fixture(scope="module")
def clip(speech):
    """Two seconds of real speech at 16 kHz."""
    data, rate = speech
    assert rate == 16000
    return data[16000:48000]


def encode(samples, rate, fmt, subtype=None):
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fmt, subtype, tolerance",
    [("WAV", "PCM_16", 1e-4), ("WAV", "FLOAT", 1e-7), ("FLAC", "PCM_16", 1e-4), ("OGG", "VORBIS", None), ("MP3", None, None)],
)
def test_files_and_bytes_in_every_container_decode_alike(tmp_path, clip, fmt, subtype, tolerance):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    content = encode(clip, 16000, fmt, subtype)
    path = tmp_path / f"clip.{fmt.lower()}"
    path.write_bytes(content)
    from_file = load_audio(path)
    from_bytes = load_audio(content)
    assert from_file.sample_rate == 16000 and from_file.source_channels == 1
    assert np.array_equal(from_file.samples, from_bytes.samples)
    assert from_file.samples.dtype == np.float32
    if tolerance is not None:  # lossless containers give the samples back
        assert np.abs(from_file.samples - clip).max() < tolerance
    else:  # lossy codecs keep the length to within a codec frame and the level roughly
        assert abs(from_file.duration_seconds - 2.0) < 0.1
        assert 0.5 < np.std(from_file.samples) / np.std(clip) < 1.5


def test_eight_khz_audio_is_resampled_to_sixteen(fsdd_dir):
    path = fsdd_dir / "0_george_0.wav"
    info = sf.info(path)
    assert info.samplerate == 8000
    wave = load_audio(path)
    assert wave.source_sample_rate == 8000
    assert abs(len(wave.samples) - 2 * info.frames) <= 1
    assert abs(wave.duration_seconds - info.duration) < 1e-3
    # An 8 kHz recording has no content above 4 kHz; band-limited resampling must not invent any.
    spectrum = np.abs(np.fft.rfft(wave.samples)) ** 2
    frequencies = np.fft.rfftfreq(len(wave.samples), 1 / 16000)
    assert spectrum[frequencies > 4200].sum() < 1e-3 * spectrum[frequencies < 3800].sum()
    assert fbank(wave.tensor()).shape[1] == 80


def test_resampling_round_trip_keeps_the_signal(clip):
    down = resample(clip, 16000, 8000)
    assert len(down) == len(clip) // 2
    up = resample(down, 8000, 16000)
    low = resample(resample(clip, 16000, 8000), 8000, 16000)
    assert np.allclose(up, low)
    assert np.corrcoef(up[1000:-1000], clip[1000:-1000])[0, 1] > 0.9


def test_channels_are_averaged(tmp_path, clip):
    stereo = np.stack([clip, np.zeros_like(clip)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.source_channels == 2
    assert np.allclose(wave.samples, clip / 2, atol=1e-7)


def test_pcm_int16_and_float32_any_rate_and_channels(clip):
    pcm16 = (np.clip(clip, -1, 1) * 32767).astype("<i2")
    wave = decode_pcm(pcm16.tobytes(), 16000, "int16", 1)
    assert np.abs(wave.samples - clip).max() < 1e-3
    three = np.stack([clip, clip, clip], axis=1).astype("<f4")
    wave = decode_pcm(three.tobytes(), 16000, "float32", 3)
    assert wave.source_channels == 3
    assert np.allclose(wave.samples, clip, atol=1e-6)
    at_44k = resample(clip, 16000, 44100).astype("<f4")
    wave = decode_pcm(at_44k.tobytes(), 44100, "float32", 1)
    assert wave.source_sample_rate == 44100
    assert abs(len(wave.samples) - len(clip)) <= 1


def test_segment_of_a_file(speech_file):
    wave = load_audio(speech_file, start_seconds=2.0, stop_seconds=5.0)
    whole = load_audio(speech_file)
    assert len(wave.samples) == 48000
    assert np.array_equal(wave.samples, whole.samples[32000:80000])


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(AudioNotFoundError, match="no such file"):
        load_audio(tmp_path / "absent.wav")
    with pytest.raises(AudioNotFoundError, match="not a file"):
        load_audio(tmp_path)


def test_empty_inputs(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(EmptyAudioError, match="empty"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(EmptyAudioError):
        load_audio(b"")
    with pytest.raises(EmptyAudioError):
        decode_pcm(b"", 16000)
    header_only = encode(np.zeros(0, dtype=np.float32), 16000, "WAV", "PCM_16")
    with pytest.raises(EmptyAudioError, match="no samples"):
        load_audio(header_only)


def test_undecodable_inputs(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("path,speaker\na.wav,alice\n")
    with pytest.raises(UndecodableAudioError, match="not a readable audio file"):
        load_audio(text)
    rng = np.random.default_rng(0)
    with pytest.raises(UndecodableAudioError):
        load_audio(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), name="upload")
    nan = np.full(16000, np.nan, dtype="<f4")
    with pytest.raises(UndecodableAudioError, match="NaN"):
        decode_pcm(nan.tobytes(), 16000, "float32")


def test_integers_sent_as_float32_are_refused(clip):
    as_int16 = (clip * 32767).astype("<i2").tobytes()
    with pytest.raises(UndecodableAudioError, match="(NaN|is integer audio being sent as float32)"):
        decode_pcm(as_int16, 16000, "float32")


def test_silence_is_refused():
    with pytest.raises(SilentAudioError, match="silent"):
        decode_pcm(np.zeros(16000, dtype="<i2").tobytes(), 16000)
    hiss = np.random.default_rng(1).integers(-3, 4, 16000).astype("<i2")  # below -70 dBFS
    with pytest.raises(SilentAudioError):
        decode_pcm(hiss.tobytes(), 16000)


def test_too_short_audio_is_refused(clip):
    short = (clip[: int(0.05 * 16000)] * 32767).astype("<i2")
    with pytest.raises(AudioTooShortError, match="0.050 s of audio is too short"):
        decode_pcm(short.tobytes(), 16000)
    just_enough = (clip[: int(round(MIN_SECONDS * 16000))] * 32767).astype("<i2")
    wave = decode_pcm(just_enough.tobytes(), 16000)
    assert fbank(wave.tensor()).shape[0] == 9


def test_audio_over_max_seconds_is_refused_before_decoding(clip):
    pcm = (clip * 32767).astype("<i2").tobytes()  # two seconds
    with pytest.raises(AudioTooLongError, match="2.00 s of audio is too long; at most 1.5 s"):
        decode_pcm(pcm, 16000, max_seconds=1.5)
    with pytest.raises(AudioTooLongError, match="at most 1.5 s"):
        load_audio(encode(clip, 16000, "FLAC"), max_seconds=1.5)
    assert load_audio(encode(clip, 16000, "FLAC"), max_seconds=2.0).duration_seconds == 2.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sample_rate_hertz": 0}, "sample rate must be positive"),
        ({"channel_count": 0}, "channel count must be positive"),
        ({"sample_format": "int24"}, "unknown sample format"),
        ({"channel_count": 3}, "not a whole number"),
    ],
)
def test_inconsistent_pcm_descriptions(kwargs, message):
    args = {"sample_rate_hertz": 16000, "sample_format": "int16", "channel_count": 1} | kwargs
    with pytest.raises(InvalidPcmError, match=message):
        decode_pcm(np.ones(1001, dtype="<i2").tobytes(), **args)


def test_waveform_tensor_shares_memory(clip):
    wave = decode_pcm((clip * 32767).astype("<i2").tobytes(), 16000)
    assert isinstance(wave.tensor(), torch.Tensor) and wave.tensor().shape == (len(clip),)
