"""The model's front end: Kaldi fbank with per-utterance mean normalisation.

This is exactly what 3D-Speaker feeds ERes2NetV2: 80 mel bins from 25 ms frames every 10 ms
(``torchaudio.compliance.kaldi`` defaults otherwise) on mono float audio in [-1, 1] at 16 kHz,
minus the mean of each bin over the utterance. Training may dither; nothing else does.
"""

from __future__ import annotations

import torch
import torchaudio.compliance.kaldi as kaldi

SAMPLE_RATE = 16000
FEATURE_DIM = 80
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0


def fbank(waveform: torch.Tensor, dither: float = 0.0) -> torch.Tensor:
    """Mean-normalised fbank ``[frames, 80]`` of a mono 16 kHz waveform ``[samples]``."""
    if waveform.dim() != 1:
        raise ValueError(f"expected a mono waveform [samples], got shape {list(waveform.shape)}")
    features = kaldi.fbank(
        waveform.unsqueeze(0).to(torch.float32),
        num_mel_bins=FEATURE_DIM,
        sample_frequency=SAMPLE_RATE,
        frame_length=FRAME_LENGTH_MS,
        frame_shift=FRAME_SHIFT_MS,
        dither=dither,
    )
    return features - features.mean(dim=0, keepdim=True)


def num_frames(num_samples: int) -> int:
    """Frames Kaldi's fbank yields for ``num_samples`` at 16 kHz (snip_edges=True)."""
    frame = int(SAMPLE_RATE * FRAME_LENGTH_MS / 1000)
    shift = int(SAMPLE_RATE * FRAME_SHIFT_MS / 1000)
    return 0 if num_samples < frame else 1 + (num_samples - frame) // shift


def seconds_for_frames(frames: int) -> float:
    """Shortest audio duration that yields ``frames`` frames."""
    return (FRAME_LENGTH_MS + (frames - 1) * FRAME_SHIFT_MS) / 1000.0
