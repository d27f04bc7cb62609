"""The per-epoch weight snapshots a run keeps for checkpoint averaging, and which of them it keeps.

With ``run.average_last: N`` or ``run.average_best: N`` the trainer saves each epoch's
embedding-model weights as ``epochs/epoch-NNN.ckpt`` and keeps only the snapshots that can still
be chosen: the last N epochs, or the N best validation EERs so far (ties go to the earlier
epoch, as ``best.ckpt``'s do). The kept set is recorded in ``last.ckpt``; a resumed run restores
it from there and deletes every other snapshot, such as one written for an epoch the kill
interrupted before ``last.ckpt`` recorded it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from spkft.core.train.config import RunConfig


@dataclass(frozen=True)
class Snapshot:
    epoch: int  # from 1
    val_eer: float


class EpochSnapshots:
    """The kept snapshots of one run, chosen by ``rule`` (``last`` or ``best``) and ``count``."""

    def __init__(self, directory: Path, rule: Literal["last", "best"], count: int) -> None:
        self.directory, self.rule, self.count = directory, rule, count
        self.kept: list[Snapshot] = []  # in epoch order

    @classmethod
    def from_config(cls, run_dir: Path, run: RunConfig) -> EpochSnapshots | None:
        """The snapshots ``run.average_last``/``run.average_best`` ask for, or None when averaging is off."""
        if run.average_last:
            return cls(run_dir / "epochs", "last", run.average_last)
        if run.average_best:
            return cls(run_dir / "epochs", "best", run.average_best)
        return None

    @property
    def description(self) -> str:
        """What is averaged, as ``metrics.jsonl`` and the run's summary say it: ``last 3``, ``best 3``."""
        return f"{self.rule} {self.count}"

    def path(self, epoch: int) -> Path:
        return self.directory / f"epoch-{epoch:03d}.ckpt"

    def _choose(self, candidates: list[Snapshot]) -> list[Snapshot]:
        if self.rule == "last":
            chosen = sorted(candidates, key=lambda s: s.epoch)[-self.count:]
        else:
            chosen = sorted(candidates, key=lambda s: (s.val_eer, s.epoch))[:self.count]
        return sorted(chosen, key=lambda s: s.epoch)

    def offer(self, epoch: int, val_eer: float) -> tuple[bool, list[Path]]:
        """Add an epoch: whether its snapshot is kept (and must be written), and the files no longer needed.

        The caller writes the new snapshot, then ``last.ckpt`` (which records :meth:`state`), and
        only then deletes the dropped files, so a kill anywhere leaves a set ``last.ckpt`` describes.
        """
        before = {s.epoch for s in self.kept}
        self.kept = self._choose(self.kept + [Snapshot(epoch, val_eer)])
        after = {s.epoch for s in self.kept}
        return epoch in after, [self.path(e) for e in sorted(before - after)]

    def state(self) -> list[dict[str, Any]]:
        """The kept set as plain values, for ``last.ckpt``."""
        return [{"epoch": s.epoch, "val_eer": s.val_eer} for s in self.kept]

    def restore(self, state: list[dict[str, Any]], delete_others: bool) -> None:
        """Take the kept set from ``last.ckpt``; with ``delete_others``, remove every other snapshot file.

        A recorded snapshot whose file has gone cannot be averaged and leaves the set.
        """
        recorded = [Snapshot(int(s["epoch"]), float(s["val_eer"])) for s in state]
        self.kept = [s for s in recorded if self.path(s.epoch).is_file()]
        if delete_others and self.directory.is_dir():
            wanted = {self.path(s.epoch) for s in self.kept}
            for path in [*self.directory.glob("epoch-*.ckpt"), *self.directory.glob(".epoch-*.ckpt.tmp")]:
                if path not in wanted:
                    path.unlink()
