"""The training building blocks on their own, on real speech: crops and augmentation, the epoch
sampler, the AAM-softmax head, schedules and precision, and freezing by stage."""

from __future__ import annotations

import ast
import csv
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from spkft.core.audio import read_samples
from spkft.core.data import scan
from spkft.core.errors import DataError
from spkft.core.features import num_frames
from spkft.core.model import build_model
from spkft.core.records import Recording
from spkft.core.train import dataset as dataset_module
from spkft.core.train import runtime
from spkft.core.train.config import FREEZE_PRESETS, STAGES, AugmentConfig
from spkft.core.train.dataset import SPEEDS, CropDataset, EpochSampler
from spkft.core.train.freeze import hold_frozen_batchnorm, stage_of, summarise
from spkft.core.train.head import AAMSoftmaxHead
from spkft.core.train.runtime import autocast, lr_factor, pick_channels_last, pick_precision

RATE = 16000
# Three LibriSpeech speakers, one 14-16 s utterance each: long enough for many distinct crops.
LIBRI = ("103-1240-0000.flac", "1040-133433-0000.flac", "1069-133699-0000.flac")


# ---------------------------------------------------------------------------------- helpers
def scanned(folder: Path, rows: list[dict]) -> list[Recording]:
    """Recordings of a CSV list (utt_id, path, speaker, start, stop) written into ``folder``."""
    listing = folder / "list.csv"
    with listing.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["utt_id", "path", "speaker", "start", "stop"])
        writer.writeheader()
        writer.writerows(rows)
    report = scan(listing)
    assert not report.excluded, report.excluded
    return list(report.recordings)


def crops(recordings: list[Recording], seed: int = 0, **augment) -> CropDataset:
    speakers = sorted({r.speaker for r in recordings})
    return CropDataset(recordings, {s: i for i, s in enumerate(speakers)}, AugmentConfig(**augment), seed=seed)


def locate(crop: np.ndarray, audio: np.ndarray) -> int:
    """The sample offset at which ``crop`` occurs in ``audio`` exactly, or -1."""
    prefix = np.lib.stride_tricks.sliding_window_view(audio, 64)[: len(audio) - len(crop) + 1]
    for start in np.flatnonzero((prefix == crop[:64]).all(axis=1)):
        if np.array_equal(audio[start : start + len(crop)], crop):
            return int(start)
    return -1


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    return 10 * math.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean((noisy - clean).astype(np.float64) ** 2))


def rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))


@pytest.fixture(scope="module")
def libri(librispeech_dir, tmp_path_factory) -> list[Recording]:
    rows = [{"utt_id": name.split(".")[0], "path": librispeech_dir / name, "speaker": name.split("-")[0]}
            for name in LIBRI]
    return scanned(tmp_path_factory.mktemp("libri"), rows)


@pytest.fixture
def waveforms(monkeypatch):
    """Make CropDataset items carry the crop's samples instead of its fbank, to compare them exactly."""
    monkeypatch.setattr(dataset_module, "fbank", lambda wave, dither=0.0: wave.clone())


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(11)
    sf.write(folder / "white.wav", 0.1 * rng.standard_normal(5 * RATE).astype(np.float32), RATE, subtype="FLOAT")
    brown = np.cumsum(rng.standard_normal(3 * RATE))
    (folder / "street").mkdir()  # noise folders are searched recursively, MUSAN-style
    sf.write(folder / "street" / "brown.wav", (0.5 * brown / np.abs(brown).max()).astype(np.float32), RATE,
             subtype="FLOAT")
    return folder


@pytest.fixture(scope="module")
def rir_dir(tmp_path_factory) -> Path:
    """A synthetic room: a direct path followed by a 0.4 s exponentially decaying noise burst (RT60 ~0.4 s)."""
    folder = tmp_path_factory.mktemp("rir")
    rng = np.random.default_rng(5)
    t = np.arange(int(0.4 * RATE)) / RATE
    rir = 0.05 * rng.standard_normal(len(t)) * np.exp(-6.9 * t / 0.4)  # direct-to-reverberant ratio ~0 dB
    rir[0] = 1.0
    sf.write(folder / "room.wav", rir.astype(np.float32), RATE, subtype="FLOAT")
    return folder


