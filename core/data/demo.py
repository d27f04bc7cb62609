"""A small SYNTHETIC multi-speaker data set, for trying spkft without recordings of your own.

Nothing here is real speech. Each synthetic "speaker" is a source-filter voice: a glottal pulse
train at the speaker's own pitch, shaped by the speaker's own vocal-tract resonances (formants)
into vowel-like syllables. Those are the cues an fbank-fed speaker-embedding network learns:
harmonic spacing (pitch) and where each vowel's formants sit (vocal-tract length). Every
utterance varies its syllables, timing, intonation, pitch jitter, loudness and noise, so no
two recordings of a speaker are alike, yet each speaker stays recognisable.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from spkft.core.data.sources import DEMO_MARKER_NAME as MARKER_NAME
from spkft.core.data.sources import MANIFEST_NAME
from spkft.core.errors import DataError
from spkft.core.features import SAMPLE_RATE

# The demo as README measures it: enough voices to learn from, and others to test on.
DEMO_SPEAKERS, DEMO_TEST_SPEAKERS, DEMO_RECORDINGS = 32, 8, 10
README_NAME = "README.txt"

# F1, F2, F3 (Hz) of nine vowels for an average adult vocal tract (Peterson & Barney's figures,
# rounded); each voice scales and shifts them.
_VOWELS = np.array([
    [270, 2290, 3010], [390, 1990, 2550], [530, 1840, 2480],
    [660, 1720, 2410], [730, 1090, 2440], [570, 840, 2410],
    [300, 870, 2240], [440, 1020, 2240], [640, 1190, 2390],
], dtype=np.float64)
_F4_HZ = 3500.0
# Room after each syllable for its resonances to ring out.
_TAIL = int(0.04 * SAMPLE_RATE)


@dataclass(frozen=True)
class _Voice:
    f0_hz: float
    formant_scale: float  # shorter vocal tract, higher formants
    formant_shift: np.ndarray  # the voice's own offset of each formant, as a factor
    bandwidth_scale: float
    tilt_hz: float  # corner of the glottal source's spectral roll-off
    breathiness: float
    vowel_preference: np.ndarray  # probability of each vowel
    syllable_seconds: float


def write_demo(
    directory: str | Path,
    speakers: int = DEMO_SPEAKERS,
    recordings_per_speaker: int = DEMO_RECORDINGS,
    seconds: tuple[float, float] = (2.0, 4.0),
    seed: int = 0,
    test_speakers: int = DEMO_TEST_SPEAKERS,
) -> Path:
    """Write a SYNTHETIC set: 16 kHz WAVs in one folder per speaker plus ``manifest.csv``.

    With ``test_speakers``, the set is two: ``train/`` with ``speakers`` voices and ``test/`` with
    ``test_speakers`` other voices, drawn from the same population, so a model fine-tuned on the
    first can be measured on speakers it never heard. The same arguments always give the same
    audio. ``directory`` must be new, empty, or hold nothing but a previous demo set (which is
    replaced); anything else raises :class:`DataError`. Returns the directory.
    """
    if speakers < 2:
        raise DataError(f"a demo set needs at least 2 speakers, got {speakers}")
    if test_speakers < 0 or test_speakers == 1:
        raise DataError(f"a demo test set needs at least 2 speakers (or 0 for none), got {test_speakers}")
    if recordings_per_speaker < 2:
        raise DataError(f"a demo set needs at least 2 recordings per speaker, got {recordings_per_speaker}")
    low, high = seconds
    if not 0.5 <= low <= high:
        raise DataError(f"recording lengths must satisfy 0.5 <= shortest <= longest, got {low:g}-{high:g} s")
    root = Path(directory).expanduser()
    _clear_previous_demo(root)
    root.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    voices = _voices(speakers + test_speakers, rng)
    # Which voices are the test speakers: a seeded draw, so they span the population as the rest do.
    held_out = set(rng.choice(len(voices), size=test_speakers, replace=False).tolist())
    parts = {"train": [k for k in range(len(voices)) if k not in held_out], "test": sorted(held_out)}
    if not test_speakers:
        parts = {"": parts["train"]}
    written: list[str] = []
    for part, members in parts.items():
        folder = root / part
        folder.mkdir(exist_ok=True)
        listed = []
        for k in members:
            name = f"synth{k + 1:02d}"
            (folder / name).mkdir(exist_ok=True)
            for u in range(recordings_per_speaker):
                # One generator per utterance: each file depends on (seed, speaker, index) only.
                utterance_rng = np.random.default_rng([seed, k, u])
                audio = _utterance(voices[k], utterance_rng.uniform(low, high), utterance_rng)
                relative = f"{name}/{name}_{u:03d}.wav"
                sf.write(folder / relative, audio, SAMPLE_RATE, subtype="PCM_16")
                listed.append(relative)
        (folder / MANIFEST_NAME).write_text(
            "path,speaker\n" + "".join(f"{path},{path.split('/')[0]}\n" for path in listed), encoding="utf-8")
        prefix = f"{part}/" if part else ""
        written += [prefix + path for path in listed] + [prefix + MANIFEST_NAME]
        if part:  # each part is a source of its own, and says it is synthetic
            (folder / MARKER_NAME).write_text(json.dumps({"synthetic": True, "seed": seed, "part": part}) + "\n",
                                              encoding="utf-8")
            written.append(prefix + MARKER_NAME)

    split = (f" in train/ ({speakers} speakers) and test/ ({test_speakers} other speakers, for measuring "
             "a fine-tuned model on voices it never trained on)") if test_speakers else ""
    (root / README_NAME).write_text(
        "SYNTHETIC DATA - not real speech.\n\n"
        f"Written by `spkft data demo` (seed {seed}): {speakers + test_speakers} synthetic speakers{split}, "
        f"{recordings_per_speaker} recordings each, {low:g}-{high:g} s, 16 kHz mono WAV.\n"
        "Each speaker is a source-filter voice (its own pitch and vocal-tract formants) speaking\n"
        "vowel-like syllables. Use it to try spkft end to end; it says nothing about how a model\n"
        "will do on real recordings.\n", encoding="utf-8")
    marker = {"synthetic": True, "seed": seed, "speakers": speakers, "test_speakers": test_speakers,
              "recordings_per_speaker": recordings_per_speaker, "seconds": [low, high],
              "files": [*written, README_NAME]}
    (root / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return root


def _clear_previous_demo(root: Path) -> None:
    """Remove a previous demo set from ``root``; refuse if ``root`` holds anything else."""
    if not root.exists():
        return
    if not root.is_dir():
        raise DataError(f"{root}: exists and is not a folder")
    entries = sorted(p for p in root.rglob("*") if not p.is_dir())
    if not entries:
        return
    refusal = DataError(f"{root}: the folder is not empty and holds no previous spkft demo set; "
                        "choose a new or empty folder")
    try:
        listed = set(json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise refusal from None
    listed.add(MARKER_NAME)
    if any(p.relative_to(root).as_posix() not in listed for p in entries):
        raise refusal
    # Every file below root is one the demo wrote, so the speaker (and part) folders can go whole.
    for child in root.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _voices(count: int, rng: np.random.Generator) -> list[_Voice]:
    # Pitch and vocal-tract length are each spread evenly over their human range and paired at
    # random, so any two voices differ clearly in at least one of them.
    f0s = np.geomspace(85.0, 255.0, count)[rng.permutation(count)]
    scales = np.linspace(0.82, 1.25, count)[rng.permutation(count)]
    voices = []
    for f0, scale in zip(f0s, scales):
        preference = rng.gamma(0.7, size=len(_VOWELS))
        voices.append(_Voice(
            f0_hz=float(f0),
            formant_scale=float(scale),
            formant_shift=rng.uniform(0.92, 1.08, size=4),
            bandwidth_scale=float(rng.uniform(0.7, 1.5)),
            tilt_hz=float(rng.uniform(250.0, 900.0)),
            breathiness=float(rng.uniform(0.01, 0.08)),
            vowel_preference=preference / preference.sum(),
            syllable_seconds=float(rng.uniform(0.14, 0.26)),
        ))
    return voices


def _utterance(voice: _Voice, seconds: float, rng: np.random.Generator) -> np.ndarray:
    length = int(round(seconds * SAMPLE_RATE))
    out = np.zeros(length + _TAIL, dtype=np.float64)
    pitch = voice.f0_hz * rng.uniform(0.94, 1.06)  # this utterance's register
    formants = voice.formant_scale * voice.formant_shift * rng.uniform(0.98, 1.02)
    position = int(rng.uniform(0.05, 0.25) * SAMPLE_RATE)
    while position < length - int(0.1 * SAMPLE_RATE):
        # Declination: pitch drifts down over an utterance, as it does in speech.
        declination = 1.0 - 0.15 * position / length
        duration = voice.syllable_seconds * rng.uniform(0.6, 1.5)
        vowel = rng.choice(len(_VOWELS), p=voice.vowel_preference)
        syllable = _syllable(voice, pitch * declination * rng.uniform(0.9, 1.12),
                             np.append(_VOWELS[vowel], _F4_HZ) * formants * rng.uniform(0.97, 1.03, 4),
                             min(duration, (length - position) / SAMPLE_RATE), rng)
        end = min(position + len(syllable), len(out))
        out[position:end] += syllable[: end - position]
        pause = rng.uniform(0.25, 0.45) if rng.random() < 0.12 else rng.uniform(0.02, 0.1)
        position += int((duration + pause) * SAMPLE_RATE)
    out = out[:length]
    out *= rng.uniform(0.3, 0.8) / max(np.abs(out).max(), 1e-9)
    out += rng.normal(0.0, 10 ** (rng.uniform(-55, -45) / 20), size=length)  # a quiet room
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _syllable(voice: _Voice, f0: float, formants: np.ndarray, seconds: float,
              rng: np.random.Generator) -> np.ndarray:
    n = max(int(seconds * SAMPLE_RATE), 16)
    t = np.arange(n) / SAMPLE_RATE
    # A rise-fall pitch accent plus slow random jitter of about 1.5 %.
    jitter = np.interp(t, np.linspace(0, t[-1], 8), rng.normal(0.0, 0.015, 8))
    contour = f0 * (1.0 + rng.uniform(-0.08, 0.08) * np.sin(np.pi * t / t[-1]) + jitter)
    phase = np.cumsum(contour) / SAMPLE_RATE
    excitation = np.zeros(n + _TAIL)
    pulses = np.flatnonzero(np.diff(np.floor(phase), prepend=0.0) > 0)
    excitation[pulses] = 1.0 + rng.normal(0.0, 0.08, len(pulses))  # shimmer
    excitation[:n] += voice.breathiness * rng.normal(0.0, 1.0, n)
    attack, release = min(int(0.02 * SAMPLE_RATE), n), min(int(0.05 * SAMPLE_RATE), n)
    envelope = np.ones(n)
    envelope[:attack] = np.linspace(0.0, 1.0, attack)
    envelope[n - release:] *= np.linspace(1.0, 0.0, release)
    excitation[:n] *= envelope
    return _vocal_tract(excitation, formants, voice)


def _vocal_tract(excitation: np.ndarray, formants: np.ndarray, voice: _Voice) -> np.ndarray:
    """Filter the excitation through the glottal roll-off and a cascade of formant resonators."""
    size = 1 << int(np.ceil(np.log2(len(excitation))))
    freqs = np.fft.rfftfreq(size, 1.0 / SAMPLE_RATE)
    z1 = np.exp(-2j * np.pi * freqs / SAMPLE_RATE)
    response = 1.0 / (1.0 + (freqs / voice.tilt_hz) ** 2) ** 0.5
    bandwidths = voice.bandwidth_scale * np.array([60.0, 90.0, 120.0, 180.0])
    for centre, bandwidth in zip(formants, bandwidths):
        centre = min(centre, 0.45 * SAMPLE_RATE)
        r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
        a1, a2 = -2.0 * r * np.cos(2.0 * np.pi * centre / SAMPLE_RATE), r * r
        # Unit gain at 0 Hz, as in Klatt's resonators, so formants shape rather than amplify.
        response = response * (1.0 + a1 + a2) / (1.0 + a1 * z1 + a2 * z1 * z1)
    return np.fft.irfft(np.fft.rfft(excitation, size) * response, size)[: len(excitation)]
