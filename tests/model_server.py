"""A ModelScope stand-in for tests: files served over loopback HTTP under ModelScope's URL layout.

``/api/v1/models/<owner>/<name>/repo?Revision=<revision>&FilePath=<file>`` answers with the file
registered for that model, revision and file name, honouring ``Range: bytes=N-`` (206) and
``If-Range``. Faults are set per server: cut the next responses after a number of bytes, or
answer with a status code. Every request's path and headers are kept for the tests to read.
"""

from __future__ import annotations

import io
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import torch

from spkft.core.catalogue import ReleasedModel
from spkft.core.model import build_model

ETAG = '"spkft-test-1"'
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")

# A catalogue entry for tests: a w24s4ep4 with m_channels 8, small enough to download in a blink.
TINY = ReleasedModel(
    name="tiny_w24s4ep4", variant="eres2netv2_w24s4ep4", model_id="spkft-tests/tiny_w24s4ep4",
    revision="v1.0.1", file="pretrained_tiny.ckpt", parameters=0, size_bytes=7_000_000,
    training_data="nothing (random weights)", licence="Apache-2.0", language="none",
    model_args={"m_channels": 8},
)


def state_bytes(variant: str, seed: int = 0, **args) -> bytes:
    """A plain state_dict file, as 3D-Speaker releases them, of a randomly initialised model."""
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.save(build_model(variant, **args).state_dict(), buffer)
    return buffer.getvalue()


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass
class ModelServer:
    files: dict[tuple[str, str, str], bytes] = field(default_factory=dict)  # (model_id, revision, file) -> bytes
    cut_after: list[int] = field(default_factory=list)  # the next responses stop after this many body bytes
    status: int | None = None  # answer every request with this status instead
    fail_with: list[int] = field(default_factory=list)  # answer the next requests with these statuses
    etag: str = ETAG  # the file's validator; change it to say the file changed upstream
    seen: list[Seen] = field(default_factory=list)
    delay_per_chunk: float = 0.0  # seconds between 64 kB chunks, for downloads slow enough to cancel
    port: int = 0

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start(server_state: ModelServer) -> tuple[ThreadingHTTPServer, threading.Thread]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            return

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            server_state.seen.append(Seen(self.path, dict(self.headers.items())))
            if server_state.status is not None or server_state.fail_with:
                self._reply_empty(server_state.status or server_state.fail_with.pop(0))
                return
            parts = urlsplit(self.path)
            found = re.fullmatch(r"/api/v1/models/(.+)/repo", unquote(parts.path))
            query = parse_qs(parts.query)
            key = (found.group(1) if found else "", query.get("Revision", [""])[0], query.get("FilePath", [""])[0])
            body = server_state.files.get(key)
            if body is None:
                self._reply_empty(404)
                return
            start_at = 0
            wanted = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if wanted and (if_range is None or if_range == server_state.etag):
                start_at = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
                if start_at >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start_at}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start_at))
            self.send_header("ETag", server_state.etag)
            self.end_headers()
            limit = server_state.cut_after.pop(0) if server_state.cut_after else None
            sent, position = 0, start_at
            while position < len(body):
                chunk = body[position:position + 65536]
                if limit is not None and sent + len(chunk) > limit:
                    self.wfile.write(chunk[:limit - sent])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(chunk)
                position += len(chunk)
                if server_state.delay_per_chunk:
                    threading.Event().wait(server_state.delay_per_chunk)

        def _reply_empty(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server_state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, thread