# ------------------------------------------------------------------------ crops and features
def test_same_seed_epoch_and_index_give_identical_features(libri):
    dataset = crops(libri, seed=3, crop_seconds=2.0)
    features, label = dataset[1]
    again, again_label = dataset[1]
    fresh, _ = crops(libri, seed=3, crop_seconds=2.0)[1]
    assert torch.equal(features, again) and torch.equal(features, fresh)
    assert label == again_label == 1  # speakers sorted: 103, 1040, 1069
    assert not torch.equal(crops(libri, seed=4, crop_seconds=2.0)[1][0], features)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1][0], features)
    dataset.set_epoch(0)
    assert torch.equal(dataset[1][0], features)


def test_dither_is_reproducible_per_item(libri):
    plain = crops(libri, crop_seconds=1.0)[0][0]
    dithered = crops(libri, crop_seconds=1.0, dither=1.0)
    first = dithered[0][0]
    torch.manual_seed(123)  # the global generator's state must not matter
    assert torch.equal(dithered[0][0], first)
    assert not torch.equal(first, plain)


def test_different_epochs_cut_different_crops_from_the_recording(libri, waveforms):
    dataset = crops(libri, crop_seconds=2.0)
    audio = read_samples(libri[0].path)
    offsets = []
    for epoch in range(8):
        dataset.set_epoch(epoch)
        wave = dataset[0][0].numpy()
        offsets.append(locate(wave, audio))
    assert -1 not in offsets, "a crop is not an excerpt of its recording"
    assert len(set(offsets)) == len(offsets)


@pytest.mark.parametrize("crop_seconds, frames", [(0.5, 48), (2.0, 198), (3.1, 308)])
def test_crops_have_exactly_crop_seconds_of_frames(libri, fsdd_dir, tmp_path, crop_seconds, frames):
    # Kaldi fbank, 25 ms frames every 10 ms: 1 + (samples - 400) // 160 frames.
    assert num_frames(int(crop_seconds * RATE)) == frames
    short = scanned(tmp_path, [{"utt_id": "g0", "path": fsdd_dir / "0_george_0.wav", "speaker": "george"}])
    for recording in (libri[0], short[0]):  # 14 s at 16 kHz, and 0.3 s at 8 kHz (tiled)
        features, _ = crops([recording], crop_seconds=crop_seconds)[0]
        assert tuple(features.shape) == (frames, 80)
        assert torch.isfinite(features).all()


def test_short_recordings_are_tiled(fsdd_dir, tmp_path, waveforms):
    path = fsdd_dir / "0_george_0.wav"  # 0.298 s at 8 kHz
    recordings = scanned(tmp_path, [{"utt_id": "g0", "path": path, "speaker": "george"}])
    wave = crops(recordings, crop_seconds=1.0)[0][0].numpy()
    whole = read_samples(path)  # resampled to 16 kHz
    assert len(wave) == RATE and len(whole) < RATE / 3
    assert np.array_equal(wave, np.tile(whole, 4)[:RATE])


def test_a_crop_never_reads_outside_its_segment(librispeech_dir, tmp_path, waveforms):
    # Speech from 1.5 s to 4.5 s of a file that is digital silence elsewhere; two segments of it.
    speech = read_samples(librispeech_dir / LIBRI[0])[RATE : 4 * RATE]
    audio = np.concatenate([np.zeros(int(1.5 * RATE)), speech, np.zeros(int(1.5 * RATE))]).astype(np.float32)
    path = tmp_path / "padded.wav"
    sf.write(path, audio, RATE, subtype="FLOAT")
    recordings = scanned(tmp_path, [
        {"utt_id": "long", "path": path, "speaker": "a", "start": 1.5, "stop": 4.5},
        {"utt_id": "short", "path": path, "speaker": "b", "start": 2.0, "stop": 2.5},
    ])
    dataset = crops(recordings, crop_seconds=1.0)
    offsets = set()
    for epoch in range(20):
        dataset.set_epoch(epoch)
        offset = locate(dataset[0][0].numpy(), audio)
        assert int(1.5 * RATE) <= offset <= int(4.5 * RATE) - RATE, f"epoch {epoch}: crop at sample {offset}"
        offsets.add(offset)
        # A segment shorter than the crop is tiled from exactly its own samples.
        short = dataset[1][0].numpy()
        assert np.array_equal(short, np.tile(audio[2 * RATE : int(2.5 * RATE)], 2))
    assert len(offsets) > 15  # the crops really move about inside the segment


