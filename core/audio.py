"""Reading and normalising audio: files, in-memory encoded bytes and raw PCM.

Everything becomes one mono float32 waveform in [-1, 1] at 16 kHz:
- files and encoded bytes are decoded by libsndfile (``soundfile``): WAV, FLAC, OGG/Vorbis,
  Opus, and MP3 where the bundled libsndfile has it;
- raw PCM is little-endian int16 or float32, interleaved, at any rate and channel count;
- **down-mix rule**: several channels are averaged into one (the mean of all channels), so a
  speaker recorded on either channel of a stereo file is kept;
- other sample rates are resampled to 16 kHz with ``torchaudio.functional.resample``. Its cost
  grows with the reduced ratio of the two rates, so a rate whose ratio to 16 kHz does not reduce
  to at most 640 output phases (11.025 kHz's, the costliest common rate) is treated as the nearest
  multiple of 25 Hz: 16001 Hz as 16000 Hz, a pitch change of at most 0.16 % at 8 kHz, less above;
- files are decoded block by block and down-mixed as they are read, so memory holds one mono
  signal, never every channel of a long file; streamed codecs (GSM 6.10, G.72x, NMS-ADPCM,
  DPCM), which libsndfile can only read forwards, are read the same way.

Audio the model cannot embed raises a typed :class:`~spkft.core.errors.AudioError`: empty,
undecodable (float samples far outside [-1, 1] included), silent-only (peak below -70 dBFS) or
shorter than the model's minimum; and, when the caller sets ``max_seconds`` (a server does),
longer than that — checked from the header or byte count before anything is decoded, so a small
compressed file cannot expand into hours; and when it sets ``max_samples``, audio holding more
samples (frames times channels) than that, checked the same way, so a high rate or many channels
cannot make a short file huge either.
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
    AudioTooLargeError,
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
# Frames decoded and down-mixed at a time.
BLOCK_FRAMES = 1 << 16
# Resampling cost: rates whose ratio to the target reduces to more output phases than this are
# moved to the nearest multiple of RATE_GRID_HZ (see resampling_rate).
MAX_RESAMPLE_PHASES = 640
RATE_GRID_HZ = 25

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
    max_samples: int | None = None,
) -> Waveform:
    """Decode a file path, encoded bytes or a binary file object into a checked :class:`Waveform`.

    ``name`` is what error messages call the audio (defaults to the path, or "audio").
    ``start_seconds``/``stop_seconds`` read only that segment (in the source's own time).
    ``max_seconds``, when given, refuses longer audio with :class:`AudioTooLongError`, and
    ``max_samples`` audio of more samples (frames times channels) with :class:`AudioTooLargeError`.
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
        mono, rate, channels = _decode(opened, start_seconds, stop_seconds, name, max_seconds, max_samples)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        # libsndfile's own words, without "Error opening <what it was given>:" (a buffer's repr for bytes).
        reason = exc.error_string if isinstance(exc, sf.LibsndfileError) else first_line(exc)
        raise UndecodableAudioError(
            f"{name}: not a readable audio file (WAV, FLAC, OGG or MP3 expected): {reason}"
        ) from None
    return _finish(mono, rate, channels, name, min_seconds, max_seconds)


def read_samples(path: str | Path, start_seconds: float = 0.0, stop_seconds: float | None = None) -> np.ndarray:
    """Mono 16 kHz samples of a file or segment, without the checks of :func:`load_audio`.

    For training crops, where a quiet stretch inside a good recording is not an error.
    """
    mono, rate, _ = _decode(str(path), start_seconds, stop_seconds)
    return resample(mono, rate)


def _decode(
    opened: BinaryIO | str,
    start_seconds: float,
    stop_seconds: float | None,
    name: str = "audio",
    max_seconds: float | None = None,
    max_samples: int | None = None,
) -> tuple[np.ndarray, int, int]:
    """Mono float32 samples of the whole source or the given segment, its rate and channel count.

    The length is checked from the header before anything is decoded; then at most that many
    frames are read, in blocks, each down-mixed at once.
    """
    with sf.SoundFile(opened) as audio:
        rate, channels = audio.samplerate, audio.channels
        first = min(int(round(start_seconds * rate)), audio.frames)
        # Round both ends on the sample grid, so a segment never reads past its stop.
        wanted = audio.frames - first if stop_seconds is None else max(0, int(round(stop_seconds * rate)) - first)
        _check_not_too_long(wanted / rate, max_seconds, name)
        _check_not_too_large(wanted * channels, max_samples, name)
        if first > 0:
            if audio.seekable():
                audio.seek(first)
            else:  # a streamed codec: read up to the segment
                _read_mono(audio, first, channels)
        return _read_mono(audio, wanted, channels), rate, channels


def _read_mono(audio: sf.SoundFile, frames: int, channels: int) -> np.ndarray:
    """Up to ``frames`` frames from where ``audio`` stands, channels averaged block by block."""
    out = np.empty(frames, dtype=np.float32)
    done = 0
    while done < frames:
        block = audio.read(min(BLOCK_FRAMES, frames - done), dtype="float32", always_2d=True)
        if not len(block):
            break
        out[done:done + len(block)] = block[:, 0] if channels == 1 else block.mean(axis=1, dtype=np.float32)
        done += len(block)
    return out[:done]


def decode_pcm(
    samples: bytes,
    sample_rate_hertz: int,
    sample_format: PcmFormat = "int16",
    channel_count: int = 1,
    name: str = "audio",
    min_seconds: float = MIN_SECONDS,
    max_seconds: float | None = None,
    max_samples: int | None = None,
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
    _check_not_too_large(len(samples) // dtype.itemsize, max_samples, name)
    data = np.frombuffer(samples, dtype=dtype).reshape(-1, channel_count)
    # Down-mixed straight from the buffer: no float copy of every channel.
    mono = data.mean(axis=1, dtype=np.float32) if channel_count > 1 else data[:, 0].astype(np.float32)
    if sample_format == "int16":
        mono /= 32768.0
    return _finish(mono, sample_rate_hertz, channel_count, name, min_seconds, max_seconds)


def _check_not_too_long(seconds: float, max_seconds: float | None, name: str) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise AudioTooLongError(f"{name}: {seconds:.2f} s of audio is too long; at most {max_seconds:g} s is accepted")


def _check_not_too_large(samples: int, max_samples: int | None, name: str) -> None:
    if max_samples is not None and samples > max_samples:
        raise AudioTooLargeError(f"{name}: {samples:,} samples (frames times channels) is too much audio; "
                                 f"at most {max_samples:,} are accepted")


def _finish(mono: np.ndarray, rate: int, channels: int, name: str, min_seconds: float,
            max_seconds: float | None = None) -> Waveform:
    """Check and resample decoded mono float samples."""
    if mono.size == 0:
        raise EmptyAudioError(f"{name}: the audio holds no samples")
    if not np.isfinite(mono).all():
        raise UndecodableAudioError(f"{name}: the audio holds NaN or infinite samples")
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


def resampling_rate(rate: int, target_rate: int = SAMPLE_RATE) -> int:
    """The rate samples at ``rate`` are resampled as: ``rate`` itself where that is cheap, else the
    nearest multiple of :data:`RATE_GRID_HZ`, whose ratio to the target has at most
    :data:`MAX_RESAMPLE_PHASES` phases (the target is a multiple of the grid)."""
    if target_rate // math.gcd(rate, target_rate) <= MAX_RESAMPLE_PHASES:
        return rate
    return max(RATE_GRID_HZ, round(rate / RATE_GRID_HZ) * RATE_GRID_HZ)


def resample(samples: np.ndarray, rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of mono float samples (torchaudio's windowed sinc), at a bounded cost."""
    rate = resampling_rate(rate, target_rate)
    if rate == target_rate:
        return np.ascontiguousarray(samples, dtype=np.float32)
    out = AF.resample(torch.from_numpy(np.ascontiguousarray(samples)), rate, target_rate)
    return out.numpy()
