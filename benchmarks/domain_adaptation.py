"""Domain adaptation, measured: a pretrained model fine-tuned on a new domain, tested on speakers it never saw.

The case spkft is for: a model pretrained on one domain, a user's recordings from another, and the
question whether fine-tuning makes it a better verifier there without making it worse where it
came from. No released weights can be downloaded here, so the benchmark makes its own base:

- **Base model**: a narrow ERes2NetV2 (m_channels 8) trained by ``spkft train`` on the shared
  LibriSpeech subset (English read speech, 16 kHz), with 20 speakers held out for validation and
  30 as the base domain's test set (2 s segments of their recordings, every trial). It is cached
  under ``benchmarks/.cache/domain_adaptation/`` (ignored by git); ``--rebuild-base`` retrains it.
- **New domain**: EmoDB (German, acted emotions, 22.05 kHz). A seeded split puts 4 speakers in
  the test set (every trial among their recordings) and gives the other 6 to fine-tuning, which
  holds 2 of them out for its own validation as ``spkft train`` does by default.

One table, every row tested on the same target-domain trials and base-domain trials:
  (a) the base as is;
  (b) the base fine-tuned with each recipe (``spkft train --init BASE --recipe NAME``), and
      the recipe ``auto`` picks for this data;
  (c) a fresh network trained on the target speakers alone with the same number of steps;
  (d) the base with a backend adaptation (``spkft adapt``, method auto) fitted on the 6
      fine-tuning speakers' recordings, no retraining;
  (e) the best of (b) with the same adaptation fitted to it;
  plus checkpoint averaging: the best recipe's run with its last epochs averaged against its best
  epoch alone.
EER comes with a 95 % interval from a bootstrap over test recordings (trials between resampled
recordings), so the reader can see what is noise. The base-domain column shows what the row's
model (with its adaptation, where it has one) does on the pretraining domain: what was forgotten.

    python benchmarks/domain_adaptation.py [--rebuild-base] [--seed 0] [--threads 2] [--bootstrap 200]

On the 2-core CPU the base took 26 minutes (while other jobs shared it) and the rest 13; with
the base cached, a run is the 13.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LIBRISPEECH = DATA / "librispeech-train-clean-100-251spk" / "manifest.csv"
EMODB = DATA / "emodb-10spk" / "manifest.csv"
CACHE = ROOT / "benchmarks" / ".cache" / "domain_adaptation"

BASE_VAL_SPEAKERS, BASE_TEST_SPEAKERS = 20, 30
TARGET_TEST_SPEAKERS = 4
SEGMENT_SECONDS = 2.0
# The base: README's LibriSpeech recipe for a narrow network, shortened to fit the benchmark.
BASE_CONFIG = {
    "data.val_speakers": BASE_VAL_SPEAKERS, "data.test_speakers": BASE_TEST_SPEAKERS,
    "data.segment_seconds": SEGMENT_SECONDS,
    "model.variant": "eres2netv2", "model.args": {"m_channels": 8},
    "freeze.stages": "none", "augment.crop_seconds": 2.0,
    "head.margin": 0.2, "head.margin_warmup_epochs": 4,
    "optim.optimizer": "adamw", "optim.lr": 0.002, "optim.weight_decay": 1e-4, "optim.warmup_epochs": 0.5,
    "run.epochs": 12, "run.batch_size": 32, "run.steps_per_epoch": 60, "run.patience": None,
}
RECIPE_NAMES = ("linear-probe", "partial", "full")
AVERAGE_LAST = 3
# Targets of the case (README states whether they are met).
TARGET_RELATIVE_GAIN = 0.30  # target-domain EER of the best recipe at least 30 % below the base's
MAX_FORGETTING = 0.10  # base-domain EER at most 10 % above the base's


@dataclass
class Row:
    label: str
    target_eer: float
    target_interval: tuple[float, float]
    target_min_dcf: float
    base_eer: float
    seconds: float
    note: str = ""


# ------------------------------------------------------------------------------------------ data
def emodb_at_16k() -> Path:
    """EmoDB resampled once to 16 kHz WAV in the cache, as every read of it would be: the
    trainer reads each clip again for every crop, and resampling 22.05 kHz costs more than the
    narrow network's step."""
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    folder = CACHE / "emodb-16k"
    manifest = folder / "manifest.csv"
    if manifest.is_file():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    lines = EMODB.read_text().splitlines()
    for line in lines[1:]:
        name = line.split(",")[0]
        samples, rate = sf.read(EMODB.parent / name, dtype="float32")
        sf.write(folder / name, AF.resample(torch.from_numpy(samples), rate, 16000).numpy(), 16000, subtype="PCM_16")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def target_split(seed: int):
    """EmoDB's recordings, split by speaker: (fine-tuning recordings, test recordings)."""
    from spkft.core.data import scan

    report = scan(emodb_at_16k())
    speakers = list(report.speakers)
    random.Random(seed).shuffle(speakers)
    test = set(speakers[:TARGET_TEST_SPEAKERS])
    train = [r for r in report.recordings if r.speaker not in test]
    return train, [r for r in report.recordings if r.speaker in test]


