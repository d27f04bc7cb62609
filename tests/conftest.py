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



@pytest.fixture(scope="session")
def tiny_bytes() -> bytes:
    """The file served for the tests' catalogue entry (model_server.TINY)."""
    from model_server import state_bytes

    return state_bytes("eres2netv2_w24s4ep4", m_channels=8)


@pytest.fixture
def server():
    """A ModelScope stand-in on a loopback port, for this test only."""
    from model_server import ModelServer, start

    state = ModelServer()
    httpd, thread = start(state)
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def home(tmp_path, monkeypatch, server, tiny_bytes) -> Path:
    """An empty model cache, the endpoint pointed at the stand-in, the tiny entry in the catalogue and served.

    The working folder is ``tmp_path``; retries after a cut connection do not wait.
    """
    import spkft.core.download as download_module
    from model_server import PROXY_VARIABLES, TINY
    from spkft.core.catalogue import CATALOGUE

    for proxy in PROXY_VARIABLES:
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("SPKFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPKFT_MODEL_ENDPOINT", server.url())
    monkeypatch.setitem(CATALOGUE, TINY.name, TINY)
    monkeypatch.setattr(download_module, "_sleep", lambda seconds, cancel: None)
    monkeypatch.chdir(tmp_path)
    server.files[(TINY.model_id, TINY.revision, TINY.file)] = tiny_bytes
    return tmp_path / "home"
