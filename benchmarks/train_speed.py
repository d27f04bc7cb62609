"""Training-step speed of the spkft trainer against a bare loop, by precision and freezing, and the EER it costs.

Everything is measured in this one run and reported as ratios, on the CPU, on real speech:
- the trainer's own step (the real ``Trainer`` on LibriSpeech crops: data loading, fbank, lr
  schedule, forward, backward, gradient clipping, optimiser step, metrics, event) against a bare
  forward + backward + SGD step of the same model, head, batch and crop length on random
  features, at the same precision: the trainer's overhead;
- the bare step in plain fp32, channels_last fp32, bf16 autocast and bf16 + channels_last, and
  the trainer at its default precision (``run.precision: auto``, ``run.channels_last: auto``, channels_last for this width);
- the trainer with the ``early`` (stem, layer1, layer2) and ``encoder`` stages frozen;
- the validation EER of two short runs of a small ERes2NetV2 (m_channels 8), identical but for
  the precision: fp32 and the default. They train on the six speakers of the spoken-digit set
  (takes 0-9 of every digit) and validate on other recordings of theirs (takes 40-49): a short
  run learns there, so the comparison is of two models that improved, over thousands of trials.

The speed cases share one process and take their steps in turns (round-robin, the order rotating
each round), so a change in the load of a shared machine hits every case alike; each trainer runs
its epoch in a thread that waits in its event sink between steps. The first round is warm-up
(oneDNN builds its kernels then); a case's speed is its best timed step, and the median is shown
to make the noise visible. "data s" is how long a trainer step waited for its batch. A loader
worker (``run.num_workers``) also prepares batches while other cases step, so the trainer's data
cost may be slightly understated: 25 to 50 ms of one core per batch of 8 x 3 s. Sharing a process
means no per-case memory readings. Each EER run is a fresh process.

    python benchmarks/train_speed.py [--variant V] [--batch-size 8] [--crop-seconds 3] [--steps 4]
                                     [--threads 2] [--skip-eer]

With the defaults (eres2netv2, 8 x 3 s, 4 timed rounds after 1 warm-up, 2 threads) a run takes
about 6 minutes on an idle 2-core AVX-512 BF16 CPU, and 10 to 15 when another job shares it
(each round of the seven speed cases takes 30 s idle, up to 100 s shared; each EER run 1 to 2
minutes). eres2netv2_w24s4ep4 is about three times slower per step: give it --steps 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SPEECH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "librispeech-train-clean-100-251spk"
MANIFEST = SPEECH / "manifest.csv"
DIGITS = SPEECH.parent / "fsdd-8khz"
TRAIN_TAKES, VAL_TAKES = range(0, 10), range(40, 50)
VARIANTS = ("eres2netv2", "eres2netv2_w24s4ep4")

# Measured on this project's 2-core AVX-512 BF16 CPU, eres2netv2, batch 8 x 3 s.
REFERENCE = {"fp32": 0.86, "bf16": 2.83}  # samples/s of the bare step
REFERENCE_CHANNELS_LAST = 1.24
TARGET_DEFAULT_VS_FP32 = 3.0  # trainer at its default precision / plain fp32 bare step
TARGET_OVERHEAD = 0.9  # trainer / bare step of the same precision

# (name, precision, channels_last) of the bare loop; fp32 contiguous is the baseline of every ratio.
BARE_CASES = (("bare fp32", "fp32", False), ("bare fp32 + channels_last", "fp32", True),
              ("bare bf16", "bf16", False), ("bare bf16 + channels_last", "bf16", True))
FREEZE_CASES = ("none", "early", "encoder")


def trainer_config(overrides: dict, output_dir: Path):
    from spkft.core.train import load_config

    return load_config(None, {"data.train": MANIFEST, "run.device": "cpu", "run.patience": None,
                              "run.output_dir": output_dir} | overrides)


class BareLoop:
    """Forward, backward and SGD step of a fresh model and head on one batch of random features."""

    def __init__(self, variant: str, precision: str, channels_last: bool, batch: int, frames: int,
                 num_classes: int, optim) -> None:
        import torch

        from spkft.core.model import build_model
        from spkft.core.train.head import AAMSoftmaxHead

        torch.manual_seed(0)
        self.model = build_model(variant).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.head = AAMSoftmaxHead(self.model.config.embedding_size, num_classes, margin=0.2)
        self.model.train()
        self.optimizer = torch.optim.SGD([*self.model.parameters(), *self.head.parameters()], lr=optim.lr,
                                         momentum=optim.momentum, nesterov=optim.nesterov,
                                         weight_decay=optim.weight_decay)
        self.precision = precision
        self.features = torch.randn(batch, frames, self.model.config.feat_dim)
        self.labels = torch.randint(0, num_classes, (batch,))

    def step(self) -> float:
        import torch

        from spkft.core.train.runtime import autocast

        start = time.perf_counter()
        with autocast(torch.device("cpu"), self.precision):
            loss, _ = self.head(self.model(self.features), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


class TimedLoader:
    """The trainer's DataLoader, recording how long each batch kept the training step waiting."""

    def __init__(self, loader) -> None:
        self.loader, self.waits = loader, []

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield batch


