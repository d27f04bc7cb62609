"""Dynamic batching: concurrent requests share one onnxruntime call when their inputs are equally long.

ERes2NetV2 pools statistics over every frame it is given and has no length mask, so padding
would change a shorter input's embedding: only inputs with the same number of frames may share a
batch. The :class:`Batcher` keeps one bounded queue of pending inputs. A dispatcher thread waits
for a free inference worker, takes the oldest pending input, waits until it has been pending for
``max_wait_seconds`` (or until a full batch of its length is pending), and hands the pending
inputs of that length, oldest first, to the worker as one batch. A batch holds at most
``max_batch`` rows and at most ``max_batch_frames`` frames in all (one input is never split), so
memory stays bounded like one long recording's. While every worker is busy, inputs pile up and
later batches grow, so throughput rises with load; under no load an input waits at most
``max_wait_seconds``.

:class:`BatchedEmbedder` is the recording-level embedder the service uses: decoding and fbank run
in the request's own thread, and only the network goes through the batcher.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from spkft.core.embedding import SpeakerEmbedder


class QueueFullError(Exception):
    """More inputs are pending than the batcher accepts; the caller should retry later."""


class BatcherClosedError(Exception):
    """The batcher has been closed and takes no more inputs."""


@dataclass
class _Pending:
    features: np.ndarray  # [rows, frames, 80]
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)

    @property
    def frames(self) -> int:
        return self.features.shape[1]

    @property
    def rows(self) -> int:
        return self.features.shape[0]


class Batcher:
    """Runs ``embed_batch`` on batches of equally long inputs gathered from concurrent callers."""

    def __init__(
        self,
        embed_batch: Callable[[np.ndarray], np.ndarray],
        workers: int = 2,
        max_queue: int = 256,
        max_batch: int = 16,
        max_batch_frames: int = 3000,
        max_wait_seconds: float = 0.005,
    ) -> None:
        if min(workers, max_queue, max_batch, max_batch_frames) < 1 or max_wait_seconds < 0:
            raise ValueError("need workers, max_queue, max_batch, max_batch_frames >= 1 and max_wait_seconds >= 0")
        self._embed_batch = embed_batch
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.max_batch_frames = max_batch_frames
        self.max_wait_seconds = max_wait_seconds
        self._pending: deque[_Pending] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._free_workers = threading.Semaphore(workers)
        self._workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spkft-inference")
        self._dispatcher = threading.Thread(target=self._dispatch, name="spkft-batcher", daemon=True)
        self._dispatcher.start()

    @property
    def pending(self) -> int:
        """Inputs waiting for a worker (not counting those being embedded)."""
        with self._changed:
            return len(self._pending)

    def submit(self, features: np.ndarray) -> Future:
        """Queue features ``[rows, frames, 80]``; the future gives ``embed_batch``'s rows for them.

        Raises :class:`QueueFullError` when ``max_queue`` inputs are already pending.
        """
        item = _Pending(np.ascontiguousarray(features, dtype=np.float32))
        with self._changed:
            if self._closed:
                raise BatcherClosedError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"the server is busy: {self.max_queue} requests are already queued; retry later")
            self._pending.append(item)
            self._changed.notify_all()
        return item.future

    def close(self) -> None:
        """Refuse new inputs, embed the pending ones, and stop the threads."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._dispatcher.join()
        self._workers.shutdown(wait=True)

    def _dispatch(self) -> None:
        while True:
            self._free_workers.acquire()
            batch = self._next_batch()
            if batch is None:
                return
            self._workers.submit(self._run, batch)

    def _next_batch(self) -> list[_Pending] | None:
        """The oldest pending input and those of its length, once the batch is full or due."""
        with self._changed:
            while True:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if not self._pending:
                    return None
                oldest = self._pending[0]
                limit = max(1, min(self.max_batch, self.max_batch_frames // oldest.frames))
                due_in = oldest.arrived + self.max_wait_seconds - time.monotonic()
                rows = sum(p.rows for p in self._pending if p.frames == oldest.frames)
                if rows >= limit or due_in <= 0 or self._closed:
                    break
                self._changed.wait(due_in)
            batch, rows, kept = [], 0, deque()
            for item in self._pending:
                if item.frames == oldest.frames and (not batch or rows + item.rows <= limit):
                    batch.append(item)
                    rows += item.rows
                else:
                    kept.append(item)
            self._pending = kept
            return batch

    def _run(self, batch: list[_Pending]) -> None:
        try:
            features = np.concatenate([item.features for item in batch])
            try:
                rows = self._embed_batch(features)
            except Exception as exc:  # the callers see it; the worker lives on
                for item in batch:
                    item.future.set_exception(exc)
                return
            start = 0
            for item in batch:
                item.future.set_result(rows[start : start + item.rows])
                start += item.rows
        finally:
            self._free_workers.release()


class BatchedEmbedder(SpeakerEmbedder):
    """Embeds recordings exactly as ``model`` does, with the network calls going through a :class:`Batcher`."""

    def __init__(self, model: SpeakerEmbedder, batcher: Batcher) -> None:
        super().__init__()
        # Same windowing of long recordings as the model's own embed_features.
        self.max_whole_frames = model.max_whole_frames
        self.chunk_frames = model.chunk_frames
        self.chunks_per_batch = model.chunks_per_batch
        self.model = model
        self.batcher = batcher

    @property
    def embedding_dim(self) -> int:
        return self.model.embedding_dim

    def _forward(self, features: torch.Tensor) -> np.ndarray:
        return self.batcher.submit(features.numpy()).result()