# ------------------------------------------------------------------------ speed perturbation
def test_speed_perturbation_triples_the_classes_and_offsets_labels(libri, monkeypatch):
    assert crops(libri).num_classes == 3
    dataset = crops(libri, crop_seconds=1.0, speed_perturb=True)
    assert dataset.num_classes == 9
    speeds = []
    read = dataset._crop
    monkeypatch.setattr(dataset, "_crop", lambda index, rng, speed: speeds.append(speed) or read(index, rng, speed))
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index, recording in enumerate(libri):
            features, label = dataset[index]
            assert tuple(features.shape) == (98, 80)
            assert label == dataset.labels[recording.speaker] + SPEEDS.index(speeds[-1]) * 3
    assert set(speeds) == set(SPEEDS)


def test_speed_perturbation_changes_pitch_by_the_speed(tmp_path, waveforms):
    t = np.arange(4 * RATE) / RATE
    sf.write(tmp_path / "tone.wav", (0.3 * np.sin(2 * np.pi * 500 * t)).astype(np.float32), RATE, subtype="FLOAT")
    recordings = scanned(tmp_path, [{"utt_id": "tone", "path": tmp_path / "tone.wav", "speaker": "s"}])
    dataset = crops(recordings, crop_seconds=1.0, speed_perturb=True)
    seen = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        wave, label = dataset[0]
        speed = SPEEDS[label]  # one speaker: the label is the speed's index
        spectrum = np.abs(np.fft.rfft(wave.numpy() * np.hanning(len(wave))))
        peak_hz = np.argmax(spectrum) * RATE / len(wave)
        assert peak_hz == pytest.approx(500 * speed, abs=1.5), f"speed {speed}"
        seen.add(speed)
    assert seen == set(SPEEDS)


# ------------------------------------------------------------------------ noise and reverberation
def test_noise_is_mixed_at_the_drawn_snr(libri, noise_dir):
    clean = read_samples(libri[0].path)[RATE : 3 * RATE]
    for target in (0.0, 5.0, 12.5):
        dataset = crops(libri, noise_dir=noise_dir, noise_snr_db=(target, target))
        assert [p.name for p in dataset.noise_files] == ["brown.wav", "white.wav"]
        noisy = dataset._add_noise(clean, np.random.default_rng(7))
        assert noisy.shape == clean.shape and noisy.dtype == np.float32
        assert snr_db(clean, noisy) == pytest.approx(target, abs=0.05)
    ranged = crops(libri, noise_dir=noise_dir, noise_snr_db=(0.0, 15.0))
    measured = [snr_db(clean, ranged._add_noise(clean, np.random.default_rng(seed))) for seed in range(20)]
    assert all(-0.05 < value < 15.05 for value in measured)
    assert max(measured) - min(measured) > 7  # drawn across the range, not fixed


def test_noise_prob_one_noises_the_same_crop_and_zero_leaves_it_clean(libri, noise_dir, waveforms):
    clean = crops(libri, crop_seconds=2.0)
    always = crops(libri, crop_seconds=2.0, noise_dir=noise_dir, noise_prob=1.0, noise_snr_db=(10.0, 10.0))
    never = crops(libri, crop_seconds=2.0, noise_dir=noise_dir, noise_prob=0.0)
    for index in range(len(libri)):
        dry = clean[index][0].numpy()
        assert snr_db(dry, always[index][0].numpy()) == pytest.approx(10.0, abs=0.05)
        assert np.array_equal(never[index][0].numpy(), dry)


