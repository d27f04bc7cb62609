"""Domain adaptation, measured: a pretrained model fine-tuned on a new domain, tested on speakers it never saw.

The case spkft is for: a model pretrained on one domain, a user's recordings from another, and two
questions: does fine-tuning make it a better verifier there, and does it stay as good where it came
from. No released weights can be downloaded here, so the base is spkft's own:

- **Base model**: the bundled ``spkft_demo_base`` (``configs/demo-base.yaml``): a narrow ERes2NetV2
  trained on LibriSpeech (one recording per speaker) pooled with speechocean762's adults (ten
  sentences per speaker). Its config names the speakers it held out; the 60 test speakers (about
  40 LibriSpeech, 20 speechocean762) are the base domain's test sets here, every pair a trial
  (LibriSpeech's single recordings cut into 2 s segments). ``--base CKPT`` measures another base
  trained by the same config on the same split.
- **New domain** (``--domain``):
  - ``emodb`` (the default): EmoDB (German, acted emotions, 22.05 kHz). A seeded split puts 4
    speakers in the test set (every trial among their recordings) and gives the other 6 to
    fine-tuning, which holds 2 of them out for its own validation as ``spkft train`` does.
  - ``telephone``: the 30 speakers the base held out for its validation (it never trained on
    them), as a telephone line would carry them: 8 kHz, band-limited, mu-law coded (8 bits).
    A seeded split tests on 12 and fine-tunes on 18.
- **Keeping the old domain**: each recipe runs three ways: without holding the old domain
  (``freeze.distill 0``), with distillation toward the base's embeddings (what ``auto`` does when
  no base-domain speech is given) and with rehearsal of the base's own training speakers
  (``data.rehearsal``; what ``auto`` does when some is given).

One table, every row tested on the same trials:
  (a) the base as is;
  (b) the base fine-tuned with each recipe, each way; the rows ``auto`` picks are marked;
  (c) a fresh network trained on the target speakers alone with the same number of steps;
  (d) the base with a backend adaptation (``spkft adapt``, method auto) fitted on the 6
      fine-tuning speakers' recordings, no retraining;
  (e) weight-space interpolation (WiSE-FT): each recipe's run that held nothing, its weights
      taken halfway back to the base's (the average of the two checkpoints);
  (f) the base scored by PLDA (``spkft adapt --method plda``) fitted on the base domain's
      training speakers (LibriSpeech's single recordings cut into 3 s segments);
  (g) that PLDA adapted to the new domain with the fine-tuning speakers' recordings, their labels
      unused (``--adapt-data``): the case of a user with a general corpus and unlabelled audio.
Then calibration (``spkft calibrate``): the cosine of (d) and the adapted PLDA of (g), each mapped
to LLRs on every pair of the fine-tuning speakers' recordings and measured on the test trials
(Cllr against min Cllr, actual DCF against minDCF). ``--backends-only`` measures (a), (d), (f),
(g) and calibration alone, in a few minutes. Rows (h) put the backend of (g) behind what ``auto``
fine-tuned: a PLDA fitted on the fine-tuned model's embeddings of the base domain's speakers,
adapted to the new domain's recordings without labels.
EER on the new domain comes with a 95 % interval from a bootstrap over test recordings. The
base-domain columns show what each model does on the pretraining domain's held-out speakers: what
was forgotten.

    python benchmarks/domain_adaptation.py [--domain emodb|telephone] [--recipes full,...] [--holds none,...] [--base CKPT]
                                           [--backends-only] [--seed 0] [--threads 2] [--bootstrap 200]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
EMODB = DATA / "emodb-10spk" / "manifest.csv"
CACHE = ROOT / "benchmarks" / ".cache" / "domain_adaptation"

TARGET_TEST_SPEAKERS = {"emodb": 4, "telephone": 12}
TELEPHONE_RATE = 8000
SEGMENT_SECONDS = 2.0
RECIPE_NAMES = ("linear-probe", "partial", "full")
# The ways of keeping the old domain each recipe is run with: the label, and the config they add.
HOLDS = ("none", "distillation", "rehearsal")
# Targets of the case (README states whether they are met).
TARGET_RELATIVE_GAIN = 0.30  # target-domain EER of the auto recipe at least 30 % below the base's
MAX_FORGETTING = 0.10  # base-domain EER at most 10 % above the base's, on each base-domain test set
PLDA_RELATIVE_GAIN = 0.15  # adapted PLDA's target EER at least 15 % below cosine + the best backend adaptation
CLLR_GAP = 0.1  # calibrated: Cllr below 1 and within this of min Cllr
DCF_GAP = 0.10  # calibrated: actual DCF within 10 % of minDCF
# PLDA's base-domain training data: recordings cut into segments of this length, at most this many each.
PLDA_SEGMENT_SECONDS = 3.0
PLDA_MAX_SEGMENTS = 4


@dataclass
class Row:
    label: str
    target_eer: float
    target_interval: tuple[float, float]
    target_min_dcf: float
    base_eers: dict[str, float]  # base-domain test set -> EER
    seconds: float
    note: str = ""
    auto: str = ""  # which auto pick this row is ("no rehearsal data", "rehearsal data given"), if any


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


def telephone(recordings) -> Path:
    """``recordings`` as a telephone line carries them, once, into the cache: 8 kHz (the resampler's
    low-pass band-limits them below 4 kHz), mu-law coded in 8 bits and decoded again."""
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    from spkft.core.audio import read_samples

    folder = CACHE / "telephone"
    manifest = folder / "manifest.csv"
    lines = ["path,speaker"]
    for recording in recordings:
        name = recording.utt_id.replace("/", "_") + ".wav"
        if not (folder / name).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            wave = torch.from_numpy(read_samples(recording.path, recording.start_seconds, recording.stop_seconds))
            narrow = AF.resample(wave, 16000, TELEPHONE_RATE).clamp(-1, 1)
            coded = AF.mu_law_decoding(AF.mu_law_encoding(narrow, 256), 256)
            sf.write(folder / name, coded.numpy(), TELEPHONE_RATE, subtype="PCM_16")
        lines.append(f"{name},{recording.speaker}")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def target_split(domain: str, seed: int, base_val):
    """The new domain's recordings, split by speaker: (fine-tuning recordings, test recordings)."""
    from spkft.core.data import scan

    report = scan(emodb_at_16k() if domain == "emodb" else telephone(base_val))
    speakers = list(report.speakers)
    random.Random(seed).shuffle(speakers)
    test = set(speakers[:TARGET_TEST_SPEAKERS[domain]])
    train = [r for r in report.recordings if r.speaker not in test]
    return train, [r for r in report.recordings if r.speaker in test]


