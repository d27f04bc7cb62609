"""Training input: seeded random crops of labelled recordings, augmented, as fbank features.

Every random choice for item ``i`` of epoch ``e`` comes from a generator seeded with
``(seed, e, i)``, so a run is reproducible whatever the number of loader workers, and a resumed
run sees exactly the crops the uninterrupted one would have seen.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch.utils.data import Dataset, Sampler

from spkft.core.audio import read_samples
from spkft.core.data.sources import audio_files
from spkft.core.errors import DataError
from spkft.core.features import SAMPLE_RATE, fbank
from spkft.core.records import Recording
from spkft.core.train.config import AugmentConfig

# Speed perturbation as upstream: each non-unit speed makes a new set of classes.
SPEEDS = (1.0, 0.9, 1.1)


def _augmentation_files(folder: Path) -> list[Path]:
    files = audio_files(Path(folder))
    if not files:
        raise DataError(f"{folder}: no audio files (wav, flac, ogg, mp3, opus) found")
    return files


def _random_segment(path: Path, samples: int, rng: np.random.Generator) -> np.ndarray:
    """A random stretch of ``samples`` at 16 kHz from an auxiliary file, tiled if it is shorter."""
    info = sf.info(str(path))
    need = samples / SAMPLE_RATE
    start = rng.uniform(0.0, max(0.0, info.duration - need))
    return _fit(read_samples(path, start, start + need), samples)


def _fit(wave: np.ndarray, samples: int) -> np.ndarray:
    """Repeat a short waveform (as upstream pads crops) or cut a long one to exactly ``samples``."""
    if len(wave) == 0:
        return np.zeros(samples, dtype=np.float32)
    if len(wave) < samples:
        wave = np.tile(wave, math.ceil(samples / len(wave)))
    return wave[:samples]


class CropDataset(Dataset):
    """Item ``i`` is a random crop of recording ``i`` as ``(features [frames, 80], label)``."""

    def __init__(self, recordings: list[Recording], labels: dict[str, int], augment: AugmentConfig,
                 seed: int = 0) -> None:
        self.recordings = recordings
        self.labels = labels
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.crop_samples = int(augment.crop_seconds * SAMPLE_RATE)
        self.noise_files = _augmentation_files(augment.noise_dir) if augment.noise_dir else []
        self.rir_files = _augmentation_files(augment.rir_dir) if augment.rir_dir else []
        self.speeds = SPEEDS if augment.speed_perturb else (1.0,)
        self.by_speaker: dict[str, list[int]] = {}
        for index, recording in enumerate(recordings):
            self.by_speaker.setdefault(recording.speaker, []).append(index)

    @property
    def num_classes(self) -> int:
        return len(self.labels) * len(self.speeds)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.recordings)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        speed_index = int(rng.integers(len(self.speeds)))
        wave = self._crop(index, rng, self.speeds[speed_index])
        if self.noise_files and rng.random() < self.augment.noise_prob:
            wave = self._add_noise(wave, rng)
        if self.rir_files and rng.random() < self.augment.rir_prob:
            wave = self._reverberate(wave, rng)
        if self.augment.dither > 0:
            torch.manual_seed(int(rng.integers(2**31)))  # kaldi dither draws from torch's global generator
        features = fbank(torch.from_numpy(wave), dither=self.augment.dither)
        label = self.labels[self.recordings[index].speaker] + speed_index * len(self.labels)
        return features, label

    def _crop(self, index: int, rng: np.random.Generator, speed: float) -> np.ndarray:
        # A file that vanished or broke after the scan is replaced by another of the same speaker.
        candidates = [index] + list(rng.permutation(self.by_speaker[self.recordings[index].speaker]))
        for candidate in candidates[:4]:
            try:
                return self._read_crop(self.recordings[candidate], rng, speed)
            except (sf.LibsndfileError, OSError, RuntimeError):
                continue
        raise DataError(f"{self.recordings[index].path}: unreadable, and so are the other recordings tried for its speaker")

    def _read_crop(self, recording: Recording, rng: np.random.Generator, speed: float) -> np.ndarray:
        # Speed s plays the audio s times faster: read s * crop seconds, then resample to length.
        need = self.augment.crop_seconds * speed
        start, stop = recording.start_seconds, recording.stop_seconds
        if stop is None:
            stop = start + (recording.duration_seconds or sf.info(str(recording.path)).duration)
        offset = rng.uniform(0.0, max(0.0, (stop - start) - need))
        wave = read_samples(recording.path, start + offset, min(stop, start + offset + need))
        if speed != 1.0:
            wave = AF.resample(torch.from_numpy(wave), int(SAMPLE_RATE * speed), SAMPLE_RATE).numpy()
        return _fit(wave, self.crop_samples).astype(np.float32)

    def _add_noise(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noise = _random_segment(self.noise_files[rng.integers(len(self.noise_files))], len(wave), rng)
        snr_db = rng.uniform(*self.augment.noise_snr_db)
        speech_power = float(np.mean(wave**2)) + 1e-10
        noise_power = float(np.mean(noise**2)) + 1e-10
        gain = math.sqrt(speech_power / (noise_power * 10 ** (snr_db / 10)))
        return (wave + gain * noise).astype(np.float32)

    def _reverberate(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        rir = read_samples(self.rir_files[rng.integers(len(self.rir_files))])
        rir = rir / (np.sqrt(np.sum(rir**2)) + 1e-10)
        wet = AF.fftconvolve(torch.from_numpy(wave), torch.from_numpy(rir.astype(np.float32))).numpy()[: len(wave)]
        # Keep the crop's level: reverberation should change its colour, not its loudness.
        scale = math.sqrt((float(np.mean(wave**2)) + 1e-10) / (float(np.mean(wet**2)) + 1e-10))
        return (wet * scale).astype(np.float32)


class EpochSampler(Sampler[int]):
    """Seeded per-epoch order of ``num_items`` indices, ``per_rank`` of them for this rank.

    Successive permutations are concatenated when an epoch wants more samples than there are
    recordings; each rank takes every ``world``-th index, so ranks never share a crop.
    """

    def __init__(self, num_items: int, per_rank: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.num_items, self.per_rank, self.seed = num_items, per_rank, seed
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, 7919])
        total = self.per_rank * self.world
        order = np.concatenate([rng.permutation(self.num_items) for _ in range(math.ceil(total / self.num_items))])
        return iter(order[:total][self.rank :: self.world].tolist())


class MixedEpochSampler(Sampler[int]):
    """Batches in which a fixed share of the crops comes from a second pool of items (rehearsal).

    Items ``[0, num_items)`` are the user's recordings and ``[num_items, num_items + num_extra)``
    the rehearsed ones. Each batch of ``batch_size`` holds exactly ``round(fraction * batch_size)``
    rehearsed items (at least one, and at least one of the user's), at seeded random places; each
    pool is walked through seeded permutations, epoch after epoch. Whole batches are dealt to the
    ranks in turn, so every rank's batches keep the share.
    """

    def __init__(self, num_items: int, num_extra: int, fraction: float, batch_size: int, batches_per_rank: int,
                 seed: int, rank: int = 0, world: int = 1) -> None:
        if num_items < 1 or num_extra < 1:
            raise ValueError("both pools need at least one item")
        self.num_items, self.num_extra = num_items, num_extra
        self.batch_size, self.batches_per_rank = batch_size, batches_per_rank
        self.extra_per_batch = self.rehearsed_per_batch(fraction, batch_size)
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch = 0

    @staticmethod
    def rehearsed_per_batch(fraction: float, batch_size: int) -> int:
        """How many of a batch's ``batch_size`` crops are rehearsed at ``fraction``."""
        if batch_size < 2:
            raise ValueError("rehearsal needs batches of at least 2 crops: one of each pool")
        return min(batch_size - 1, max(1, round(fraction * batch_size)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, 104729])
        batches = self.batches_per_rank * self.world
        extra = self.extra_per_batch
        own = self.batch_size - extra
        ours = _permutations(rng, self.num_items, batches * own)
        theirs = _permutations(rng, self.num_extra, batches * extra) + self.num_items
        order: list[int] = []
        for b in range(batches):
            batch = np.concatenate([ours[b * own:(b + 1) * own], theirs[b * extra:(b + 1) * extra]])
            if b % self.world == self.rank:
                order.extend(rng.permutation(batch).tolist())
            else:
                rng.permutation(batch)  # the same draws on every rank, whichever batches it keeps
        return iter(order)


def _permutations(rng: np.random.Generator, n: int, total: int) -> np.ndarray:
    """``total`` indices below ``n``: seeded permutations of ``range(n)``, one after another."""
    return np.concatenate([rng.permutation(n) for _ in range(math.ceil(total / n))])[:total]