def test_reverberation_keeps_the_crop_level(libri, rir_dir, waveforms):
    dataset = crops(libri, crop_seconds=2.0, rir_dir=rir_dir, rir_prob=1.0)
    dry = read_samples(libri[1].path)[2 * RATE : 4 * RATE]
    wet = dataset._reverberate(dry, np.random.default_rng(0))
    assert wet.shape == dry.shape and wet.dtype == np.float32
    assert rms(wet) == pytest.approx(rms(dry), rel=1e-3)
    assert 0.3 < np.corrcoef(dry, wet)[0, 1] < 0.95  # the same speech, audibly reverberant
    clean = crops(libri, crop_seconds=2.0)
    for index in range(len(libri)):
        reverberant, label = dataset[index]
        dry_crop, dry_label = clean[index]
        assert label == dry_label
        assert rms(reverberant.numpy()) == pytest.approx(rms(dry_crop.numpy()), rel=1e-3)
        assert not torch.allclose(reverberant, dry_crop, atol=1e-3)


# ------------------------------------------------------------------------ files gone after the scan
def test_a_vanished_file_is_replaced_by_its_speakers_other_recording(fsdd_dir, tmp_path, waveforms):
    names = ["0_george_0.wav", "1_george_0.wav", "2_george_0.wav", "0_jackson_0.wav", "1_jackson_0.wav"]
    for name in names:
        shutil.copy(fsdd_dir / name, tmp_path / name)
    rows = [{"utt_id": n[:-4], "path": tmp_path / n, "speaker": n.split("_")[1]} for n in names]
    recordings = scanned(tmp_path, rows)
    dataset = crops(recordings, crop_seconds=1.0)
    others = [read_samples(tmp_path / n) for n in names[1:3]]
    (tmp_path / names[0]).unlink()
    for epoch in range(5):
        dataset.set_epoch(epoch)
        wave, label = dataset[0]
        assert label == dataset.labels["george"]
        # Every fsdd utterance is shorter than the crop: the crop is another george file, tiled.
        assert any(np.array_equal(wave.numpy()[: len(o)], o) for o in others)
    (tmp_path / names[3]).unlink()
    (tmp_path / names[4]).unlink()
    with pytest.raises(DataError, match="0_jackson_0.wav: unreadable"):
        dataset[3]


# ------------------------------------------------------------------------ epoch sampler
def test_sampler_is_deterministic_per_seed_and_epoch():
    sampler = EpochSampler(10, 10, seed=1)
    order = list(sampler)
    assert len(sampler) == 10 and sorted(order) == list(range(10))
    assert list(EpochSampler(10, 10, seed=1)) == order
    assert list(EpochSampler(10, 10, seed=2)) != order
    sampler.set_epoch(1)
    assert list(sampler) != order
    sampler.set_epoch(0)
    assert list(sampler) == order


