"""The fine-tuning run: check everything, set up, train with validation each epoch, save, clean up.

``Trainer(config).run()`` is the whole life of a run (``__init__`` fails early on a bad config,
``setup`` builds data, model, head and optimiser, ``train`` loops over epochs, ``cleanup`` leaves
the process group). It runs alone or under ``torchrun`` (DDP) unchanged; only rank 0 validates,
writes files and emits events.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from spkft.core.average import average_checkpoints
from spkft.core.checkpoint import embedding_checkpoint, load_model, model_from_checkpoint, read_checkpoint
from spkft.core.data import ScanReport, Split, make_trials, read_trials, scan, segment, split_sources
from spkft.core.embedding import Embedder
from spkft.core.errors import CheckpointError, SpkftError, first_line
from spkft.core.evaluate import embed_recordings, evaluate
from spkft.core.model import DEFAULT_VARIANT, build_model
from spkft.core.records import Recording, Trial
from spkft.core.report import write_report
from spkft.core.train.config import TrainConfig, check_paths
from spkft.core.train.dataset import CropDataset, EpochSampler, MixedEpochSampler
from spkft.core.train.events import (
    EpochEnded,
    EventSink,
    PhaseStarted,
    RunFinished,
    RunStarted,
    StepEnded,
    Validated,
    ignore,
)
from spkft.core.train.freeze import apply_freezing, hold_frozen_batchnorm, summarise
from spkft.core.train.head import AAMSoftmaxHead
from spkft.core.train.recipes import resolve_recipe
from spkft.core.train.runtime import Distributed, autocast, lr_factor, pick_device, pick_channels_last, pick_precision
from spkft.core.train.snapshots import EpochSnapshots

ALL_ENCODER = ("stem", "layer1", "layer2", "layer3", "layer4", "layer3_ds", "fuse34", "seg_1")
# The head's class names for rehearsed speakers: apart from the user's, whatever the two sources call them.
REHEARSAL_PREFIX = "rehearsal:"
# A rehearsed speaker's head row starts as the starting model's mean embedding of this many of its
# recordings, each cut to at most this many seconds.
IMPRINT_RECORDINGS, IMPRINT_SECONDS = 2, 4.0


def split_data(config: TrainConfig) -> tuple[Split, dict[str, ScanReport]]:
    """The run's training, validation and test recordings, and the scan report of each source."""
    data = config.data
    return split_sources(
        data.train, val_source=data.val, test_source=data.test, val=data.val_speakers, test=data.test_speakers,
        seed=config.run.seed, min_recordings_per_speaker=data.min_recordings_per_speaker,
    )


