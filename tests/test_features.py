from __future__ import annotations

import numpy as np
import pytest
import torch

from spkft.core.audio import load_audio
from spkft.core.features import fbank, num_frames


def test_fbank_equals_upstream_model_input(speech_file, reference_dir):
    expected = np.load(reference_dir / "103-1240-0000.fbank_cmn.npy")
    features = fbank(load_audio(speech_file).tensor()).numpy()
    assert features.shape == expected.shape == (1407, 80)
    # float32 FFTs round differently from one CPU to another, and the log of a quiet frame's
    # lowest mel bins magnifies that: a few values differ by up to ~2e-4, the rest by ~1e-6.
    # A wrong window, mel bank, dither or CMN would move them by orders of magnitude more.
    difference = np.abs(features - expected)
    assert difference.mean() < 1e-5 and difference.max() < 1e-3
    assert (difference > 1e-4).mean() < 1e-3


def test_features_are_mean_normalised_per_utterance(speech):
    data, _ = speech
    features = fbank(torch.from_numpy(data))
    assert features.mean(dim=0).abs().max() < 1e-3


def test_frame_count_formula_matches_kaldi(speech):
    data, _ = speech
    for n in (400, 401, 559, 560, 16000, len(data)):
        assert fbank(torch.from_numpy(data[:n])).shape[0] == num_frames(n)
    assert num_frames(399) == 0


def test_dither_is_off_by_default_and_changes_output_when_on(speech):
    wave = torch.from_numpy(speech[0][:16000])
    assert torch.equal(fbank(wave), fbank(wave))
    torch.manual_seed(0)
    assert not torch.equal(fbank(wave), fbank(wave, dither=1.0))


def test_only_mono_waveforms_are_accepted():
    with pytest.raises(ValueError, match="mono"):
        fbank(torch.zeros(2, 16000))
