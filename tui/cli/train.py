"""``spkft train``: fine-tune from a YAML config and/or flags, with a live progress bar."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from spkft.core.train import (
    ConfigError,
    EpochEnded,
    Event,
    PhaseStarted,
    RunFinished,
    RunStarted,
    StepEnded,
    Trainer,
    TrainConfig,
    Validated,
    load_config,
)
from spkft.core.catalogue import released
from spkft.core.train.config import FREEZE_PRESETS, yaml_problem
from spkft.core.train.plausible import implausible
from spkft.core.train.recipes import resolve_recipe
from spkft.tui.cli.models import fetch_shown

# What may change when a run is resumed: how long it goes on and where it runs, not what it learns.
RESUMABLE_CHANGES = {"run.epochs", "run.patience", "run.device", "run.num_workers"}
PATH_KEYS = {"data.train", "data.val", "data.trials", "data.test", "data.rehearsal", "model.init", "augment.noise_dir",
             "augment.rir_dir", "run.output_dir"}


def _model_args(pairs: list[str]) -> dict[str, Any]:
    args = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--model-arg")
        try:
            args[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError([f"--model-arg {pair!r}: the value is not a plain YAML value ({yaml_problem(exc)})"]) from None
    return args


def _freeze(value: Optional[str]):
    if value is None or value in FREEZE_PRESETS:
        return value
    return [s.strip() for s in value.split(",") if s.strip()]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "args":
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class ProgressView:
    """Turns trainer events into a rich progress bar and one line per epoch."""

    def __init__(self, console: Console, config: TrainConfig) -> None:
        self.console = console
        self.config = config
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1%}  lr {task.fields[lr]:.2e}"),
            TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
            console=console, transient=False,
        )
        self.task = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.console.print(
                f"training on {event.train_recordings} recordings of {event.train_speakers} speakers "
                f"({event.num_classes} classes), validating on {event.val_trials} trials; "
                f"{event.device}, {event.precision}, {event.world_size} process(es); run dir {event.run_dir}"
            )
            if event.recipe:
                self.console.print(event.recipe)
            for key, reason in implausible(self.config, event.train_recordings).items():
                self.console.print(f"warning: {key}: {reason}", markup=False)
            for line in event.parameters:
                self.console.print("  " + line)
            total = event.epochs * event.steps_per_epoch
            self.progress.start()
            self.task = self.progress.add_task("train", total=total, completed=event.start_epoch * event.steps_per_epoch,
                                               epoch=f"{event.start_epoch + 1}/{event.epochs}", loss=0.0, acc=0.0,
                                               lr=0.0, eta="?")
        elif isinstance(event, Validated):
            self.console.print(f"before training: val EER {event.val_eer:.2%}  minDCF {event.val_min_dcf:.3f}")
        elif isinstance(event, PhaseStarted):
            self.console.print(f"epoch {event.epoch}: {event.description}")
        elif isinstance(event, StepEnded) and self.task is not None:
            minutes, seconds = divmod(int(event.eta_seconds), 60)
            self.progress.update(self.task, completed=event.global_step, epoch=f"{event.epoch}", loss=event.loss,
                                 acc=event.accuracy, lr=event.lr, eta=f"{minutes}:{seconds:02d}")
        elif isinstance(event, EpochEnded):
            mark = " *" if event.is_best else ""
            wait = (f"  no improvement for {event.epochs_without_improvement}/{event.patience}"
                    if event.patience and event.epochs_without_improvement else "")
            self.console.print(
                f"epoch {event.epoch}/{event.epochs}  loss {event.train_loss:.3f}  acc {event.train_accuracy:.1%}  "
                f"val EER {event.val_eer:.2%}  minDCF {event.val_min_dcf:.3f}  "
                f"best {event.best_eer:.2%} (epoch {event.best_epoch}){mark}{wait}  [{event.seconds:.0f} s]"
            )
        elif isinstance(event, RunFinished):
            self.progress.stop()
            how = {"completed": "finished", "early_stopped": "stopped early (no better validation EER)",
                   "cancelled": "cancelled; the last completed epoch is kept"}[event.reason]
            self.console.print(f"training {how}. validation EER {event.initial_eer:.2%} before, "
                               f"best {event.best_eer:.2%} at epoch {event.best_epoch}")
            if event.best_eer >= event.initial_eer:
                self.console.print("no epoch beat the starting model on validation: keep using it, or try a lower "
                                   "learning rate, more freezing (--freeze early|encoder) or more data")
            if event.best_checkpoint:
                self.console.print(f"best checkpoint: {event.best_checkpoint}")
            if event.average_checkpoint:
                self.console.print(
                    f"average of epochs {', '.join(map(str, event.average_epochs))} ({event.average}): val EER "
                    f"{event.average_eer:.2%} against {event.best_eer:.2%} for the best epoch ({event.best_epoch}); "
                    f"{event.average_checkpoint}")
            elif event.average_skipped:
                self.console.print(f"no average ({event.average}): {event.average_skipped}")
            if event.report:
                self.console.print(f"report: {Path(event.run_dir) / 'report'}")


def train(
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML config; flags override its values.")] = None,
    train_source: Annotated[Optional[Path], typer.Option("--train", help="Training data source.")] = None,
    val_source: Annotated[Optional[Path], typer.Option("--val", help="Validation source (default: held-out speakers).")] = None,
    trials: Annotated[Optional[Path], typer.Option("--trials", help="Validation trial list.")] = None,
    init: Annotated[Optional[Path], typer.Option(
        "--init", help="Pretrained checkpoint to fine-tune: a released model's name (spkft models list; downloaded "
                       "on first use) or a file.")] = None,
    rehearsal: Annotated[Optional[Path], typer.Option(
        "--rehearsal", help="Labelled recordings of the domain the pretrained model knows, rehearsed in every batch "
                            "so it is not forgotten.")] = None,
    rehearsal_fraction: Annotated[Optional[float], typer.Option(
        "--rehearsal-fraction", help="Share of every batch drawn from --rehearsal (default 0.25).")] = None,
    distill: Annotated[Optional[float], typer.Option(
        "--distill", help="Weight of the pull toward the pretrained model's embeddings (0 = off).")] = None,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", help="auto, linear-probe, partial or full: fills in every knob not set otherwise.")] = None,
    variant: Annotated[Optional[str], typer.Option("--variant", help="Model variant.")] = None,
    model_arg: Annotated[list[str], typer.Option("--model-arg", help="Model constructor override KEY=VALUE (repeatable).")] = [],  # noqa: B006
    freeze: Annotated[Optional[str], typer.Option("--freeze", help="none, early, encoder, or stages like stem,layer1.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.")] = None,
    crop_seconds: Annotated[Optional[float], typer.Option("--crop-seconds")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Run directory.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the output dir from its last checkpoint.")] = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config and exit.")] = False,
) -> None:
    """Fine-tune ERes2NetV2 on labelled recordings, validating EER every epoch."""
    overrides = {
        "recipe": recipe, "data.train": train_source, "data.val": val_source, "data.trials": trials, "model.init": init,
        "data.rehearsal": rehearsal, "data.rehearsal_fraction": rehearsal_fraction, "freeze.distill": distill,
        "model.variant": variant, "model.args": _model_args(model_arg) or None, "freeze.stages": _freeze(freeze),
        "run.epochs": epochs, "run.batch_size": batch_size, "optim.lr": lr, "augment.crop_seconds": crop_seconds,
        "run.output_dir": output_dir, "run.device": device, "run.seed": seed,
    }
    if resume:
        resolved = _resume_config(config, output_dir, overrides)
    else:
        resolved = load_config(config, overrides)
    resolved, choice = resolve_recipe(resolved)
    if print_config:
        if choice is not None:
            typer.echo(f"# {choice.line()}")
        typer.echo(resolved.to_yaml(), nl=False)
        return
    entry = released(resolved.model.init)
    if entry is not None:  # fetched before the run starts, with its own progress
        fetch_shown(entry)
    stop = threading.Event()
    console = Console(stderr=True)
    previous = signal.getsignal(signal.SIGINT)

    def interrupt(signum, frame):
        if stop.is_set():  # a second Ctrl-C stops at once
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        console.print("stopping after this step (Ctrl-C again to abort)")
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, interrupt)
    try:
        finished = Trainer(resolved, sink=ProgressView(console, resolved), stop=stop, resume=resume).run()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    if finished.reason == "cancelled":
        raise typer.Exit(130)


def _resume_config(config: Optional[Path], output_dir: Optional[Path], overrides: dict[str, Any]):
    if config is None and output_dir is None:
        raise typer.BadParameter("--resume needs the run's --output-dir (or its --config)", param_hint="--resume")
    first = resolve_recipe(load_config(config, overrides))[0] if config is not None else None
    run_dir = output_dir or first.run.output_dir
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError([f"run.output_dir: {saved_path} does not exist; nothing to resume"])
    saved = load_config(saved_path)
    resolved, _ = resolve_recipe(load_config(saved_path, {k: v for k, v in overrides.items() if v is not None} | (
        _flatten(first.model_dump(mode="json")) if first is not None else {})))
    before, after = _flatten(saved.model_dump(mode="json")), _flatten(resolved.model_dump(mode="json"))
    changed = sorted(k for k in before if not _same(k, before[k], after[k]) and k not in RESUMABLE_CHANGES)
    if changed:
        raise ConfigError([f"{k}: cannot change when resuming ({before[k]!r} -> {after[k]!r})" for k in changed])
    return resolved


def _same(key: str, saved: Any, given: Any) -> bool:
    """Equal values; paths are equal when they name the same file or folder (runs/x and /home/me/runs/x)."""
    if saved == given:
        return True
    if key in PATH_KEYS and saved is not None and given is not None:
        return Path(saved).expanduser().resolve() == Path(given).expanduser().resolve()
    return False


def register(app: typer.Typer) -> None:
    app.command()(train)
