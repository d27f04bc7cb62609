"""Small audio files and data lists shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000, channels: int = 1,
              frequency: float = 220.0, fmt: str | None = None) -> Path:
    """A tone of ``seconds`` at ``rate`` Hz with ``channels`` channels (WAV unless ``fmt``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(seconds * rate))) / rate
    tone = 0.3 * np.sin(2 * np.pi * frequency * t).astype(np.float32)
    data = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    sf.write(path, data, rate, format=fmt)
    return path


def write_closed_set(fsdd_dir: Path, root: Path, train_takes: int, val_takes: tuple[int, ...],
                     val_digits: int) -> tuple[Path, Path]:
    """CSV lists of real 8 kHz speech: training and validation utterances of the same 6 speakers.

    Training gets takes ``0 .. train_takes-1`` of every digit; validation gets ``val_takes`` of
    digits below ``val_digits``, so the two never share a recording.
    """
    train, val = ["path,speaker"], ["path,speaker"]
    for path in sorted(fsdd_dir.glob("*.wav")):
        digit, speaker, take = path.stem.split("_")
        if int(take) < train_takes:
            train.append(f"{path},{speaker}")
        elif int(take) in val_takes and int(digit) < val_digits:
            val.append(f"{path},{speaker}")
    (root / "train.csv").write_text("\n".join(train) + "\n")
    (root / "val.csv").write_text("\n".join(val) + "\n")
    return root / "train.csv", root / "val.csv"


def write_fsdd_list(path: Path, fsdd_dir: Path, speakers, digits, takes) -> Path:
    """A CSV list (path, speaker) of the spoken-digit recordings of these speakers, digits and takes."""
    rows = [f"{fsdd_dir / f'{d}_{s}_{t}.wav'},{s}" for s in speakers for d in digits for t in takes]
    path.write_text("path,speaker\n" + "\n".join(rows) + "\n")
    return path
