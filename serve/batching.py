"""Dynamic batching: concurrent requests share one inference call when their inputs are equally long.

ERes2NetV2 pools statistics over every frame it is given and has no length mask, so padding
would change a shorter input's embedding: only inputs with the same number of frames may share a
batch. The :class:`Batcher` has no threads of its own. Callers of :meth:`Batcher.run` queue their
input in one bounded queue and wait; whenever one of the ``workers`` inference slots is free, a
waiting caller takes it and, in its own thread, embeds the oldest pending input together with the
pending inputs of the same length (its own among them or not), oldest first, then hands every
caller its rows. A batch holds at most ``max_batch`` rows and at most ``max_batch_frames`` frames
in all (one input is never split), so memory stays bounded like one long recording's.

A lone request therefore runs in the thread that received it, with no hand-off to wake up for;
while every slot is busy, inputs pile up and leave together in later batches. A leader may wait
up to ``max_wait_seconds`` for partners first; the server's default is not to, because batching
gives no per-item gain on CPUs (``benchmarks/serve_speed.py``).

:class:`BatchedEmbedder` is the recording-level embedder the service uses: decoding and fbank run
in the request's own thread, and only the network goes through the batcher.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
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
    arrived: float = field(default_factory=time.monotonic)
    done: bool = False
    result: np.ndarray | None = None
    error: Exception | None = None

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
        workers: int = 1,
        max_queue: int = 256,
        max_batch: int = 16,
        max_batch_frames: int = 3000,
        max_wait_seconds: float = 0.0,
    ) -> None:
        if min(workers, max_queue, max_batch, max_batch_frames) < 1 or max_wait_seconds < 0:
            raise ValueError("need workers, max_queue, max_batch, max_batch_frames >= 1 and max_wait_seconds >= 0")
        self._embed_batch = embed_batch
        self.workers = workers
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.max_batch_frames = max_batch_frames
        self.max_wait_seconds = max_wait_seconds
        self._pending: deque[_Pending] = deque()
        self._changed = threading.Condition()
        self._free_slots = workers
        self._closed = False

    @property
    def pending(self) -> int:
        """Inputs waiting for an inference slot (not counting those being embedded)."""
        with self._changed:
            return len(self._pending)

    def run(self, features: np.ndarray) -> np.ndarray:
        """``embed_batch``'s rows for features ``[rows, frames, 80]``, embedded alone or with others.

        Raises :class:`QueueFullError` when ``max_queue`` inputs are already pending, and
        :class:`BatcherClosedError` once :meth:`close` has been called.
        """
        item = _Pending(np.ascontiguousarray(features, dtype=np.float32))
        with self._changed:
            if self._closed:
                raise BatcherClosedError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"the server is busy: {self.max_queue} requests are already queued; retry later")
            self._pending.append(item)
            self._changed.notify_all()  # a leader waiting for partners may now have a full batch
            while not item.done:
                batch, wait = self._ready_batch()
                if batch is None:
                    self._changed.wait(wait)
                    continue
                self._free_slots -= 1
                self._changed.release()
                try:
                    self._embed(batch)
                finally:
                    self._changed.acquire()
                    self._free_slots += 1
                    self._changed.notify_all()  # the batch's callers are answered, and a slot is free
        if item.error is not None:
            raise item.error
        return item.result

    def close(self, wait: bool = True) -> None:
        """Refuse new inputs and, with ``wait``, wait until the pending ones are embedded."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            while wait and (self._pending or self._free_slots < self.workers):
                self._changed.wait()

    def _ready_batch(self) -> tuple[list[_Pending] | None, float | None]:
        """With the lock held: a batch to embed now, or none and how long to wait before looking again."""
        if not self._free_slots or not self._pending:
            return None, None  # woken when a slot frees or an input arrives
        oldest = self._pending[0]
        limit = max(1, min(self.max_batch, self.max_batch_frames // oldest.frames))
        due_in = oldest.arrived + self.max_wait_seconds - time.monotonic()
        rows = sum(p.rows for p in self._pending if p.frames == oldest.frames)
        if rows < limit and due_in > 0 and not self._closed:
            return None, due_in
        batch, rows, kept = [], 0, deque()
        for item in self._pending:
            if item.frames == oldest.frames and (not batch or rows + item.rows <= limit):
                batch.append(item)
                rows += item.rows
            else:
                kept.append(item)
        self._pending = kept
        return batch, None

    def _embed(self, batch: list[_Pending]) -> None:
        """Embed a batch outside the lock; every caller in it gets its rows or the error."""
        try:
            rows = self._embed_batch(np.concatenate([item.features for item in batch]))
        except Exception as exc:  # each caller raises it; the batcher lives on
            for item in batch:
                item.error = exc
        else:
            start = 0
            for item in batch:
                item.result = rows[start : start + item.rows]
                start += item.rows
        finally:
            for item in batch:
                item.done = True


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
        return self.batcher.run(features.numpy())