def validation_trials(config: TrainConfig, split: Split) -> tuple[list[Recording], list[Trial]]:
    """The recordings the run validates on (segmented unless a trial list names them) and its trials."""
    data = config.data
    if data.trials is not None:
        recordings, trials = list(split.val), read_trials(data.trials)
    else:
        recordings = segment(split.val, data.segment_seconds)
        trials = make_trials(recordings, seed=config.run.seed, max_target=data.max_trials // 2,
                             max_nontarget=data.max_trials // 2)
    if not any(t.target for t in trials) or all(t.target for t in trials):
        raise SpkftError("the validation trials need both same-speaker and different-speaker pairs; "
                         "hold out more speakers (data.val_speakers) or give data.val")
    return recordings, trials


def rehearsal_recordings(config: TrainConfig) -> list[Recording]:
    """The recordings ``data.rehearsal`` lists, each speaker renamed into the rehearsal classes."""
    source = config.data.rehearsal
    if source is None:
        return []
    recordings = scan(source, min_recordings_per_speaker=config.data.min_recordings_per_speaker).recordings
    if not recordings:
        raise SpkftError(f"data.rehearsal: {source} has no usable recordings")
    return [dataclasses.replace(r, speaker=REHEARSAL_PREFIX + r.speaker) for r in recordings]


def distillation_loss(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """How far each embedding has turned from the starting model's for the same crop: the mean of
    1 - cosine. Zero where they point the same way, whatever their lengths."""
    return (1.0 - F.cosine_similarity(embeddings.float(), reference.float(), dim=1)).mean()


class TrainingDiverged(SpkftError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class _Classifier(nn.Module):
    """Embedding model and head as one module, so DDP synchronises both."""

    def __init__(self, model: nn.Module, head: AAMSoftmaxHead) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, features: torch.Tensor, labels: torch.Tensor):
        embeddings = self.model(features)
        loss, cos = self.head(embeddings, labels)
        return loss, cos, embeddings


# What last.ckpt holds beyond best.ckpt of the same epoch (Trainer._state with the optimiser, and
# the epoch's metrics line): best.ckpt is last.ckpt without these.
RESUME_ONLY_KEYS = ("optimizer", "scaler", "rng", "snapshots", "epoch_record")
# Free space under which a failed write is taken for a full disk: torch reports ENOSPC as an
# "enforce fail" RuntimeError of its zip writer, without the errno.
FULL_DISK_BYTES = 64 << 20


def _save_atomically(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` through a temporary file, so ``path`` is always whole: the old file
    or the new one. A failed write removes its partial file and says why in one line."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or _free_bytes(path.parent) < FULL_DISK_BYTES
        reason = "no space left on device" if full else first_line(exc)
        raise SpkftError(f"cannot write {path}: {reason}; the partial file was removed and the checkpoints "
                         "written before are intact") from None


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


class Trainer:
    def __init__(self, config: TrainConfig, sink: EventSink | None = None,
                 stop: threading.Event | None = None, resume: bool = False) -> None:
        check_paths(config)
        config, self.recipe = resolve_recipe(config)
        self.config = config
        self.sink = sink if sink is not None else ignore
        self.stop = stop if stop is not None else threading.Event()
        self.resume = resume
        self.run_dir = Path(config.run.output_dir)
        self.snapshots = EpochSnapshots.from_config(self.run_dir, config.run)  # None unless averaging
        self.dist = Distributed.from_environment()
        last = self.run_dir / "last.ckpt"
        if resume and not last.is_file():
            raise SpkftError(f"nothing to resume: {last} does not exist")
        if not resume and last.exists():
            raise SpkftError(f"{self.run_dir} already holds a run; continue it with --resume or choose another output dir")

    # ----------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.config
        self.device = self.dist.init(pick_device(cfg.run.device))
        self.precision = pick_precision(cfg.run.precision, self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise SpkftError("fp16 training needs a CUDA device; use bf16 or fp32 on the CPU")
        self._setup_data()
        self._setup_model()
        self._setup_optimisation()
        self.start_epoch, self.global_step = 0, 0
        self.best_eer, self.best_epoch, self.stale_epochs = math.inf, 0, 0
        self.initial_eer = math.nan
        self.evaluation: dict[str, Any] | None = None  # the latest validation, saved with its checkpoints
        if self.resume:
            self._restore(read_checkpoint(self.run_dir / "last.ckpt"))
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
            (self.run_dir / "labels.json").write_text(json.dumps(self.speakers + self.rehearsal_speakers, indent=0))

    def _setup_data(self) -> None:
        cfg = self.config
        split, self.scan_reports = split_data(cfg)
        self.split = split
        self.speakers = sorted({r.speaker for r in split.train})
        if len(self.speakers) < 2:
            raise SpkftError(f"training needs at least 2 speakers, found {len(self.speakers)}")
        self.val_recordings, self.val_trials = validation_trials(cfg, split)
        rehearsed = self.rehearsed = rehearsal_recordings(cfg)
        self.rehearsal_speakers = sorted({r.speaker for r in rehearsed})
        labels = {s: i for i, s in enumerate(self.speakers + self.rehearsal_speakers)}
        self.dataset = CropDataset(list(split.train) + rehearsed, labels, cfg.augment, seed=cfg.run.seed)
        per_step = cfg.run.batch_size * cfg.optim.grad_accum
        self.steps_per_epoch = cfg.run.steps_per_epoch or max(1, len(split.train) // (per_step * self.dist.world_size))
        if rehearsed:
            self.sampler = MixedEpochSampler(len(split.train), len(rehearsed), cfg.data.rehearsal_fraction,
                                             cfg.run.batch_size, self.steps_per_epoch * cfg.optim.grad_accum,
                                             cfg.run.seed, self.dist.rank, self.dist.world_size)
        else:
            self.sampler = EpochSampler(len(self.dataset), self.steps_per_epoch * per_step, cfg.run.seed,
                                        self.dist.rank, self.dist.world_size)
        # Workers start afresh each epoch: persistent ones would keep the dataset's first epoch, and so its crops.
        self.loader = DataLoader(self.dataset, batch_size=cfg.run.batch_size, sampler=self.sampler,
                                 num_workers=cfg.run.num_workers, drop_last=True)

    def _setup_model(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.run.seed)
        if cfg.model.init is not None:
            loaded = load_model(cfg.model.init, variant=cfg.model.variant, **cfg.model.args)
            self.model, self.variant = loaded.model, loaded.variant
            self.teacher = self._frozen_copy(self.model) if cfg.freeze.distill > 0 else None
        else:
            self.teacher = None
            self.variant = cfg.model.variant or DEFAULT_VARIANT
            self.model = build_model(self.variant, **cfg.model.args)
        self.head = AAMSoftmaxHead(self.model.config.embedding_size, self.dataset.num_classes,
                                   scale=cfg.head.scale, margin=0.0, label_smoothing=cfg.head.label_smoothing)
        if self.rehearsed and cfg.model.init is not None and not self.resume:
            self._imprint_rehearsal_classes()
        if cfg.head.stats_dropout > 0:
            p = cfg.head.stats_dropout
            self.model.seg_1.register_forward_pre_hook(lambda m, args: (F.dropout(args[0], p, m.training),))
        self.frozen = self.config.freeze.frozen_stages()
        apply_freezing(self.model, self.frozen)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.anchor = ([p.detach().clone() for p in self.trainable]
                       if cfg.freeze.l2_sp > 0 and cfg.model.init is not None else None)
        self.channels_last = pick_channels_last(cfg.run.channels_last, self.device, self.model.config.m_channels)
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.model.to(self.device, memory_format=memory_format)
        self.head.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device, memory_format=memory_format)
        if self.anchor is not None:
            self.anchor = [a.to(self.device) for a in self.anchor]
        self.classifier = _Classifier(self.model, self.head)

    def _imprint_rehearsal_classes(self) -> None:
        """Start each rehearsed speaker's head row at the pretrained model's mean embedding of the
        speaker, at the length of the randomly started rows.

        The pretrained model already tells these speakers apart; random rows would make their
        crops' loss large at once and pull the encoder off what it knew before the rows settle.
        """
        chosen: dict[str, list[Recording]] = {}
        for recording in self.rehearsed:
            picked = chosen.setdefault(recording.speaker, [])
            if len(picked) < IMPRINT_RECORDINGS:
                stop = recording.start_seconds + IMPRINT_SECONDS
                if recording.stop_seconds is not None:
                    stop = min(stop, recording.stop_seconds)
                picked.append(dataclasses.replace(recording, stop_seconds=stop))
        recordings = [r for picked in chosen.values() for r in picked]
        vectors = embed_recordings(Embedder(copy.deepcopy(self.model), self.device), recordings)
        own = len(self.speakers)
        classes = own + len(self.rehearsal_speakers)
        with torch.no_grad():
            length = self.head.weight[:own].norm(dim=1).mean()  # the user's speakers' rows
            for index, speaker in enumerate(self.rehearsal_speakers, start=own):
                mean = torch.from_numpy(np.mean([vectors[r.utt_id] for r in chosen[speaker]], axis=0))
                row = F.normalize(mean.float(), dim=0) * length
                self.head.weight[index::classes] = row  # the same speaker at every speed of speed perturbation

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        """The starting model, kept for distillation: no gradients, and batch norm that never
        updates its running statistics. In training mode it normalises with each batch's
        statistics, as the unfrozen stages of the model in training do (frozen stages use their
        running statistics in both: see :meth:`_set_train_mode`)."""
        teacher = copy.deepcopy(model)
        teacher.requires_grad_(False)
        teacher.train()
        for module in teacher.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.0
        return teacher

    def _setup_optimisation(self) -> None:
        opt = self.config.optim
        groups = [{"params": self.trainable, "lr": opt.lr * self.config.freeze.backbone_lr_scale, "peak": opt.lr * self.config.freeze.backbone_lr_scale},
                  {"params": list(self.head.parameters()), "lr": opt.lr, "peak": opt.lr}]
        groups = [g for g in groups if g["params"]]
        if opt.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum,
                                             nesterov=opt.nesterov and opt.momentum > 0, weight_decay=opt.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=opt.lr, weight_decay=opt.weight_decay)
        self.total_steps = self.config.run.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(opt.warmup_epochs * self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    # ------------------------------------------------------------------------------ training
    def run(self) -> RunFinished:
        """Set up, train, clean up; the returned event says how the run ended."""
        try:
            self.setup()
            return self.train()
        finally:
            self.cleanup()

    def train(self) -> RunFinished:
        cfg = self.config
        if self.dist.is_main:
            self.sink(RunStarted(
                run_dir=str(self.run_dir), epochs=cfg.run.epochs, steps_per_epoch=self.steps_per_epoch,
                start_epoch=self.start_epoch, train_recordings=len(self.split.train),
                train_speakers=len(self.speakers), num_classes=self.dataset.num_classes,
                val_trials=len(self.val_trials), device=str(self.device), precision=self.precision,
                world_size=self.dist.world_size, parameters=summarise(self.model, self.frozen).lines(),
                recipe=self.recipe.line() if self.recipe is not None else None,
            ))
        if self.start_epoch == 0:
            self._record_initial()
        started = time.monotonic()
        steps_done_here = 0
        reason = "completed"
        for epoch in range(self.start_epoch, cfg.run.epochs):
            wrapped = self._enter_phase(epoch)
            epoch_start = time.monotonic()
            train_loss, train_acc, steps_done_here = self._train_epoch(epoch, wrapped, started, steps_done_here)
            if self._stop_requested():
                reason = "cancelled"
                break
            eer, min_dcf = self._validate()
            is_best = eer < self.best_eer
            if is_best:
                self.best_eer, self.best_epoch, self.stale_epochs = eer, epoch + 1, 0
            else:
                self.stale_epochs += 1
            record = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc, "val_eer": eer,
                      "val_min_dcf": min_dcf, "lr": self.optimizer.param_groups[-1]["lr"],
                      "margin": self.head.margin, "seconds": time.monotonic() - epoch_start}
            self._save(epoch + 1, is_best, eer, record)
            if self.dist.is_main:
                with (self.run_dir / "metrics.jsonl").open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                self.sink(EpochEnded(epoch + 1, cfg.run.epochs, train_loss, train_acc, eer, min_dcf, self.best_eer,
                                     self.best_epoch, is_best, self.stale_epochs, cfg.run.patience,
                                     record["seconds"]))
            if cfg.run.patience is not None and self.stale_epochs >= cfg.run.patience:
                reason = "early_stopped"
                break
        report = self._final_report() if reason != "cancelled" and self.dist.is_main else None
        average = self._average() if reason != "cancelled" and self.dist.is_main else {}
        best = self.run_dir / "best.ckpt"
        finished = RunFinished(reason, str(self.run_dir), self.initial_eer, self.best_epoch, self.best_eer,
                               str(best) if best.exists() else None, report, **average)
        if self.dist.is_main:
            self.sink(finished)
        return finished

    def _record_initial(self) -> None:
        """Validate the starting model, so every run shows where it began (epoch 0)."""
        eer, min_dcf = self._validate()
        self.initial_eer = eer
        if self.dist.is_main:
            (self.run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "val_eer": eer, "val_min_dcf": min_dcf}) + "\n")
            self.sink(Validated(0, eer, min_dcf))

    def _enter_phase(self, epoch: int) -> nn.Module:
        """Freeze for this epoch's phase and return the module to step (DDP-wrapped when distributed)."""
        head_only = epoch < self.config.freeze.head_only_epochs
        for p in self.trainable:
            p.requires_grad_(not head_only)
        if self.dist.is_main and (epoch == self.start_epoch or epoch == self.config.freeze.head_only_epochs):
            if head_only:
                text = f"phase 1: only the new head trains until epoch {self.config.freeze.head_only_epochs}"
            else:
                tuned = [s for s in ALL_ENCODER if s not in self.frozen]
                text = (f"{'phase 2: ' if self.config.freeze.head_only_epochs else ''}training the head and "
                        f"{', '.join(tuned) or 'no encoder stage'} at {self.config.freeze.backbone_lr_scale:g}x lr")
            self.sink(PhaseStarted(epoch + 1, text))
        if not self.dist.enabled:
            return self.classifier
        # DDP registers gradient hooks for the parameters that need grad when it is built.
        return DistributedDataParallel(self.classifier, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _stop_requested(self) -> bool:
        """True once any rank was asked to stop, so that all ranks stop at the same step."""
        return bool(self.dist.all_sum([1.0 if self.stop.is_set() else 0.0])[0])

    def _set_train_mode(self, head_only: bool) -> None:
        self.classifier.train()
        held = ALL_ENCODER if head_only else self.frozen
        hold_frozen_batchnorm(self.model, held)
        if self.teacher is not None:
            # The same normalisation as the model in training, stage by stage, so that the two agree
            # exactly until the weights move.
            self.teacher.train()
            hold_frozen_batchnorm(self.teacher, held)

    def _margin(self, epoch_progress: float) -> float:
        head = self.config.head
        if head.margin_schedule == "constant" or head.margin_warmup_epochs == 0:
            return head.margin
        return head.margin * min(1.0, epoch_progress / head.margin_warmup_epochs)

    def _train_epoch(self, epoch: int, wrapped: nn.Module, started: float, steps_done_here: int):
        cfg = self.config
        accum = cfg.optim.grad_accum
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        torch.manual_seed(cfg.run.seed * 1_000_003 + epoch)  # dropout draws: the same on resume
        head_only = epoch < cfg.freeze.head_only_epochs
        self._set_train_mode(head_only)
        totals = [0.0, 0.0, 0.0]  # loss sum, correct, samples (this epoch, all ranks)
        batches = iter(self.loader)
        for step in range(self.steps_per_epoch):
            if self._stop_requested():
                break
            for group in self.optimizer.param_groups:
                group["lr"] = group["peak"] * lr_factor(self.global_step, self.total_steps, self.warmup_steps,
                                                        cfg.optim.schedule, cfg.optim.min_lr_ratio)
            self.head.margin = self._margin(epoch + step / self.steps_per_epoch)
            loss_sum, correct, count = 0.0, 0.0, 0
            for _ in range(accum):
                features, labels = next(batches)
                features = features.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                with autocast(self.device, self.precision):
                    loss, cos, embeddings = wrapped(features, labels)
                    if self.teacher is not None and not head_only:
                        with torch.no_grad():
                            reference = self.teacher(features)
                        loss = loss + cfg.freeze.distill * distillation_loss(embeddings, reference)
                if self.anchor is not None and not head_only:
                    loss = loss + 0.5 * cfg.freeze.l2_sp * sum(((p - a) ** 2).sum() for p, a in zip(self.trainable, self.anchor))
                self.scaler.scale(loss / accum).backward()
                loss_sum += loss.item() * len(labels)
                correct += (cos.argmax(dim=1) == labels).sum().item()
                count += len(labels)
            self.scaler.unscale_(self.optimizer)
            if cfg.optim.grad_clip is not None:
                nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.optim.grad_clip)
            loss_sum, correct, count, bad = self.dist.all_sum([loss_sum, correct, count, 0.0 if math.isfinite(loss_sum) else 1.0])
            if bad:
                raise TrainingDiverged(
                    f"the loss became {'NaN' if math.isnan(loss_sum) else 'infinite'} at epoch {epoch + 1}, step {step + 1}; "
                    f"stopped without saving it. The last good checkpoint is {self.run_dir / 'last.ckpt'}: "
                    "lower the learning rate (optim.lr) or enable gradient clipping (optim.grad_clip)"
                )
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            steps_done_here += 1
            totals = [totals[0] + loss_sum, totals[1] + correct, totals[2] + count]
            if self.dist.is_main:
                elapsed = time.monotonic() - started
                remaining = self.total_steps - self.global_step
                self.sink(StepEnded(epoch + 1, step + 1, self.steps_per_epoch, self.global_step, loss_sum / count,
                                    correct / count, self.optimizer.param_groups[-1]["lr"], self.head.margin,
                                    elapsed / steps_done_here * remaining))
        return totals[0] / max(1.0, totals[2]), totals[1] / max(1.0, totals[2]), steps_done_here

    # ---------------------------------------------------------------------------- validation
    def _validate(self) -> tuple[float, float]:
        """Validation EER and minDCF (rank 0 measures; every rank learns the result)."""
        result = [math.nan, math.nan]
        if self.dist.is_main:
            metrics = self._evaluate_current().metrics
            result = [metrics.eer, metrics.min_dcf]
            self.evaluation = metrics.to_dict() | {"data": "validation"}
        if self.dist.enabled:
            result = self.dist.all_sum(result if self.dist.is_main else [0.0, 0.0])
        return result[0], result[1]

    def _evaluate_current(self):
        model = self.model
        try:
            embedder = Embedder(model, self.device)  # puts the model in eval mode
            return evaluate(embedder, self.val_recordings, self.val_trials)
        finally:
            model.train()

    def _final_report(self) -> dict[str, Any] | None:
        """Evaluate the best checkpoint on the validation trials and write the run's report."""
        best = self.run_dir / "best.ckpt"
        if not best.exists():
            return None
        embedder = Embedder(load_model(best).model, self.device)
        evaluation = evaluate(embedder, self.val_recordings, self.val_trials)
        write_report(self.run_dir / "report", evaluation.metrics, evaluation.scores, evaluation.labels,
                     evaluation.trials)
        return evaluation.metrics.to_dict()

    def _average(self) -> dict[str, Any]:
        """Average the chosen epochs' snapshots into average.ckpt and validate it; the RunFinished fields."""
        snapshots = self.snapshots
        if snapshots is None:
            return {}
        epochs = [s.epoch for s in snapshots.kept]
        if len(epochs) < 2:
            return {"average": snapshots.description,
                    "average_skipped": f"only {len(epochs)} epoch(s) to average, and an average needs at least 2"}
        checkpoint = average_checkpoints([snapshots.path(e) for e in epochs])
        model = model_from_checkpoint(checkpoint, "the averaged weights", device=self.device).model
        metrics = evaluate(Embedder(model, self.device), self.val_recordings, self.val_trials).metrics
        checkpoint |= {"evaluation": metrics.to_dict() | {"data": "validation"}, "speakers": self.speakers,
                       "config": self.config.model_dump(mode="json")}
        path = self.run_dir / "average.ckpt"
        _save_atomically(checkpoint, path)
        record = {"average": snapshots.description, "epochs": epochs, "val_eer": metrics.eer,
                  "val_min_dcf": metrics.min_dcf}
        with (self.run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        return {"average": snapshots.description, "average_epochs": tuple(epochs), "average_checkpoint": str(path),
                "average_eer": metrics.eer}

    # --------------------------------------------------------------------------- checkpoints
    def _state(self, epoch: int, with_optimiser: bool) -> dict[str, Any]:
        """A checkpoint's training state; ``with_optimiser`` adds the resume state (:data:`RESUME_ONLY_KEYS`)."""
        state = {
            "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "speakers": self.speakers,
            "rehearsal_speakers": self.rehearsal_speakers,
            "epoch": epoch,
            "global_step": self.global_step,
            "best_eer": self.best_eer,
            "best_epoch": self.best_epoch,
            "stale_epochs": self.stale_epochs,
            "initial_eer": self.initial_eer,
            "evaluation": self.evaluation,
            "config": self.config.model_dump(mode="json"),
        }
        if with_optimiser:
            state |= {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                      "rng": {"torch": torch.get_rng_state()}}
            if self.snapshots is not None:
                state["snapshots"] = self.snapshots.state()
        return state

    def _save(self, epoch: int, is_best: bool, eer: float, record: dict[str, Any]) -> None:
        """Write the epoch's files so that a kill between any two writes leaves a run that resumes
        exactly: last.ckpt is the record of the run, and carries what the other files must say.

        Order: the averaging snapshot, then last.ckpt (with the epoch's metrics line), then
        best.ckpt, then the metrics line (by the caller). Each write is atomic. A kill after
        last.ckpt leaves best.ckpt or the metrics line behind it; resume re-derives both from
        last.ckpt (see :meth:`_reconcile`).
        """
        if not self.dist.is_main:
            self.dist.barrier()
            return
        model = copy.deepcopy(self.model).float().to(memory_format=torch.contiguous_format)
        dropped = []
        if self.snapshots is not None:
            # The snapshot exists before last.ckpt records it; files it displaces go only after.
            keep, dropped = self.snapshots.offer(epoch, eer)
            if keep:
                self.snapshots.directory.mkdir(parents=True, exist_ok=True)
                _save_atomically(embedding_checkpoint(model, self.variant, epoch=epoch, evaluation=self.evaluation),
                                 self.snapshots.path(epoch))
        _save_atomically(embedding_checkpoint(model, self.variant, **self._state(epoch, True), epoch_record=record),
                         self.run_dir / "last.ckpt")
        if is_best:
            _save_atomically(embedding_checkpoint(model, self.variant, **self._state(epoch, False)), self.run_dir / "best.ckpt")
        for path in dropped:
            path.unlink(missing_ok=True)
        self.dist.barrier()

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        # Checked before any state is loaded: other speakers make a head of another shape.
        if checkpoint["speakers"] != self.speakers:
            raise SpkftError("cannot resume: the training speakers differ from the interrupted run's")
        if checkpoint.get("rehearsal_speakers", []) != self.rehearsal_speakers:
            raise SpkftError("cannot resume: the rehearsed speakers (data.rehearsal) differ from the interrupted run's")
        model_state = {k: v for k, v in checkpoint["model"].items()}
        self.model.load_state_dict(model_state)
        self.head.load_state_dict(checkpoint["head"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        self.start_epoch = checkpoint["epoch"]
        self.global_step = checkpoint["global_step"]
        self.best_eer = checkpoint["best_eer"]
        self.best_epoch = checkpoint["best_epoch"]
        self.stale_epochs = checkpoint["stale_epochs"]
        self.initial_eer = checkpoint["initial_eer"]
        if self.dist.is_main:
            self._reconcile(checkpoint)
            (self.run_dir / "average.ckpt").unlink(missing_ok=True)
        if self.snapshots is not None:
            self.snapshots.restore(checkpoint.get("snapshots", []), delete_others=self.dist.is_main)

    def _reconcile(self, last: dict[str, Any]) -> None:
        """Make best.ckpt and metrics.jsonl agree with last.ckpt after a kill at any point of an epoch's writes."""
        epoch, best_epoch = last["epoch"], last["best_epoch"]
        best = self.run_dir / "best.ckpt"
        if best_epoch == epoch and epoch > 0:
            # The last epoch was the best: its weights are last.ckpt's, whether or not best.ckpt was written.
            try:
                written = read_checkpoint(best).get("epoch") if best.is_file() else None
            except CheckpointError:  # unreadable: write it again
                written = None
            if written != epoch:
                _save_atomically({k: v for k, v in last.items() if k not in RESUME_ONLY_KEYS}, best)
        metrics = self.run_dir / "metrics.jsonl"
        lines = []
        for line in metrics.read_text().splitlines() if metrics.exists() else []:
            try:
                lines.append((line, json.loads(line)))
            except ValueError:  # a line cut short by the kill
                continue
        # Epochs after the checkpoint were lost with the process; they will be logged again. The
        # average's line (no "epoch") goes too: it is made again at the new end of the run.
        kept = [line for line, parsed in lines if parsed.get("epoch", math.inf) <= epoch]
        if last.get("epoch_record") is not None and not any(parsed.get("epoch") == epoch for _, parsed in lines):
            kept.append(json.dumps(last["epoch_record"]))  # killed between last.ckpt and the metrics line
        metrics.write_text("".join(line + "\n" for line in kept))

    def cleanup(self) -> None:
        self.dist.close()
