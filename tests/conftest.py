"""Shared fixtures: the reference files and real speech in ../shared, and tiny models."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
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


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The URL of the test PostgreSQL server (.ci/run starts one and sets SPKFT_TEST_POSTGRES)."""
    url = os.environ.get("SPKFT_TEST_POSTGRES")
    if not url:
        pytest.skip("no PostgreSQL to test with: set SPKFT_TEST_POSTGRES to a server's URL "
                    "(.ci/run starts a throwaway one with .ci/postgres)")
    return url


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the test server, dropped afterwards."""
    import psycopg

    name = f"spkft_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres_server.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def postgres_control(postgres_server):
    """Stops and starts the test PostgreSQL server (a cluster that .ci/postgres made); restarts it after the test."""
    cluster = os.environ.get("SPKFT_TEST_POSTGRES_DIR")
    if not cluster:
        pytest.skip("cannot stop and start the test PostgreSQL: set SPKFT_TEST_POSTGRES_DIR to the cluster "
                    "folder that .ci/postgres made")
    script = Path(__file__).resolve().parents[1] / ".ci" / "postgres"

    def control(action: str) -> None:
        subprocess.run([script, action, cluster], check=True, timeout=120)

    yield control
    import psycopg

    try:
        psycopg.connect(postgres_server, connect_timeout=2).close()
    except psycopg.OperationalError:
        control("start")


# ---------------------------------------------------------------- the served tiny model and its audio


@pytest.fixture(scope="session")
def model_file(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny reference model, exported to ONNX."""
    from spkft.core.export import export_onnx

    output = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export_onnx(tiny_checkpoint, output)
    return output


@pytest.fixture(scope="session")
def onnx_embedder(model_file):
    from spkft.core.onnx_model import OnnxEmbedder

    return OnnxEmbedder.from_file(model_file, threads=1)


@pytest.fixture(scope="session")
def clips(speech) -> list[bytes]:
    """WAV bytes of real speech: 1.5 s, 1.5 s (a batch partner of the first), 2 s and 1.2 s."""
    from serve_helpers import wav_bytes

    data, rate = speech
    bounds = [(0.0, 1.5), (1.5, 3.0), (3.0, 5.0), (5.0, 6.2)]
    return [wav_bytes(data[int(a * rate) : int(b * rate)], rate) for a, b in bounds]


@pytest.fixture(scope="session")
def other_speaker(librispeech_dir) -> bytes:
    from serve_helpers import wav_bytes

    data, rate = sf.read(librispeech_dir / "1034-121119-0000.flac", dtype="float32")
    return wav_bytes(data[: 2 * rate], rate)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: the tiny model is so small that, on a busy two-core
    machine, threads spend far longer waiting for each other than computing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