def test_ranks_are_disjoint_and_together_make_the_epoch():
    whole = list(EpochSampler(12, 12, seed=5))
    ranks = []
    for rank in range(3):
        sampler = EpochSampler(12, 4, seed=5, rank=rank, world=3)
        sampler.set_epoch(0)
        ranks.append(list(sampler))
    assert [len(r) for r in ranks] == [4, 4, 4]
    assert sum(len(set(r)) for r in ranks) == len(set().union(*ranks)) == 12  # disjoint, and every item once
    assert [ranks[i % 3][i // 3] for i in range(12)] == whole  # interleaved, they are the one-process order


def test_an_epoch_longer_than_the_data_repeats_permutations():
    order = list(EpochSampler(5, 12, seed=0))
    assert len(order) == 12
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5))
    assert len(set(order[10:])) == 2
    assert sorted(Counter(order).values()) == [2, 2, 2, 3, 3]
    two = [list(EpochSampler(7, 5, seed=0, rank=r, world=2)) for r in range(2)]
    interleaved = [two[i % 2][i // 2] for i in range(10)]
    assert sorted(interleaved[:7]) == list(range(7)) and len(set(interleaved[7:])) == 3


# ------------------------------------------------------------------------ AAM-softmax head
def two_class_head(margin: float, scale: float = 32.0) -> AAMSoftmaxHead:
    """A head whose class centres are the two unit axes, so an embedding's angles are known."""
    head = AAMSoftmaxHead(2, 2, scale=scale, margin=margin)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    return head


def target_logit(head: AAMSoftmaxHead, theta: float) -> float:
    """The target (class 0) logit for an embedding at ``theta`` from centre 0, read back from the loss.

    With two classes the loss is log(1 + exp(l1 - l0)), and l1 = s * sin(theta) carries no margin.
    """
    embedding = torch.tensor([[math.cos(theta), math.sin(theta)]])
    loss, cos = head(embedding, torch.tensor([0]))
    assert cos[0, 1].item() == pytest.approx(math.sin(theta), abs=1e-6)
    return head.scale * math.sin(theta) - math.log(math.expm1(loss.item()))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_loss_and_gradients_stay_finite_at_cosine_plus_and_minus_one(precision):
    torch.manual_seed(0)
    head = AAMSoftmaxHead(16, 4, margin=0.2)
    centres = head.weight.detach()
    # Exactly on class 0's centre (cos = 1) and exactly opposite class 1's (cos = -1).
    embeddings = torch.stack([3 * centres[0], -centres[1]]).requires_grad_()
    with autocast(torch.device("cpu"), precision):
        loss, cos = head(embeddings, torch.tensor([0, 1]))
    assert cos.dtype == torch.float32
    assert 1 - 1e-5 < cos[0, 0].item() < 1 and -1 < cos[1, 1].item() < -1 + 1e-5
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(head.weight.grad).all()


def test_without_margin_the_logits_are_the_scaled_cosines():
    torch.manual_seed(1)
    head = AAMSoftmaxHead(16, 5, scale=30.0, margin=0.0)
    embeddings, labels = torch.randn(8, 16), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    loss, cos = head(embeddings, labels)
    expected = F.cosine_similarity(embeddings[:, None, :], head.weight.detach()[None, :, :], dim=2)
    assert torch.allclose(cos, expected, atol=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(30.0 * expected, labels).item(), rel=1e-5)


def test_the_margin_lowers_the_target_logit_by_the_hand_computed_amount():
    theta = math.pi / 3
    # No margin: s * cos 60 deg = 32 * 0.5 = 16.
    assert target_logit(two_class_head(0.0), theta) == pytest.approx(16.0, abs=1e-4)
    # m = 0.2: s * cos(60 deg + 0.2) = 32 * (0.5 cos 0.2 - (sqrt 3 / 2) sin 0.2) = 32 * 0.3179806 = 10.175379.
    assert target_logit(two_class_head(0.2), theta) == pytest.approx(10.175379, abs=1e-4)
    # Past pi - m, cos(theta + m) would rise again; it continues as cos(theta) - m sin(m) instead:
    # 32 * (cos(pi - 0.1) - 0.2 sin 0.2) = 32 * (-0.9950042 - 0.0397339) = -33.111617 (not -31.840).
    assert target_logit(two_class_head(0.2), math.pi - 0.1) == pytest.approx(-33.111617, abs=1e-3)


def test_label_smoothing_changes_the_loss():
    torch.manual_seed(2)
    plain = AAMSoftmaxHead(16, 4, margin=0.2)
    smooth = AAMSoftmaxHead(16, 4, margin=0.2, label_smoothing=0.1)
    smooth.load_state_dict(plain.state_dict())
    labels = torch.tensor([0, 1, 2, 3])
    on_centre = plain.weight.detach()[labels]  # confidently right: smoothing can only cost
    assert smooth(on_centre, labels)[0].item() > plain(on_centre, labels)[0].item() + 0.1
    random = torch.randn(4, 16)
    assert smooth(random, labels)[0].item() != pytest.approx(plain(random, labels)[0].item(), abs=1e-3)


# ------------------------------------------------------------------------ schedules and precision
def test_warmup_is_linear_and_reaches_one_at_its_end():
    factors = [lr_factor(step, 20, 4, "cosine", 0.01) for step in range(5)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert [lr_factor(step, 20, 4, "constant", 0.01) for step in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(0, 20, 0, "cosine", 0.01) == 1.0


def test_cosine_ends_at_the_floor_and_constant_stays_at_one():
    factors = [lr_factor(step, 100, 10, "cosine", 0.05) for step in range(10, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    assert factors[0] == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.05) == pytest.approx(0.05 + 0.95 * 0.5)  # half way: mean of 1 and floor
    assert lr_factor(100, 100, 10, "cosine", 0.05) == pytest.approx(0.05)
    assert lr_factor(130, 100, 10, "cosine", 0.05) == pytest.approx(0.05)
    assert all(lr_factor(step, 100, 10, "constant", 0.05) == 1.0 for step in range(9, 130))


def test_explicit_precisions_are_kept(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: pytest.fail("an explicit choice must not probe the CPU"))
    for name in ("fp32", "bf16", "fp16"):
        assert pick_precision(name, torch.device("cpu")) == name
    assert pick_precision("fp32", torch.device("cuda")) == "fp32"


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    assert pick_precision("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda_prefers_bf16(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert pick_precision("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize("setting, device, m_channels, expected", [
    ("auto", "cpu", 8, False), ("auto", "cpu", 32, False), ("auto", "cpu", 64, True), ("auto", "cuda", 8, True),
    (True, "cpu", 8, True), (False, "cuda", 64, False),
])
def test_channels_last_auto_by_device_and_width(setting, device, m_channels, expected):
    assert pick_channels_last(setting, torch.device(device), m_channels) is expected


def test_autocast_lowers_matmuls_only_below_fp32():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (a @ b).dtype == torch.float32


# ------------------------------------------------------------------------ freezing by stage
@pytest.fixture(scope="module")
def upstream_keys(reference_dir) -> dict[str, tuple[int, ...]]:
    """Upstream ERes2NetV2_w24s4ep4's state_dict keys and shapes."""
    rows = (line.split("\t") for line in (reference_dir / "eres2netv2_w24s4ep4.keys.tsv").read_text().splitlines())
    return {row[0]: ast.literal_eval(row[1]) for row in rows}


def test_every_upstream_key_belongs_to_its_stage(upstream_keys):
    stages = {key: stage_of(key) for key in upstream_keys}
    assert set(stages.values()) == set(STAGES)
    for key, stage in stages.items():
        top = key.split(".", 1)[0]
        assert stage == ("stem" if top in ("conv1", "bn1") else top), key
    assert Counter(stages.values()) == {"stem": 6, "layer1": 114, "layer2": 150, "layer3": 474, "layer4": 240,
                                        "layer3_ds": 1, "fuse34": 14, "seg_1": 2}
    for stranger in ("classifier.weight", "conv10.weight", "layer5.0.conv1.weight", "head.weight"):
        with pytest.raises(ValueError, match="no known ERes2NetV2 stage"):
            stage_of(stranger)


def test_summary_counts_add_up_to_the_models_parameters(upstream_keys):
    with torch.device("meta"):  # the 53.5 M-parameter shapes without allocating or initialising them
        model = build_model("eres2netv2_w24s4ep4")
    parameters = dict(model.named_parameters())
    per_stage = Counter()
    for key, shape in upstream_keys.items():
        if key in parameters:  # running statistics are buffers, not parameters
            per_stage[stage_of(key)] += math.prod(shape)
    summary = summarise(model, FREEZE_PRESETS["early"])
    assert {stage: count for stage, (count, _) in summary.stages.items()} == per_stage
    assert summary.trainable + summary.frozen == sum(p.numel() for p in parameters.values()) == 53_513_632
    assert summary.frozen == per_stage["stem"] + per_stage["layer1"] + per_stage["layer2"]
    assert [stage for stage, (_, frozen) in summary.stages.items() if frozen] == ["stem", "layer1", "layer2"]
    assert summary.lines()[-1].split()[1] == "53,513,632"


@pytest.mark.parametrize("frozen", [("stem", "layer2", "fuse34"), *FREEZE_PRESETS.values()],
                         ids=["listed", *FREEZE_PRESETS])
def test_only_the_frozen_stages_batchnorm_is_held_in_eval_mode(frozen):
    model = build_model("eres2netv2", m_channels=8, num_blocks=[1, 1, 1, 1])
    model.train()
    hold_frozen_batchnorm(model, frozen)
    held = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            assert module.training == (stage_of(name + ".") not in frozen), name
            if not module.training:
                held.add(stage_of(name + "."))
        else:
            assert module.training, f"{name or 'the model'} left training mode"
    assert held == set(frozen) - {"layer3_ds", "seg_1"}  # the only stages without BatchNorm
