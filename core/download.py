"""Resumable HTTP downloads into a file that appears only once it is complete and checked.

The bytes go to a partial file outside the destination folder. An interrupted transfer keeps
what it has, and the next attempt (in the same call, or a later one) asks for the rest with an
HTTP ``Range`` request; ``If-Range`` makes the server send the whole file again if it changed in
between. Only after the last byte, the size check and the caller's ``verify`` does the file move
onto the destination, in one rename. A cancelled download deletes its partial file.
"""

from __future__ import annotations

import json
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional
from urllib.parse import urlsplit

import httpx
from filelock import FileLock, Timeout

from spkft.core.errors import SpkftError, first_line

Progress = Callable[[int, Optional[int]], None]  # (bytes so far, total bytes or None when unknown)

PROGRESS_INTERVAL_SECONDS = 0.1
# Server-side trouble that is worth one more try; a 404 or 403 will not change by asking again.
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
USER_AGENT = "spkft"


class DownloadError(SpkftError):
    """A download that could not complete: the server, the network or the file's check failed."""


class DownloadCancelled(DownloadError):
    """A download stopped on request; nothing of it is left on disk."""


@dataclass
class _Resume:
    """What the partial file holds, and the validators that say it is still the same file upstream."""

    url: str
    etag: Optional[str] = None
    last_modified: Optional[str] = None
    total: Optional[int] = None


class _Restart(Exception):
    """The server cannot continue the partial file: start over from byte 0."""


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def download(
    url: str,
    destination: Path,
    partial: Path,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    verify: Callable[[Path], None] | None = None,
    attempts: int = 4,
    timeout: float = 30.0,
    backoff_seconds: float = 1.0,
) -> Path:
    """Fetch ``url`` into ``destination`` by way of ``partial``; returns ``destination``.

    ``partial`` must be on the same file system as ``destination`` (the last step is a rename).
    ``verify`` gets the complete file and raises to refuse it; a refused file is deleted.
    A transfer cut short is resumed up to ``attempts`` times in this call; when they run out, the
    partial file stays for the next call to resume. ``cancel`` stops between chunks.
    """
    partial.parent.mkdir(parents=True, exist_ok=True)
    with _locked(partial, cancel):
        if destination.is_file():  # another process finished it while this one waited
            return destination
        state = _load_state(partial, url)
        failures = 0
        while True:
            offset = partial.stat().st_size if partial.is_file() else 0
            try:
                _transfer(url, partial, offset, state, progress, cancel, timeout)
                break
            except _Restart:
                _discard(partial)
                state = _Resume(url)
            except (httpx.TransportError, _RetryableStatus) as exc:
                if cancel is not None and cancel.is_set():
                    break  # cancelled while the connection failed: cancelled it is
                got = partial.stat().st_size if partial.is_file() else 0
                failures = 0 if got > offset else failures + 1  # a try that moved forward is not a failure
                # No connection at all means offline or a wrong endpoint: asking again will not help.
                if isinstance(exc, httpx.ConnectError) or failures >= attempts:
                    raise DownloadError(_stopped(url, exc, got, state.total)) from None
                _sleep(backoff_seconds * failures, cancel)
        if cancel is not None and cancel.is_set():
            _discard(partial)
            raise DownloadCancelled("download cancelled; its partial file was deleted")
        if verify is not None:
            try:
                verify(partial)
            except Exception:
                _discard(partial)
                raise
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial.replace(destination)
        _state_path(partial).unlink(missing_ok=True)
    return destination


class _RetryableStatus(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code} {response.reason_phrase}")