class TrainerSteps:
    """A set-up ``Trainer`` whose epoch runs in a thread, one optimiser step per call to :meth:`step`.

    The thread waits in the trainer's event sink after each ``StepEnded``, so the time from
    letting it go to the next ``StepEnded`` is exactly one step of the trainer's own loop.
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._error: BaseException | None = None
        self.loader = trainer.loader = TimedLoader(trainer.loader)
        trainer.sink = self._on_event
        wrapped = trainer._enter_phase(0)
        self._thread = threading.Thread(target=self._run, args=(wrapped,), daemon=True)
        self._thread.start()

    def _on_event(self, event) -> None:
        from spkft.core.train import StepEnded

        if isinstance(event, StepEnded):
            self._done.release()
            self._go.acquire()

    def _run(self, wrapped) -> None:
        self._go.acquire()
        try:
            self.trainer._train_epoch(0, wrapped, time.monotonic(), 0)
        except BaseException as exc:  # handed to the main thread by step()
            self._error = exc
        finally:
            self._done.release()

    def step(self) -> float:
        start = time.perf_counter()
        self._go.release()
        self._done.acquire()
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise RuntimeError("the trainer's epoch ended before the benchmark's last step")
        return time.perf_counter() - start

    def close(self) -> None:
        self.trainer.stop.set()
        self._go.release()
        self._thread.join()


def measure_speed(args) -> dict:
    import torch

    from spkft.core.features import SAMPLE_RATE, num_frames
    from spkft.core.train import Trainer

    torch.set_num_threads(args.threads)
    common = {"model.variant": args.variant, "run.batch_size": args.batch_size,
              "augment.crop_seconds": args.crop_seconds, "run.epochs": 1,
              "run.steps_per_epoch": args.warmup + args.steps}
    cases: dict[str, dict] = {}
    steppers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for freeze in FREEZE_CASES:
            trainer = Trainer(trainer_config(common | {"freeze.stages": freeze}, Path(tmp) / freeze))
            trainer.setup()
            name = "trainer default" if freeze == "none" else f"trainer default, freeze {freeze}"
            cases[name] = {"precision": trainer.precision, "channels_last": trainer.channels_last,
                           "frozen": freeze}
            steppers[name] = TrainerSteps(trainer)
        frames = num_frames(int(args.crop_seconds * SAMPLE_RATE))
        reference = steppers["trainer default"].trainer
        for name, precision, channels_last in BARE_CASES:
            cases[name] = {"precision": precision, "channels_last": channels_last, "frozen": "none"}
            steppers[name] = BareLoop(args.variant, precision, channels_last, args.batch_size, frames,
                                      reference.dataset.num_classes, reference.config.optim)
        names = [name for name, *_ in BARE_CASES] + [n for n in cases if n.startswith("trainer")]
        timings = {name: [] for name in names}
        try:
            for round_ in range(args.warmup + args.steps):
                order = names[round_ % len(names):] + names[: round_ % len(names)]
                seconds = {name: steppers[name].step() for name in order}
                if round_ >= args.warmup:
                    for name in names:
                        timings[name].append(seconds[name])
                print(f"round {round_ + 1}/{args.warmup + args.steps}: "
                      + ", ".join(f"{n} {seconds[n]:.1f}s" for n in names), file=sys.stderr, flush=True)
        finally:
            for stepper in steppers.values():
                if isinstance(stepper, TrainerSteps):
                    stepper.close()
    for name in names:
        cases[name] |= {"best_s": min(timings[name]), "median_s": statistics.median(timings[name]),
                        "steps": timings[name]}
        if isinstance(steppers[name], TrainerSteps):
            cases[name]["data_s"] = statistics.median(steppers[name].loader.waits[args.warmup:])
    return {"threads": torch.get_num_threads(), "cases": {n: cases[n] for n in names}}


def closed_set_lists(root: Path) -> tuple[Path, Path]:
    """Training and validation lists of the digit set's six speakers, never sharing a recording."""
    train, val = ["path,speaker"], ["path,speaker"]
    for path in sorted(DIGITS.glob("*.wav")):
        _, speaker, take = path.stem.split("_")
        if int(take) in TRAIN_TAKES:
            train.append(f"{path},{speaker}")
        elif int(take) in VAL_TAKES:
            val.append(f"{path},{speaker}")
    (root / "train.csv").write_text("\n".join(train) + "\n")
    (root / "val.csv").write_text("\n".join(val) + "\n")
    return root / "train.csv", root / "val.csv"