def trial_set(recordings):
    """Every pair of ``recordings`` a trial; a speaker with a single recording gives segments of it,
    so that it has same-speaker trials too."""
    from collections import Counter

    from spkft.core.data import segment

    counts = Counter(r.speaker for r in recordings)
    return TestSet([part for r in recordings
                    for part in (segment([r], SEGMENT_SECONDS) if counts[r.speaker] == 1 else [r])])


def base_split(base: str):
    """The base's own split, remade from the config stored in its checkpoint: (the recordings it
    trained on, those it validated on, its held-out test recordings by corpus as trial sets)."""
    from spkft.core.checkpoint import read_checkpoint
    from spkft.core.train import load_config
    from spkft.core.train.trainer import split_data

    stored = read_checkpoint(base).get("config")
    if not stored:
        raise SystemExit(f"{base}: the checkpoint holds no training config, so its held-out speakers are unknown")
    # The config's paths are relative to the checkout, where configs/demo-base.yaml is run.
    config = load_config(None, {"data.train": ROOT / stored["data"]["train"],
                                "data.val_speakers": stored["data"]["val_speakers"],
                                "data.test_speakers": stored["data"]["test_speakers"], "run.seed": stored["run"]["seed"]})
    split, _ = split_data(config)
    if not split.test:
        raise SystemExit(f"{base}: its config held out no test speakers (data.test_speakers)")
    corpora: dict[str, list] = {}
    for recording in split.test:
        corpora.setdefault(recording.speaker.partition("/")[0], []).append(recording)
    tests = {name: trial_set(recordings) for name, recordings in sorted(corpora.items())}
    return list(split.train), list(split.val), tests


