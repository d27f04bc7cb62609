"""Reading and normalising audio: files, in-memory encoded bytes and raw PCM.

Everything becomes one mono float32 waveform in [-1, 1] at 16 kHz:
- files and encoded bytes are decoded by libsndfile (``soundfile``): WAV, FLAC, OGG/Vorbis,
  Opus, and MP3 where the bundled libsndfile has it;
- raw PCM is little-endian int16 or float32, interleaved, at any rate and channel count;
- **down-mix rule**: several channels are averaged into one (the mean of all channels), so a
  speaker recorded on either channel of a stereo file is kept;
- other sample rates are resampled to 16 kHz with ``torchaudio.functional.resample``.

Audio the model cannot embed raises a typed :class:`~spkft.core.errors.AudioError`: empty,
undecodable (float samples far outside [-1, 1] included), silent-only (peak below -70 dBFS) or
shorter than the model's minimum; and, when the caller sets ``max_seconds`` (a server does),
longer than that — checked from the header or byte count before anything is decoded, so a small
compressed file cannot expand into hours.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Union

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from spkft.core.errors import (
    AudioNotFoundError,
    AudioTooLongError,
    AudioTooShortError,
    EmptyAudioError,
    InvalidPcmError,
    SilentAudioError,
    UndecodableAudioError,
    first_line,
)
from spkft.core.features import SAMPLE_RATE, seconds_for_frames
from spkft.core.model import MIN_FRAMES

# Peak level under which a recording is treated as silence: -70 dBFS is about 10 LSB of
# 16-bit audio, well under any microphone's noise floor.
SILENCE_PEAK_DBFS = -70.0
# Float audio lives in [-1, 1]; a little over is headroom, but samples beyond +36 dBFS are not
# audio at all — typically integer PCM sent as float32 — and would overflow fbank into NaN.
MAX_FLOAT_PEAK = 64.0
MIN_SECONDS = seconds_for_frames(MIN_FRAMES)

AudioSource = Union[str, Path, bytes, bytearray, memoryview, BinaryIO]
PcmFormat = Literal["int16", "float32"]


@dataclass(frozen=True)
class Waveform:
    """Mono float32 samples at :data:`SAMPLE_RATE`, plus what the source was."""

    samples: np.ndarray
    source_sample_rate: int
    source_channels: int

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    @property
    def duration_seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.samples)


def load_audio(
    source: AudioSource,
    name: str | None = None,
    min_seconds: float = MIN_SECONDS,
    start_seconds: float = 0.0,
    stop_seconds: float | None = None,
    max_seconds: float | None = None,
) -> Waveform:
    """Decode a file path, encoded bytes or a binary file object into a checked :class:`Waveform`.

    ``name`` is what error messages call the audio (defaults to the path, or "audio").
    ``start_seconds``/``stop_seconds`` read only that segment (in the source's own time).
    ``max_seconds``, when given, refuses longer audio with :class:`AudioTooLongError`.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = name or str(path)
        if not path.exists():
            raise AudioNotFoundError(f"{name}: no such file")
        if not path.is_file():
            raise AudioNotFoundError(f"{name}: not a file")
        if path.stat().st_size == 0:
            raise EmptyAudioError(f"{name}: the file is empty")
        opened: BinaryIO | str = str(path)
    else:
        name = name or "audio"
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise EmptyAudioError(f"{name}: no bytes were given")
            opened = io.BytesIO(bytes(source))
        else:
            opened = source
    try:
        data, rate = _decode(opened, start_seconds, stop_seconds, name, max_seconds)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        # libsndfile's own words, without "Error opening <what it was given>:" (a buffer's repr for bytes).
        reason = exc.error_string if isinstance(exc, sf.LibsndfileError) else first_line(exc)
        raise UndecodableAudioError(
            f"{name}: not a readable audio file (WAV, FLAC, OGG or MP3 expected): {reason}"
        ) from None
    return _finish(data, rate, name, min_seconds, max_seconds)


def read_samples(path: str | Path, start_seconds: float = 0.0, stop_seconds: float | None = None) -> np.ndarray:
    """Mono 16 kHz samples of a file or segment, without the checks of :func:`load_audio`.

    For training crops, where a quiet stretch inside a good recording is not an error.
    """
    data, rate = _decode(str(path), start_seconds, stop_seconds)
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    return resample(np.ascontiguousarray(mono), rate)


def _decode(
    opened: BinaryIO | str,
    start_seconds: float,
    stop_seconds: float | None,
    name: str = "audio",
    max_seconds: float | None = None,
) -> tuple[np.ndarray, int]:
    """``[frames, channels]`` float32 samples of the whole source or the given segment, and the rate."""
    with sf.SoundFile(opened) as audio:
        rate = audio.samplerate
        first = min(int(round(start_seconds * rate)), audio.frames)
        if first > 0:
            audio.seek(first)
        # Round both ends on the sample grid, so a segment never reads past its stop.
        frames = -1 if stop_seconds is None else max(0, int(round(stop_seconds * rate)) - first)
        _check_not_too_long((audio.frames - first if frames < 0 else frames) / rate, max_seconds, name)
        return audio.read(frames, dtype="float32", always_2d=True), rate


def decode_pcm(
    samples: bytes,
    sample_rate_hertz: int,
    sample_format: PcmFormat = "int16",
    channel_count: int = 1,
    name: str = "audio",
    min_seconds: float = MIN_SECONDS,
    max_seconds: float | None = None,
) -> Waveform:
    """Interpret raw little-endian interleaved PCM bytes as a checked :class:`Waveform`."""
    dtypes = {"int16": np.dtype("<i2"), "float32": np.dtype("<f4")}
    if sample_format not in dtypes:
        raise InvalidPcmError(f"{name}: unknown sample format {sample_format!r}; use int16 or float32")
    if sample_rate_hertz <= 0:
        raise InvalidPcmError(f"{name}: sample rate must be positive, got {sample_rate_hertz}")
    if channel_count <= 0:
        raise InvalidPcmError(f"{name}: channel count must be positive, got {channel_count}")
    if len(samples) == 0:
        raise EmptyAudioError(f"{name}: no samples were given")
    dtype = dtypes[sample_format]
    frame_bytes = dtype.itemsize * channel_count
    if len(samples) % frame_bytes:
        raise InvalidPcmError(
            f"{name}: {len(samples)} bytes is not a whole number of {sample_format} frames "
            f"of {channel_count} channel(s) ({frame_bytes} bytes each)"
        )
    _check_not_too_long(len(samples) / frame_bytes / sample_rate_hertz, max_seconds, name)
    data = np.frombuffer(samples, dtype=dtype).reshape(-1, channel_count)
    if sample_format == "int16":
        data = data.astype(np.float32) / 32768.0
    else:
        data = data.astype(np.float32)
    return _finish(data, sample_rate_hertz, name, min_seconds, max_seconds)


def _check_not_too_long(seconds: float, max_seconds: float | None, name: str) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise AudioTooLongError(f"{name}: {seconds:.2f} s of audio is too long; at most {max_seconds:g} s is accepted")


def _finish(data: np.ndarray, rate: int, name: str, min_seconds: float, max_seconds: float | None = None) -> Waveform:
    """Down-mix, check and resample decoded ``[frames, channels]`` float samples."""
    channels = data.shape[1] if data.ndim == 2 else 1
    if data.size == 0:
        raise EmptyAudioError(f"{name}: the audio holds no samples")
    if not np.isfinite(data).all():
        raise UndecodableAudioError(f"{name}: the audio holds NaN or infinite samples")
    mono = data.mean(axis=1, dtype=np.float32) if channels > 1 else data.reshape(-1)
    duration = len(mono) / rate
    if duration < min_seconds:
        raise AudioTooShortError(
            f"{name}: {duration:.3f} s of audio is too short; at least {min_seconds:.3f} s is needed"
        )
    # Headers of compressed formats can understate the length; the decoded samples cannot.
    _check_not_too_long(duration, max_seconds, name)
    peak = float(np.abs(mono).max())
    if peak > MAX_FLOAT_PEAK:
        raise UndecodableAudioError(
            f"{name}: samples reach {peak:.3g}, far outside [-1, 1]; is integer audio being sent as float32?"
        )
    if peak == 0.0 or 20.0 * math.log10(peak) < SILENCE_PEAK_DBFS:
        raise SilentAudioError(
            f"{name}: the audio is silent (peak below {SILENCE_PEAK_DBFS:.0f} dBFS); no speech to embed"
        )
    if rate != SAMPLE_RATE:
        mono = resample(mono, rate)
    return Waveform(np.ascontiguousarray(mono, dtype=np.float32), rate, channels)


def resample(samples: np.ndarray, rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of mono float samples (torchaudio's windowed sinc)."""
    if rate == target_rate:
        return samples
    out = AF.resample(torch.from_numpy(np.ascontiguousarray(samples)), rate, target_rate)
    return out.numpy()