def _transfer(url: str, partial: Path, offset: int, state: _Resume, progress: Progress | None,
              cancel: threading.Event | None, timeout: float) -> None:
    """One GET from ``offset`` to the end, appending to ``partial``; raises to retry or give up."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        validator = state.etag or state.last_modified
        if validator:
            headers["If-Range"] = validator
    with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0))) as client:
        with client.stream("GET", url, headers=headers) as response:
            status = response.status_code
            if status == 416 and offset:
                total = _range_total(response.headers.get("Content-Range", ""))
                if total == offset:  # the partial file already holds every byte
                    state.total = total
                    return
                raise _Restart()
            if status in RETRY_STATUS:
                raise _RetryableStatus(response)
            if status >= 400:
                raise DownloadError(f"HTTP {status} {response.reason_phrase} from {url}")
            if status == 206:
                start = _range_start(response.headers.get("Content-Range", ""))
                if start != offset:
                    raise _Restart()
                total = _range_total(response.headers.get("Content-Range", ""))
            else:  # 200: the whole file, from byte 0, whatever was asked
                offset = 0
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            state.total = total
            state.etag = response.headers.get("ETag") if not _weak(response.headers.get("ETag")) else None
            state.last_modified = response.headers.get("Last-Modified")
            _save_state(partial, state)
            _receive(response, partial, offset, total, progress, cancel)


def _receive(response: httpx.Response, partial: Path, offset: int, total: int | None,
             progress: Progress | None, cancel: threading.Event | None) -> None:
    done, reported = offset, 0.0
    with partial.open("r+b" if offset else "wb") as handle:
        handle.seek(offset)
        handle.truncate()
        if progress is not None:
            progress(done, total)
        # Chunks as they arrive (no re-buffering): a cut connection loses none of what it delivered.
        for chunk in response.iter_bytes():
            handle.write(chunk)
            done += len(chunk)
            if cancel is not None and cancel.is_set():
                return
            now = time.monotonic()
            if progress is not None and now - reported >= PROGRESS_INTERVAL_SECONDS:
                progress(done, total)
                reported = now
    if progress is not None:
        progress(done, total)
    if total is not None and done != total:
        raise httpx.RemoteProtocolError(f"the server closed the connection after {done} of {total} bytes")


@contextmanager
def _locked(partial: Path, cancel: threading.Event | None) -> Iterator[None]:
    """One download of a file at a time across processes; waiting for the other can be cancelled."""
    lock = FileLock(str(partial) + ".lock")
    while True:
        try:
            lock.acquire(timeout=0.5)
            break
        except Timeout:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled("download cancelled while another process was fetching the same file") from None
    try:
        yield
    finally:
        lock.release()


def _state_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _load_state(partial: Path, url: str) -> _Resume:
    """The partial file's record; a partial of another URL (or with no record) is started afresh."""
    try:
        record = json.loads(_state_path(partial).read_text())
        if record.get("url") == url:
            return _Resume(url, record.get("etag"), record.get("last_modified"), record.get("total"))
    except (OSError, ValueError, AttributeError):
        pass
    _discard(partial)
    return _Resume(url)


def _save_state(partial: Path, state: _Resume) -> None:
    _state_path(partial).write_text(json.dumps(state.__dict__))


def _discard(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    _state_path(partial).unlink(missing_ok=True)


def _range_start(content_range: str) -> int | None:
    found = re.match(r"bytes (\d+)-\d+/", content_range)
    return int(found.group(1)) if found else None


def _range_total(content_range: str) -> int | None:
    found = re.search(r"/(\d+)$", content_range)
    return int(found.group(1)) if found else None


def _weak(etag: str | None) -> bool:
    # A weak validator may not be used with If-Range (RFC 9110, 13.1.5).
    return etag is None or etag.startswith("W/")


def _host(url: str) -> str:
    return urlsplit(url).netloc or url


def _reason(exc: BaseException) -> str:
    text = first_line(exc)
    return text.split("] ", 1)[-1] if text.startswith("[Errno") else text


def _stopped(url: str, exc: BaseException, got: int, total: int | None) -> str:
    if isinstance(exc, httpx.ConnectError):
        kept = f"; the {megabytes(got)} already fetched are kept for the next attempt" if got else ""
        return f"cannot connect to {_host(url)} ({_reason(exc)}){kept}"
    if not got:
        return f"download from {url} failed: {_reason(exc)}"
    of = f" of {megabytes(total)}" if total else ""
    return (f"download from {url} stopped after {megabytes(got)}{of} ({_reason(exc)}); "
            "what arrived is kept and the next attempt resumes from there")


def _sleep(seconds: float, cancel: threading.Event | None) -> None:
    if cancel is None:
        time.sleep(seconds)
    else:
        cancel.wait(seconds)