def write_manifest(recordings, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{r.path},{r.speaker},{r.start_seconds:g},{'' if r.stop_seconds is None else f'{r.stop_seconds:g}'}\n"
                   for r in recordings)
    path.write_text("path,speaker,start,stop\n" + rows)
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

    def describe(self) -> str:
        return (f"{len({r.speaker for r in self.recordings})} speakers, {len(self.recordings)} recordings, "
                f"{len(self.upper[0]):,} trials ({int(self.same[self.upper].sum()):,} same-speaker)")

    def scores(self, embeddings: np.ndarray, plda=None) -> np.ndarray:
        """Every pair's score: the cosine, or with ``plda`` its log-likelihood ratio."""
        return embeddings @ embeddings.T if plda is None else plda.llr_matrix(embeddings, embeddings)

    def trial_scores(self, embeddings: np.ndarray, plda=None) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """``(scores, labels, (seconds of one side, of the other))`` of every trial."""
        i, j = self.upper
        seconds = np.array([r.duration_seconds for r in self.recordings])
        return self.scores(embeddings, plda)[i, j], self.same[i, j], (seconds[i], seconds[j])

    def measure(self, embeddings: np.ndarray, bootstrap: int, seed: int, plda=None
                ) -> tuple[float, tuple[float, float], float]:
        from spkft.core.metrics import compute_metrics, eer

        scores = self.scores(embeddings, plda)
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


def finished_run(output_dir: Path, overrides: dict) -> Run | None:
    """The run already in ``output_dir`` when it finished with this very config, else None."""
    import json

    import yaml

    from spkft.core.checkpoint import read_checkpoint
    from spkft.core.train import load_config

    try:
        written = yaml.safe_load((output_dir / "config.yaml").read_text())
        last = read_checkpoint(output_dir / "last.ckpt")
        records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    from spkft.core.train.recipes import resolve_recipe

    wanted = resolve_recipe(load_config(None, overrides | {"run.output_dir": str(output_dir)}))[0]
    wanted = wanted.model_dump(mode="json")
    if written != wanted or not (output_dir / "best.ckpt").is_file():
        return None
    epochs = [r["epoch"] for r in records if "epoch" in r and "train_loss" in r]
    return Run(output_dir, int(last["global_step"]), max(epochs), int(last["best_epoch"]))


