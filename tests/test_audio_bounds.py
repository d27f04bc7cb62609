"""Audio that costs far more to decode than its size suggests: odd rates, many channels, streamed codecs.

Each test reproduces an input that once took gigabytes or failed midway. Memory is measured in a
fresh subprocess (its peak resident size, less what it held before the decode), so the bound
holds whatever else the test process has loaded.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
import soundfile as sf

from spkft.core.audio import (
    MAX_RESAMPLE_PHASES,
    MIN_SECONDS,
    load_audio,
    read_samples,
    resample,
    resampling_rate,
)
from spkft.core.data import scan
from spkft.core.errors import AudioTooLargeError
from spkft.serve.service import SpeakerService, status_of
from spkft.serve.v1 import speaker_service_pb2 as pb

COMMON_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400, 192000)


def phases(rate: int, target: int = 16000) -> int:
    """Output phases of the windowed-sinc resampler from ``rate``: its cost per input sample grows with them."""
    return target // math.gcd(resampling_rate(rate, target), target)


def test_every_rate_from_8_to_192_khz_resamples_at_the_cost_of_a_common_one():
    worst_common = max(16000 // math.gcd(rate, 16000) for rate in COMMON_RATES)
    assert worst_common == MAX_RESAMPLE_PHASES  # 11.025 kHz: 441:640
    for rate in [*range(8000, 192_001, 7), 16001, 22051, 96001, 192_001]:
        assert phases(rate) <= worst_common, rate
    for rate in COMMON_RATES:
        assert resampling_rate(rate) == rate  # common rates are resampled exactly as they are
    for rate in (8001, 16001, 22051, 44101, 96001):
        moved = resampling_rate(rate)
        assert moved != rate and abs(moved - rate) / rate <= 12.5 / 8000  # at most half the 25 Hz grid


def test_an_odd_rate_is_resampled_to_the_right_length():
    tone = np.sin(2 * np.pi * 200 * np.arange(16001) / 16001).astype(np.float32)  # one second
    out = resample(tone, 16001)
    assert abs(len(out) - 16000) <= 1
    # Still a 200 Hz tone (within the 0.006 % the rate moved): its spectrum peaks at bin 200.
    assert int(np.argmax(np.abs(np.fft.rfft(out[:16000])))) == 200


def peak_growth_mib(code: str) -> float:
    """Run ``code`` in a fresh interpreter after importing spkft's audio code; its peak RSS growth in MiB."""
    script = textwrap.dedent("""
        import resource, sys
        import numpy as np
        from spkft.core import audio
        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        before = peak()
    """) + textwrap.dedent(code) + "\nprint(peak() - before)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("rate", [16001, 22051, 96001])
def test_six_kilobytes_at_an_odd_rate_take_no_gigabytes(rate):
    # 6 KB of int16 at 16001 Hz once took 5 GB; at 96001 Hz the allocation failed (INTERNAL).
    count = max(3000, rate // 4)  # long enough to embed at every rate
    growth = peak_growth_mib(f"""
        pcm = (np.random.default_rng(0).normal(0, 3000, {count})).astype("<i2").tobytes()
        wave = audio.decode_pcm(pcm, {rate})
        assert abs(wave.duration_seconds - {count} / {rate}) < 0.01
    """)
    assert growth < 100, f"{growth:.0f} MiB"


def many_channels_flac(seconds: float, channels: int = 8, rate: int = 655_350) -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(1).integers(-300, 300, size=(int(seconds * rate), channels), dtype=np.int16)
    sf.write(buffer, noise, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def test_a_small_file_that_would_decode_huge_is_refused_before_decoding():
    content = many_channels_flac(2.0)  # 8 channels at 655,350 Hz: 10.5 M samples
    service = SpeakerService(max_audio_seconds=60.0)  # at most 60 s of 48 kHz stereo: 5.76 M samples
    with pytest.raises(AudioTooLargeError, match="10,485,600 samples") as refused:
        service._waveform(pb.Audio(content=content), "audio")
    assert status_of(refused.value)[0] is grpc.StatusCode.INVALID_ARGUMENT
    # The same through raw PCM: the bound is on samples, whatever carries them.
    pcm = np.zeros((800_000, 8), dtype="<i2").tobytes()  # 6.4 M samples in 12.8 MB
    with pytest.raises(AudioTooLargeError):
        service._waveform(pb.Audio(pcm=pb.PcmAudio(samples=pcm, sample_rate_hertz=655_350, channel_count=8,
                                                   format=pb.SAMPLE_FORMAT_INT16)), "audio")


def test_many_channels_are_down_mixed_while_reading(tmp_path):
    path = tmp_path / "eight.flac"
    path.write_bytes(many_channels_flac(8.0))  # 42 M samples: 168 MB as float32 if read whole
    growth = peak_growth_mib(f"""
        wave = audio.load_audio({str(path)!r})
        assert wave.source_channels == 8 and abs(wave.duration_seconds - 8.0) < 0.01
    """)
    assert growth < 110, f"{growth:.0f} MiB"  # one mono signal (21 MB) and the resampler's work


STREAMED = [("WAV", "GSM610", 8000), ("WAV", "G721_32", 16000), ("AU", "G723_24", 16000),
            ("WAV", "NMS_ADPCM_16", 16000), ("XI", "DPCM_16", 44100)]  # XI is always 44.1 kHz


@pytest.mark.parametrize("fmt, subtype, rate", STREAMED, ids=[s for _, s, _ in STREAMED])
def test_codecs_read_only_as_a_stream_are_read_everywhere(tmp_path, speech, fmt, subtype, rate):
    data, source_rate = speech
    clip = resample(data[: 2 * source_rate], source_rate, rate)
    rows = []
    for k in range(2):
        sf.write(tmp_path / f"alice{k}.{fmt.lower()}", clip, rate, format=fmt, subtype=subtype)
        sf.write(tmp_path / f"bob{k}.wav", clip, rate)
        rows += [f"alice{k}.{fmt.lower()},alice", f"bob{k}.wav,bob"]
    (tmp_path / "list.csv").write_text("path,speaker\n" + "\n".join(rows) + "\n")
    path = tmp_path / f"alice0.{fmt.lower()}"
    with sf.SoundFile(path) as probe:
        assert not probe.seekable()  # the case that once raised "frames must be specified"
    wave = load_audio(path)
    assert abs(wave.duration_seconds - 2.0) < 0.01 and wave.duration_seconds > MIN_SECONDS
    segment = read_samples(path, start_seconds=0.5, stop_seconds=1.5)  # a training crop: read up to it
    assert abs(len(segment) - 16000) <= 2
    report = scan(tmp_path / "list.csv")  # data check agrees with what training and serving read
    assert report.recordings_per_speaker == {"alice": 2, "bob": 2} and not report.excluded