def measure_eer(args, precision: str) -> dict:
    """A short seeded run of a small ERes2NetV2 at ``precision`` (fp32 or auto) on the digit set."""
    import torch

    from spkft.core.train import RunStarted, Trainer

    # One thread: a small model's many small ops stall on a second thread whenever another job
    # holds a core; these runs' speed is not measured. One epoch: the run validates before it,
    # after it and once more for its report.
    torch.set_num_threads(1)
    events: list = []
    with tempfile.TemporaryDirectory() as tmp:
        train, val = closed_set_lists(Path(tmp))
        overrides = {"data.train": train, "data.val": val, "model.variant": "eres2netv2",
                     "model.args": {"m_channels": 8}, "run.batch_size": 16, "augment.crop_seconds": 0.5,
                     "optim.lr": 0.05, "run.epochs": 1, "run.steps_per_epoch": args.eer_steps,
                     "run.precision": precision, "run.seed": 0}
        start = time.perf_counter()
        trainer = Trainer(trainer_config(overrides, Path(tmp) / "run"), sink=events.append)
        finished = trainer.run()
        seconds = time.perf_counter() - start
        epochs = [json.loads(line) for line in (Path(finished.run_dir) / "metrics.jsonl").read_text().splitlines()]
    resolved = next(e.precision for e in events if isinstance(e, RunStarted))
    return {"asked": precision, "precision": resolved, "steps": args.eer_steps, "seconds": seconds,
            "initial_eer": finished.initial_eer, "final_eer": epochs[-1]["val_eer"], "best_eer": finished.best_eer,
            "trials": len(trainer.val_trials), "target_trials": sum(t.target for t in trainer.val_trials)}