def train(overrides: dict, output_dir: Path, log, reuse: bool = False) -> Run:
    """One ``spkft train`` run through the library, its progress logged a line per epoch; with
    ``reuse``, a run that already finished there with the same config is taken as it is."""
    from spkft.core.train import EpochEnded, RunFinished, RunStarted, StepEnded, Trainer, Validated, load_config

    if reuse:
        found = finished_run(output_dir, overrides)
        if found is not None:
            log(f"  reusing the finished run in {output_dir}")
            return found
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="spkft_demo_base",
                        help="the base checkpoint (default: the bundled spkft_demo_base); its stored config must "
                             "name its held-out speakers")
    parser.add_argument("--domain", choices=sorted(TARGET_TEST_SPEAKERS), default="emodb", help="the new domain")
    parser.add_argument("--recipes", default=",".join(RECIPE_NAMES), help="the recipes to run, comma-separated")
    parser.add_argument("--holds", default=",".join(HOLDS),
                        help="the ways of holding the old domain each recipe runs with, comma-separated")
    parser.add_argument("--backends-only", action="store_true",
                        help="measure the base and its backends (adaptation, PLDA, calibration) only: no training")
    parser.add_argument("--reuse", action="store_true",
                        help="take runs that already finished in benchmarks/.cache with the same config as they are "
                             "(their time is then not measured again)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits, crops and initialisation")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the EER interval")
    args = parser.parse_args()
    recipes = [name.strip() for name in args.recipes.split(",") if name.strip()]
    if not recipes or any(name not in RECIPE_NAMES for name in recipes):
        parser.error(f"--recipes: choose among {', '.join(RECIPE_NAMES)}")
    holds = [name.strip() for name in args.holds.split(",") if name.strip()]
    if not holds or any(name not in HOLDS for name in holds):
        parser.error(f"--holds: choose among {', '.join(HOLDS)}")
    if args.domain == "emodb" and not EMODB.is_file():
        print(f"shared data not found at {EMODB} (expected ../shared beside the checkout)", file=sys.stderr)
        return 2

    import torch

    from spkft.core.adaptation import fit_adaptation
    from spkft.core.average import average_checkpoints
    from spkft.core.calibration import fit_calibration
    from spkft.core.data import segment
    from spkft.core.evaluate import calibration_measures
    from spkft.core.plda import adapt_plda, fit_plda
    from spkft.core.checkpoint import load_model
    from spkft.core.embedding import Embedder
    from spkft.core.train import load_config
    from spkft.core.train.recipes import resolve_recipe

    torch.set_num_threads(args.threads)

    def log(line: str) -> None:
        print(line, flush=True)

    CACHE.mkdir(parents=True, exist_ok=True)
    started_all = time.monotonic()
    base = args.base
    base_train, base_val, base_tests = base_split(base)
    rehearsal = write_manifest(base_train, CACHE / "rehearsal.csv")
    target_train, target_test = target_split(args.domain, args.seed, base_val)
    manifest = write_manifest(target_train, CACHE / f"{args.domain}-train.csv")
    target = trial_set(target_test)
    log(f"base: {base}")
    log(f"target domain: {args.domain}, {len({r.speaker for r in target_train})} fine-tuning speakers "
        f"({len(target_train)} recordings); test: {target.describe()}")
    for name, test in base_tests.items():
        log(f"base domain, {name}: the base's held-out test speakers, {test.describe()}")
    log(f"rehearsal data: the base's {len(base_train)} training recordings of "
        f"{len({r.speaker for r in base_train})} speakers")

    rows: list[Row] = []
    vectors: dict[Path | str, tuple] = {}  # by checkpoint: (d) reuses (a)'s embeddings

    def measure(label: str, checkpoint, seconds: float, adaptation=None, note: str = "", auto: str = "",
                plda=None) -> Row:
        if checkpoint not in vectors:
            embedder = Embedder(load_model(checkpoint).model)
            vectors[checkpoint] = (embed_all(embedder, target.recordings),
                                   {name: embed_all(embedder, test.recordings) for name, test in base_tests.items()})
        target_vectors, base_vectors = vectors[checkpoint]
        if adaptation is not None:
            target_vectors = adaptation.apply(target_vectors)
            base_vectors = {name: adaptation.apply(v) for name, v in base_vectors.items()}
        eer_value, interval, min_dcf = target.measure(target_vectors, args.bootstrap, args.seed, plda)
        base_eers = {name: base_tests[name].measure(v, 0, args.seed, plda)[0] for name, v in base_vectors.items()}
        row = Row(label, eer_value, interval, min_dcf, base_eers, seconds, note, auto)
        rows.append(row)
        log(f"{label}: target EER {eer_value:.2%} [{interval[0]:.2%}, {interval[1]:.2%}]  minDCF {min_dcf:.3f}  "
            + "  ".join(f"{name} EER {value:.2%}" for name, value in base_eers.items()) + f"  ({seconds:.0f} s)")
        return row

    base_row = measure("(a) base as is", base, 0.0)

    # What ``spkft train --recipe auto`` picks for this data, without and with rehearsal data.
    common = {"data.train": str(manifest), "model.init": str(base), "run.seed": args.seed}
    picks = {hold: resolve_recipe(load_config(None, common | {"recipe": "auto"} | extra))[1]
             for hold, extra in (("distillation", {}), ("rehearsal", {"data.rehearsal": str(rehearsal)}))}
    extras = {"none": {"freeze.distill": 0.0}, "distillation": {}, "rehearsal": {"data.rehearsal": str(rehearsal)}}
    runs: dict[tuple[str, str], Run] = {}
    for name in recipes if not args.backends_only else ():
        for hold in holds:
            log(f"fine-tuning with recipe {name}, holding the old domain by: {hold}")
            started = time.monotonic()
            run = train(common | {"recipe": name} | extras[hold], CACHE / "runs" / args.domain / f"{name}-{hold}", log,
                        args.reuse)
            runs[name, hold] = run
            auto = next((("no rehearsal data" if h == "distillation" else "rehearsal data given")
                         for h, pick in picks.items() if pick.name == name and h == hold), "")
            measure(f"(b) {name}, {hold}" + (f" = auto ({auto})" if auto else ""), run.path / "best.ckpt",
                    time.monotonic() - started, note=f"epoch {run.best_epoch} of {run.epochs}", auto=auto)

    fresh_row = None
    if runs:
        auto_name = picks["distillation"].name
        budget = runs.get((auto_name, "distillation")) or next(iter(runs.values()))
        log(f"fresh network: recipe full from scratch, {budget.steps} steps as the auto recipe took")
        started = time.monotonic()
        base_args = load_model(base).checkpoint.get("config", {}).get("model", {}).get("args", {})
        fresh = train({"data.train": str(manifest), "recipe": "full", "model.variant": "eres2netv2",
                       "model.args": base_args, "run.seed": args.seed, "run.epochs": budget.epochs,
                       "run.steps_per_epoch": max(1, budget.steps // budget.epochs), "run.patience": None},
                      CACHE / "runs" / args.domain / "fresh", log, args.reuse)
        fresh_row = measure("(c) fresh network, target speakers only", fresh.path / "best.ckpt",
                            time.monotonic() - started, note=f"epoch {fresh.best_epoch} of {fresh.epochs}")

    started = time.monotonic()
    base_embedder = Embedder(load_model(base).model)
    target_train_vectors = embed_all(base_embedder, target_train)
    adaptation, reason = fit_adaptation(target_train_vectors, [r.speaker for r in target_train])
    adaptation_row = measure(f"(d) base + {adaptation.method} adaptation", base, time.monotonic() - started,
                             adaptation, note=reason)

    # PLDA on the base domain's labelled speakers (LibriSpeech's single recordings cut into
    # segments, so each speaker varies), then adapted to the new domain's recordings without labels.
    started = time.monotonic()
    plda_train = segment(base_train, PLDA_SEGMENT_SECONDS, max_segments=PLDA_MAX_SEGMENTS)
    plda = fit_plda(embed_all(base_embedder, plda_train), [r.speaker for r in plda_train], source="base training")
    plda_seconds = time.monotonic() - started
    measure("(f) base + PLDA fitted on the base domain", base, plda_seconds, plda=plda, note=plda.describe())
    started = time.monotonic()
    adapted_plda = adapt_plda(plda, target_train_vectors, source="target, unlabelled")
    plda_row = measure("(g) base + PLDA, adapted with the target's recordings, no labels", base,
                       plda_seconds + time.monotonic() - started, plda=adapted_plda, note=adapted_plda.describe())

    # Weight-space interpolation (WiSE-FT, Wortsman et al., 2022): halfway between the base and each
    # recipe's run that held nothing, i.e. the average of the two checkpoints.
    for name in recipes:
        if (name, "none") in runs:
            started = time.monotonic()
            halfway = runs[name, "none"].path / "halfway.ckpt"
            torch.save(average_checkpoints([base, runs[name, "none"].path / "best.ckpt"]), halfway)
            measure(f"(e) {name}, nothing held, weights halfway back to the base", halfway, time.monotonic() - started)

    # What auto's fine-tuned models give with the same backend: PLDA refitted on their own
    # embeddings of the base domain's speakers, adapted to the target's recordings without labels.
    for name, hold in ((pick.name, h) for h, pick in picks.items()):
        if (name, hold) not in runs:
            continue
        started = time.monotonic()
        checkpoint = runs[name, hold].path / "best.ckpt"
        embedder = Embedder(load_model(checkpoint).model)
        tuned = fit_plda(embed_all(embedder, plda_train), [r.speaker for r in plda_train])
        tuned = adapt_plda(tuned, embed_all(embedder, target_train))
        auto = "no rehearsal data" if hold == "distillation" else "rehearsal data given"
        measure(f"(h) {name}, {hold} (auto, {auto}) + PLDA, adapted with the target's recordings", checkpoint,
                time.monotonic() - started, plda=tuned, note=tuned.describe())

    # Calibration, fitted on every pair of the target's fine-tuning recordings (speakers the test
    # never sees) and measured on the test trials.
    calibrations = {}
    for label, backend, vectors_of in (("cosine + " + adaptation.method, None, lambda v: adaptation.apply(v)),
                                       ("adapted PLDA", adapted_plda, lambda v: v)):
        fit_set = TestSet(target_train)
        scores, labels, sides = fit_set.trial_scores(vectors_of(target_train_vectors), backend)
        calibration = fit_calibration(scores, labels, "cosine" if backend is None else "plda", *sides)
        test_vectors = vectors_of(vectors[base][0])
        scores, labels, sides = target.trial_scores(test_vectors, backend)
        calibrations[label] = calibration_measures(scores, calibration.llr(scores, *sides), labels)

    log("")
    for hold, pick in picks.items():
        log(f"auto ({'no rehearsal data' if hold == 'distillation' else 'rehearsal data given'}): {pick.line()}")
    print_table(rows, base_row)
    log("")
    for label, measures in calibrations.items():
        log(f"calibrated {label}, on the target's test trials: Cllr {measures.cllr:.3f} (min {measures.min_cllr:.3f}); "
            + "; ".join(f"actual DCF at {p:g} {value:.3f} (min {measures.min_dcf[p]:.3f})"
                        for p, value in measures.act_dcf.items()))
    measures = calibrations["adapted PLDA"]
    log(f"calibration: Cllr below 1 and within {CLLR_GAP} of min Cllr: "
        f"{'met' if measures.cllr < 1 and measures.cllr - measures.min_cllr <= CLLR_GAP else 'missed'}; "
        f"actual DCF within {DCF_GAP:.0%} of minDCF at 0.01 and 0.05: "
        f"{'met' if all(v <= (1 + DCF_GAP) * measures.min_dcf[p] for p, v in measures.act_dcf.items()) else 'missed'}")
    gain = 1 - plda_row.target_eer / adaptation_row.target_eer
    log(f"PLDA adapted without labels against cosine + {adaptation.method}: target EER "
        f"{adaptation_row.target_eer:.2%} -> {plda_row.target_eer:.2%} ({gain:.0%} lower; target >= "
        f"{PLDA_RELATIVE_GAIN:.0%}: {'met' if gain >= PLDA_RELATIVE_GAIN else 'missed'})")
    for row in (r for r in rows if r.auto):
        gain = 1 - row.target_eer / base_row.target_eer
        log(f"auto ({row.auto}): target EER {base_row.target_eer:.2%} -> {row.target_eer:.2%} ({gain:.0%} lower; "
            f"target >= {TARGET_RELATIVE_GAIN:.0%}: {'met' if gain >= TARGET_RELATIVE_GAIN else 'missed'})")
        for name, value in row.base_eers.items():
            forgetting = value / base_row.base_eers[name] - 1
            log(f"auto ({row.auto}): forgetting on {name}: EER {base_row.base_eers[name]:.2%} -> {value:.2%} "
                f"({forgetting:+.0%}; target <= +{MAX_FORGETTING:.0%}: {'met' if forgetting <= MAX_FORGETTING else 'missed'})")
        if fresh_row is not None:
            log(f"auto ({row.auto}): pretraining pays: {row.target_eer:.2%} vs fresh {fresh_row.target_eer:.2%}: "
                f"{'met' if row.target_eer < fresh_row.target_eer else 'missed'}")
    log(f"whole run: {time.monotonic() - started_all:.0f} s")
    return 0


def print_table(rows: list[Row], base: Row) -> None:
    names = list(base.base_eers)
    print("| model | target EER [95 % interval] | vs base | target minDCF | "
          + " | ".join(f"{name} EER | vs base" for name in names) + " | time |")
    print("| --- | --- | --- | --- | " + " | ".join("--- | ---" for _ in names) + " | --- |")
    for row in rows:
        note = f" ({row.note})" if row.note else ""
        base_cells = " | ".join(f"{row.base_eers[n]:.2%} | {row.base_eers[n] / base.base_eers[n] - 1:+.0%}" for n in names)
        print(f"| {row.label}{note} | {row.target_eer:.2%} [{row.target_interval[0]:.1%}, {row.target_interval[1]:.1%}] "
              f"| {row.target_eer / base.target_eer - 1:+.0%} | {row.target_min_dcf:.3f} | {base_cells} "
              f"| {row.seconds:.0f} s |")


if __name__ == "__main__":
    sys.exit(main())
