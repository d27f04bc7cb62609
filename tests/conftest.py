"""Shared fixtures: the reference files and real speech in ../shared, and tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"
DATA = SHARED / "data"
LIBRISPEECH = DATA / "librispeech-train-clean-100-251spk"
FSDD = DATA / "fsdd-8khz"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (expected ../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _require(REFERENCE)


@pytest.fixture(scope="session")
def librispeech_dir() -> Path:
    return _require(LIBRISPEECH)


@pytest.fixture(scope="session")
def fsdd_dir() -> Path:
    return _require(FSDD)


@pytest.fixture(scope="session")
def speech_file(librispeech_dir) -> Path:
    """A 14 s LibriSpeech utterance (16 kHz FLAC) whose fbank is pinned by a reference file."""
    return librispeech_dir / "103-1240-0000.flac"


@pytest.fixture(scope="session")
def tiny_checkpoint(reference_dir) -> Path:
    """Upstream's plain state_dict of a w24s4ep4 model with m_channels=8 (random weights)."""
    return reference_dir / "tiny_w24s4ep4_m8.ckpt"


@pytest.fixture(scope="session")
def speech(speech_file) -> tuple[np.ndarray, int]:
    data, rate = sf.read(speech_file, dtype="float32")
    return data, rate