def child(args, *what: str) -> dict:
    flags = ["--variant", args.variant, "--batch-size", str(args.batch_size), "--crop-seconds", str(args.crop_seconds),
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
             "--eer-steps", str(args.eer_steps)]
    out = subprocess.run([sys.executable, __file__, "--child", *what, *flags], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"the {' '.join(what)} case failed (exit {out.returncode}); its error is above")
    return json.loads(out.stdout.strip().splitlines()[-1])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(args, speed: dict, eer: list[dict]) -> None:
    cases = speed["cases"]
    samples = {name: args.batch_size / case["best_s"] for name, case in cases.items()}
    fp32 = samples["bare fp32"]
    bare_of = {(p, c): n for n, p, c in BARE_CASES}
    print(f"training step, {args.variant}, batch {args.batch_size} x {args.crop_seconds:g} s, "
          f"{speed['threads']} torch thread(s), best of {args.steps} interleaved steps after {args.warmup} warm-up round(s)")
    print(f"{'case':<34}{'precision':>10}{'ch.last':>8}{'frozen':>9}{'best s':>8}{'median s':>10}{'data s':>8}"
          f"{'samples/s':>11}{'vs fp32':>9}{'vs bare':>9}")
    for name, case in cases.items():
        same = bare_of[(case["precision"], case["channels_last"])]
        data = f"{case['data_s']:>8.2f}" if "data_s" in case else f"{'':>8}"
        versus_bare = f"{samples[name] / samples[same]:>9.2f}" if name.startswith("trainer") and case["frozen"] == "none" else ""
        print(f"{name:<34}{case['precision']:>10}{'yes' if case['channels_last'] else 'no':>8}{case['frozen']:>9}"
              f"{case['best_s']:>8.2f}{case['median_s']:>10.2f}{data}{samples[name]:>11.2f}{samples[name] / fp32:>9.2f}"
              f"{versus_bare}")
    default = cases["trainer default"]
    same = bare_of[(default["precision"], default["channels_last"])]
    vs_fp32 = samples["trainer default"] / fp32
    overhead = samples["trainer default"] / samples[same]
    # Steps of neighbouring cases in one round saw the same load; their ratio drifts least.
    paired = statistics.median(b / t for b, t in zip(cases[same]["steps"], default["steps"]))
    print()
    print(f"reference ({REFERENCE['fp32']} -> {REFERENCE['bf16']} samples/s, eres2netv2 8 x 3 s): bare bf16 / fp32 "
          f"{samples['bare bf16'] / fp32:.2f}x (reference {REFERENCE['bf16'] / REFERENCE['fp32']:.1f}x), "
          f"channels_last fp32 / fp32 {samples['bare fp32 + channels_last'] / fp32:.2f}x (reference {REFERENCE_CHANNELS_LAST})")
    print(f"{verdict(vs_fp32 >= TARGET_DEFAULT_VS_FP32)}  trainer default ({default['precision']}"
          f"{', channels_last' if default['channels_last'] else ''}) / bare plain fp32: {vs_fp32:.2f}x "
          f"(target >= {TARGET_DEFAULT_VS_FP32:g}x)")
    print(f"{verdict(overhead >= TARGET_OVERHEAD)}  trainer default / {same} (same precision): {overhead:.2f}x "
          f"(target >= {TARGET_OVERHEAD:g}x; paired by round {paired:.2f}x); the trainer adds "
          f"{default['best_s'] - cases[same]['best_s']:.2f} s a step, {default['data_s']:.2f} s of it waiting for data")
    for freeze in FREEZE_CASES[1:]:
        print(f"      freeze {freeze}: {samples[f'trainer default, freeze {freeze}'] / samples['trainer default']:.2f}x "
              f"the trainer's unfrozen speed")
    if eer:
        fp32_run, default_run = eer
        # One binomial standard error of the fp32 EER over the target trials: the noise of so small a test.
        tolerance = (fp32_run["final_eer"] * (1 - fp32_run["final_eer"]) / fp32_run["target_trials"]) ** 0.5
        print(f"{verdict(default_run['final_eer'] <= fp32_run['final_eer'] + tolerance)}  validation EER after "
              f"{default_run['steps']} steps (m_channels 8, digit set, {fp32_run['trials']} trials, {fp32_run['target_trials']} target): "
              f"{default_run['precision']} {default_run['final_eer']:.2%} vs fp32 {fp32_run['final_eer']:.2%} "
              f"(not worse by more than {tolerance:.2%}, one standard error); best {default_run['best_eer']:.2%} vs "
              f"{fp32_run['best_eer']:.2%}; initial {default_run['initial_eer']:.2%} vs {fp32_run['initial_eer']:.2%}; "
              f"{default_run['seconds']:.0f} s vs {fp32_run['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="eres2netv2", choices=VARIANTS, help="model of the speed cases")
    parser.add_argument("--batch-size", type=int, default=8, help="crops per step (default 8)")
    parser.add_argument("--crop-seconds", type=float, default=3.0, help="crop length in seconds (default 3)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per speed case (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--skip-eer", action="store_true", help="leave out the two short EER runs")
    parser.add_argument("--eer-steps", type=int, default=40, help="steps of each EER run (default 40)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure_speed(args) if args.child[0] == "speed" else measure_eer(args, args.child[1])
        print(json.dumps(result))
        return
    if not MANIFEST.is_file() or not DIGITS.is_dir():
        sys.exit(f"real speech not found under {SPEECH.parent}; this benchmark needs ../shared/data beside the checkout")
    speed = child(args, "speed")
    eer = [] if args.skip_eer else [child(args, "eer", "fp32"), child(args, "eer", "auto")]
    report(args, speed, eer)


if __name__ == "__main__":
    main()