def base_test_recordings(seed: int):
    """The base domain's test set: the 30 LibriSpeech speakers the base never saw, as 2 s segments."""
    from spkft.core.data import scan, segment, split_speakers

    split = split_speakers(scan(LIBRISPEECH).recordings, val=BASE_VAL_SPEAKERS, test=BASE_TEST_SPEAKERS, seed=seed)
    return segment(split.test, SEGMENT_SECONDS)


def write_manifest(recordings, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("path,speaker\n" + "".join(f"{r.path},{r.speaker}\n" for r in recordings))
    return path


# ------------------------------------------------------------------------------------- scoring
def embed_all(embedder, recordings) -> np.ndarray:
    """The embeddings ``[recordings, dim]`` of ``recordings``, in their order."""
    from spkft.core.evaluate import embed_recordings

    vectors = embed_recordings(embedder, recordings)
    return np.stack([vectors[r.utt_id] for r in recordings])


class TestSet:
    """Recordings whose every pair is a trial; EER and minDCF, with a bootstrap interval."""

    def __init__(self, recordings) -> None:
        self.recordings = list(recordings)
        speakers = [r.speaker for r in self.recordings]
        self.same = np.equal.outer(speakers, speakers)
        self.upper = np.triu_indices(len(self.recordings), k=1)

    def measure(self, embeddings: np.ndarray, bootstrap: int, seed: int) -> tuple[float, tuple[float, float], float]:
        from spkft.core.metrics import compute_metrics, eer

        scores = embeddings @ embeddings.T
        metrics = compute_metrics(scores[self.upper], self.same[self.upper])
        rng = np.random.default_rng(seed)
        resampled = []
        n = len(self.recordings)
        i, j = self.upper
        for _ in range(bootstrap):
            pick = np.sort(rng.integers(0, n, n))
            keep = pick[i] != pick[j]  # a recording drawn twice is not a trial with itself
            a, b = pick[i][keep], pick[j][keep]
            labels = self.same[a, b]
            if labels.all() or not labels.any():
                continue
            resampled.append(eer(scores[a, b], labels)[0])
        low, high = np.percentile(resampled, [2.5, 97.5]) if resampled else (np.nan, np.nan)
        return metrics.eer, (float(low), float(high)), metrics.min_dcf


# ----------------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class Run:
    """A finished training run: its directory, how many steps it took, and its best epoch."""

    path: Path
    steps: int
    epochs: int
    best_epoch: int


def train(overrides: dict, output_dir: Path, log) -> Run:
    """One ``spkft train`` run through the library, its progress logged a line per epoch."""
    from spkft.core.train import EpochEnded, RunFinished, RunStarted, StepEnded, Trainer, Validated, load_config

    if output_dir.exists():
        shutil.rmtree(output_dir)
    seen = {"steps": 0, "epochs": 0}

    def sink(event) -> None:
        if isinstance(event, RunStarted) and event.recipe:
            log(f"  {event.recipe}")
        elif isinstance(event, Validated):
            log(f"  start: val EER {event.val_eer:.2%}")
        elif isinstance(event, StepEnded):
            seen["steps"] = event.global_step
        elif isinstance(event, EpochEnded):
            seen["epochs"] = event.epoch
            log(f"  epoch {event.epoch}/{event.epochs}: val EER {event.val_eer:.2%}{' *' if event.is_best else ''}")
        elif isinstance(event, RunFinished):
            log(f"  {event.reason}: best epoch {event.best_epoch}, val EER {event.best_eer:.2%}")

    finished = Trainer(load_config(None, overrides | {"run.output_dir": str(output_dir)}), sink=sink).run()
    return Run(output_dir, seen["steps"], seen["epochs"], finished.best_epoch)


def build_base(seed: int, rebuild: bool, log) -> Path:
    base_dir = CACHE / "base"
    settings = json.dumps(BASE_CONFIG | {"seed": seed}, sort_keys=True)
    stamp = base_dir / "benchmark-settings.json"
    if not rebuild and (base_dir / "best.ckpt").is_file() and stamp.is_file() and stamp.read_text() == settings:
        log(f"base: cached in {base_dir} (--rebuild-base retrains it)")
        return base_dir / "best.ckpt"
    log("base: training on LibriSpeech (cached for later runs)")
    started = time.monotonic()
    train(BASE_CONFIG | {"data.train": str(LIBRISPEECH), "run.seed": seed}, base_dir, log)
    stamp.write_text(settings)
    log(f"base: trained in {time.monotonic() - started:.0f} s")
    return base_dir / "best.ckpt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rebuild-base", action="store_true", help="retrain the cached base model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits, crops and initialisation")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the EER interval")
    args = parser.parse_args()
    for path in (LIBRISPEECH, EMODB):
        if not path.is_file():
            print(f"shared data not found at {path} (expected ../shared beside the checkout)", file=sys.stderr)
            return 2

    import torch

    from spkft.core.adaptation import fit_adaptation
    from spkft.core.checkpoint import load_model
    from spkft.core.embedding import Embedder
    from spkft.core.train import load_config
    from spkft.core.train.recipes import resolve_recipe

    torch.set_num_threads(args.threads)

    def log(line: str) -> None:
        print(line, flush=True)

    CACHE.mkdir(parents=True, exist_ok=True)
    started_all = time.monotonic()
    base = build_base(args.seed, args.rebuild_base, log)
    target_train, target_test = target_split(args.seed)
    manifest = write_manifest(target_train, CACHE / "target-train.csv")
    target = TestSet(target_test)
    base_test = TestSet(base_test_recordings(args.seed))
    log(f"target domain: EmoDB, fine-tuning speakers {sorted({r.speaker for r in target_train})} "
        f"({len(target_train)} recordings), test speakers {sorted({r.speaker for r in target_test})} "
        f"({len(target_test)} recordings, {len(target.upper[0]):,} trials, {int(target.same[target.upper].sum()):,} "
        f"same-speaker)")
    log(f"base domain: {len({r.speaker for r in base_test.recordings})} held-out LibriSpeech speakers, "
        f"{len(base_test.recordings)} segments of {SEGMENT_SECONDS:g} s, {len(base_test.upper[0]):,} trials")

    rows: list[Row] = []
    test_vectors: dict[Path, tuple[np.ndarray, np.ndarray]] = {}  # by checkpoint: (d) and (e) reuse (a)'s and (b)'s

    def measure(label: str, checkpoint: Path, seconds: float, adaptation=None, note: str = "") -> Row:
        if checkpoint not in test_vectors:
            embedder = Embedder(load_model(checkpoint).model)
            test_vectors[checkpoint] = embed_all(embedder, target.recordings), embed_all(embedder, base_test.recordings)
        target_vectors, base_vectors = test_vectors[checkpoint]
        if adaptation is not None:
            target_vectors, base_vectors = adaptation.apply(target_vectors), adaptation.apply(base_vectors)
        eer_value, interval, min_dcf = target.measure(target_vectors, args.bootstrap, args.seed)
        base_eer, _, _ = base_test.measure(base_vectors, 0, args.seed)
        row = Row(label, eer_value, interval, min_dcf, base_eer, seconds, note)
        rows.append(row)
        log(f"{label}: target EER {eer_value:.2%} [{interval[0]:.2%}, {interval[1]:.2%}]  minDCF {min_dcf:.3f}  "
            f"base-domain EER {base_eer:.2%}  ({seconds:.0f} s)")
        return row

    def adapt(checkpoint: Path):
        """A backend adaptation fitted, method auto, on the fine-tuning speakers' recordings."""
        started = time.monotonic()
        embedder = Embedder(load_model(checkpoint).model)
        vectors = embed_all(embedder, target_train)
        adaptation, reason = fit_adaptation(vectors, [r.speaker for r in target_train])
        return adaptation, reason, time.monotonic() - started

    base_row = measure("(a) base as is", base, 0.0)

    # What ``spkft train --recipe auto`` picks for this data: the same scan, less its validation speakers.
    _, auto = resolve_recipe(load_config(None, {"data.train": str(manifest), "model.init": str(base),
                                                "recipe": "auto", "run.seed": args.seed}))
    runs: dict[str, Run] = {}
    for name in RECIPE_NAMES:
        log(f"fine-tuning with recipe {name}")
        started = time.monotonic()
        runs[name] = train({"data.train": str(manifest), "model.init": str(base), "recipe": name,
                            "run.seed": args.seed, "run.average_last": AVERAGE_LAST}, CACHE / "runs" / name, log)
        measure(f"(b) recipe {name}" + (" = auto" if name == auto.name else ""), runs[name].path / "best.ckpt",
                time.monotonic() - started, note=f"epoch {runs[name].best_epoch} of {runs[name].epochs}")

    best_name = min(RECIPE_NAMES, key=lambda n: next(r.target_eer for r in rows if r.label.startswith(f"(b) recipe {n}")))
    average = runs[best_name].path / "average.ckpt"
    if average.is_file():
        measure(f"(b) recipe {best_name}, last {AVERAGE_LAST} epochs averaged", average, 0.0)

    budget = runs[auto.name]
    log(f"fresh network: recipe full from scratch, {budget.steps} steps as recipe {auto.name} took")
    started = time.monotonic()
    fresh = train({"data.train": str(manifest), "recipe": "full", "model.variant": "eres2netv2",
                   "model.args": {"m_channels": 8}, "run.seed": args.seed, "run.epochs": budget.epochs,
                   "run.steps_per_epoch": max(1, budget.steps // budget.epochs), "run.patience": None},
                  CACHE / "runs" / "fresh", log)
    measure("(c) fresh network, target speakers only", fresh.path / "best.ckpt", time.monotonic() - started,
            note=f"epoch {fresh.best_epoch} of {fresh.epochs}")

    adaptation, reason, seconds = adapt(base)
    measure(f"(d) base + {adaptation.method} adaptation", base, seconds, adaptation, note=reason)
    adaptation, reason, seconds = adapt(runs[best_name].path / "best.ckpt")
    measure(f"(e) recipe {best_name} + {adaptation.method} adaptation", runs[best_name].path / "best.ckpt",
            seconds, adaptation, note=reason)

    log("")
    log(f"auto: {auto.line()}")
    print_table(rows, base_row)
    best = min(rows[1:], key=lambda r: r.target_eer)
    gain = 1 - best.target_eer / base_row.target_eer
    forgetting = best.base_eer / base_row.base_eer - 1
    fresh_row = next(r for r in rows if r.label.startswith("(c)"))
    log("")
    log(f"best: {best.label}: target EER {base_row.target_eer:.2%} -> {best.target_eer:.2%} "
        f"({gain:.0%} lower; target >= {TARGET_RELATIVE_GAIN:.0%}: {'met' if gain >= TARGET_RELATIVE_GAIN else 'missed'})")
    log(f"forgetting: base-domain EER {base_row.base_eer:.2%} -> {best.base_eer:.2%} ({forgetting:+.0%}; "
        f"target <= +{MAX_FORGETTING:.0%}: {'met' if forgetting <= MAX_FORGETTING else 'missed'})")
    best_b = min((r for r in rows if r.label.startswith("(b)")), key=lambda r: r.target_eer)
    log(f"pretraining pays: best recipe {best_b.target_eer:.2%} vs fresh {fresh_row.target_eer:.2%}: "
        f"{'met' if best_b.target_eer < fresh_row.target_eer else 'missed'}")
    log(f"whole run: {time.monotonic() - started_all:.0f} s")
    return 0


def print_table(rows: list[Row], base: Row) -> None:
    print("| model | target EER [95 % interval] | vs base | target minDCF | base-domain EER | vs base | time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        note = f" ({row.note})" if row.note else ""
        print(f"| {row.label}{note} | {row.target_eer:.2%} [{row.target_interval[0]:.1%}, {row.target_interval[1]:.1%}] "
              f"| {row.target_eer / base.target_eer - 1:+.0%} | {row.target_min_dcf:.3f} | {row.base_eer:.2%} "
              f"| {row.base_eer / base.base_eer - 1:+.0%} | {row.seconds:.0f} s |")


if __name__ == "__main__":
    sys.exit(main())
