"""Verification trials: generated from labelled recordings, or read from and written to lists.

A trial list has one trial per line, ``enrol test label``, whitespace separated, with the label
``target``/``nontarget`` (Kaldi, 3D-Speaker) or ``1``/``0``. VoxCeleb's published lists put the
label first (``1 enrol test``); those are read too.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterable
from itertools import accumulate, groupby
from pathlib import Path

from spkft.core.errors import DataError
from spkft.core.records import Recording, Trial

_LABELS = {"target": True, "nontarget": False, "1": True, "0": False}
_FORMAT = "'enrol test target|nontarget|1|0'"


def make_trials(
    recordings: Iterable[Recording],
    seed: int = 0,
    *,
    max_target: int | None = 100_000,
    nontarget_per_target: float | None = 1.0,
    max_nontarget: int | None = None,
) -> list[Trial]:
    """Same-speaker pairs of recordings and a seeded sample of different-speaker pairs.

    Every target pair is used, or a seeded sample of ``max_target`` of them when there are more.
    Non-target pairs number ``nontarget_per_target`` times the targets, at most ``max_nontarget``
    (either may be None; with both None, every non-target pair is used), and each distinct pair
    is equally likely. The trials depend on the recordings and ``seed``, not on their order.
    Raises :class:`DataError` when no target or no non-target trial can be made.
    """
    ordered = sorted(recordings, key=lambda r: (r.speaker, r.utt_id))
    _check_unique(ordered)
    # Sorted by speaker, speaker k's recordings are ordered[starts[k]:starts[k] + sizes[k]].
    sizes = [len(list(group)) for _, group in groupby(ordered, key=lambda r: r.speaker)]
    starts = [0, *accumulate(sizes)][:-1]
    pairs_per_speaker = [n * (n - 1) // 2 for n in sizes]
    total_target = sum(pairs_per_speaker)
    total_nontarget = len(ordered) * (len(ordered) - 1) // 2 - total_target
    if total_target == 0:
        raise DataError("no speaker has two recordings, so there is no same-speaker trial; "
                        "add recordings or cut long ones into segments")
    if total_nontarget == 0:
        raise DataError("all recordings come from one speaker, so there is no different-speaker trial")

    rng = random.Random(seed)
    wanted = total_target if max_target is None else min(total_target, max_target)
    chosen = range(total_target) if wanted == total_target else sorted(rng.sample(range(total_target), wanted))
    offsets = [0, *accumulate(pairs_per_speaker)]
    targets = []
    for index in chosen:
        speaker = bisect.bisect_right(offsets, index) - 1
        first, second = _unrank_pair(index - offsets[speaker])
        targets.append((starts[speaker] + first, starts[speaker] + second))

    limits = [int(round(nontarget_per_target * wanted)) if nontarget_per_target is not None else None,
              max_nontarget]
    wanted_nontarget = min([total_nontarget] + [n for n in limits if n is not None])
    nontargets = _sample_nontargets(sizes, starts, total_nontarget, wanted_nontarget, rng)

    def trial(pair: tuple[int, int], target: bool) -> Trial:
        return Trial(ordered[pair[0]].utt_id, ordered[pair[1]].utt_id, target)

    return [trial(p, True) for p in targets] + [trial(p, False) for p in nontargets]


def read_trials(path: str | Path) -> list[Trial]:
    """Read a trial list (``enrol test target|nontarget|1|0`` per line; VoxCeleb's label-first too)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such trial list") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a trial list (the file is not UTF-8 text)") from None
    trials = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 3 and fields[2].lower() in _LABELS:
            enrol, test, label = fields
        elif len(fields) == 3 and fields[0] in ("0", "1"):
            label, enrol, test = fields
        else:
            raise DataError(f"{path}:{number}: expected {_FORMAT}, got {line.strip()[:120]!r}")
        trials.append(Trial(enrol, test, _LABELS[label.lower()]))
    if not trials:
        raise DataError(f"{path}: the trial list is empty")
    return trials


def write_trials(trials: Iterable[Trial], path: str | Path) -> Path:
    """Write ``enrol test target|nontarget`` lines, the form Kaldi and 3D-Speaker read."""
    path = Path(path)
    lines = []
    for trial in trials:
        for utt_id in (trial.enrol, trial.test):
            if not utt_id or any(c.isspace() for c in utt_id):
                raise DataError(f"utterance id {utt_id!r} is empty or holds whitespace; "
                                "a trial list cannot carry it")
        lines.append(f"{trial.enrol} {trial.test} {'target' if trial.target else 'nontarget'}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _check_unique(recordings: list[Recording]) -> None:
    seen: set[str] = set()
    for recording in recordings:
        if recording.utt_id in seen:
            raise DataError(f"utterance id {recording.utt_id} appears twice; trials need unique ids")
        seen.add(recording.utt_id)


def _unrank_pair(rank: int) -> tuple[int, int]:
    """The ``rank``-th pair ``(i, j)``, ``i < j``, in the order (0,1), (0,2), (1,2), (0,3), ..."""
    # rank = j(j-1)/2 + i with 0 <= i < j; integer sqrt keeps this exact for any size.
    second = (1 + math.isqrt(1 + 8 * rank)) // 2
    return rank - second * (second - 1) // 2, second


def _sample_nontargets(
    sizes: list[int], starts: list[int], total: int, wanted: int, rng: random.Random
) -> list[tuple[int, int]]:
    """``wanted`` distinct different-speaker pairs, each distinct pair equally likely."""
    count = sum(sizes)
    owner = [k for k, n in enumerate(sizes) for _ in range(n)]
    if 2 * wanted >= total:
        # Most pairs are wanted anyway, so list them all (at most twice ``wanted``) and sample.
        every = [(a, b) for a in range(count) for b in range(starts[owner[a]] + sizes[owner[a]], count)]
        return sorted(rng.sample(every, wanted))
    # Draw the first recording with weight (recordings of other speakers), then the second
    # uniformly among those: every ordered different-speaker pair then has the same chance.
    cumulative = list(accumulate(count - sizes[owner[a]] for a in range(count)))
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < wanted:
        a = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
        k = owner[a]
        b = rng.randrange(count - sizes[k])
        if b >= starts[k]:
            b += sizes[k]  # skip over the first recording's own speaker
        chosen.add((min(a, b), max(a, b)))
    return sorted(chosen)
