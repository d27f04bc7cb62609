"""Helpers for the server tests: audio bytes, servers in this process or in a subprocess, waiting."""

from __future__ import annotations

import io
import selectors
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from spkft.core.onnx_model import OnnxEmbedder
from spkft.serve.server import ServerConfig, SpeakerServer, create_server

ROOT = Path(__file__).resolve().parents[1]
SPKFT = [sys.executable, "-m", "spkft.tui.cli"]


def wav_bytes(samples: np.ndarray, rate: int = 16000, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype="PCM_16" if fmt == "WAV" else None)
    return buffer.getvalue()


def started(config: ServerConfig, model: OnnxEmbedder) -> SpeakerServer:
    server = create_server(config)
    server.start()
    server.load(model)
    return server



def spawn_server(*args: str, code: str | None = None) -> tuple[subprocess.Popen, str]:
    """Run ``spkft serve --port 0 ...`` (or ``python -c code serve ...``); wait for it to listen."""
    command = [sys.executable, "-c", code, "serve"] if code else [*SPKFT, "serve"]
    process = subprocess.Popen([*command, "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT)
    line = read_line(process, "listening on")
    process.announcement = line
    return process, line.split("listening on ")[1].split()[0]


def read_line(process: subprocess.Popen, marker: str, timeout: float = 90.0) -> str:
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=1.0):
            line = process.stdout.readline()
            if marker in line:
                return line
            if not line:
                break
    process.kill()
    raise AssertionError(f"no {marker!r} from the server: {process.communicate()[1][-2000:]}")



def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
