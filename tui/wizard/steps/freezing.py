"""Step 3: which stages of the network keep their weights, and the two-phase plan."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.reactive import reactive
from textual.widgets import Label, RadioButton, RadioSet, SelectionList, Static
from textual.widgets.selection_list import Selection

from spkft.core.train.config import FREEZE_PRESETS, STAGES
from spkft.tui.wizard.fields import Field, InputField
from spkft.tui.wizard.step import StepScreen

ROLES = {
    "stem": "3×3 conv on the fbank: local edges",
    "layer1": "low-level spectral texture",
    "layer2": "local pitch and formant patterns",
    "layer3": "speaker traits, sub-bands fused",
    "layer4": "the most abstract speaker traits",
    "layer3_ds": "brings layer3 to layer4's size",
    "fuse34": "fuses layer3 with layer4",
    "seg_1": "the embedding layer (192 numbers)",
}
# Bytes a trainable parameter needs beyond its weight: its gradient and the optimiser's state.
EXTRA_BYTES = {"sgd": 4 + 4, "adamw": 4 + 8}
CUSTOM = "custom"


def preset_of(frozen: tuple[str, ...]) -> str:
    return next((name for name, stages in FREEZE_PRESETS.items() if set(stages) == set(frozen)), CUSTOM)


def size(count: int) -> str:
    """Bytes in the unit that keeps the figure readable."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


class FreezeStep(StepScreen):
    NUMBER = 3
    HEADING = "Freezing: what fine-tuning may change"

    frozen: reactive[tuple[str, ...]] = reactive((), init=False)

    def compose_body(self) -> ComposeResult:
        yield Static("A frozen stage keeps its pretrained weights and BatchNorm statistics. Freezing more "
                     "protects what the model already knows, trains faster and needs less memory; freezing "
                     "less adapts more, and needs more data.", classes="intro")
        yield Static(self.recommendation(), id="advice", markup=False)
        with RadioSet(id="presets", classes="inline"):
            for name in (*FREEZE_PRESETS, CUSTOM):
                yield RadioButton(name, id=f"preset-{name}")
        yield Label("Frozen stages (space toggles)", classes="section")
        yield SelectionList[str](*self.selections(), id="stages")
        yield Static(id="total", markup=False)
        yield Label("Two-phase plan", classes="section")
        yield InputField(self.draft, "freeze.head_only_epochs", "Head-only epochs",
                         "Phase 1: only the new head learns while the encoder waits, so its random start "
                         "cannot pull the pretrained weights off course. 0 = one phase.")
        yield InputField(self.draft, "freeze.backbone_lr_scale", "Encoder lr scale",
                         "The unfrozen stages learn at this fraction of the learning rate (1 = the same).")
        yield InputField(self.draft, "freeze.l2_sp", "L2-SP weight", "Pulls tuned weights toward the pretrained "
                         "ones rather than toward zero (small data); 0 = off. Needs a pretrained checkpoint.",
                         id="l2-sp")
        yield Static(id="plan", markup=False)

    def selections(self) -> list[Selection[str]]:
        frozen = self.draft.config.freeze.frozen_stages()
        extra = EXTRA_BYTES[self.draft.config.optim.optimizer]
        counts = self.draft.model.stage_parameters
        return [
            Selection(f"{stage:<10}{counts[stage]:>10,}  saves {size(extra * counts[stage]):>8}  {ROLES[stage]}",
                      stage, stage in frozen)
            for stage in STAGES
        ]

    def recommendation(self) -> str:
        speakers = self.draft.train_speakers or 0
        if self.draft.config.model.init is None:
            return "A fresh model has nothing to protect: freeze nothing (preset none)."
        if speakers < 50:
            return (f"{speakers} training speakers is little: freeze the encoder (preset encoder) so only the "
                    "embedding layer and the new head learn.")
        if speakers < 1000:
            return f"With {speakers} training speakers, freezing the early stages (preset early) is a safe start."
        return f"{speakers} training speakers are enough to tune every stage (preset none)."

    def on_mount(self) -> None:
        self.query_one("#l2-sp").disabled = self.draft.config.model.init is None
        self.set_reactive(FreezeStep.frozen, self.draft.config.freeze.frozen_stages())
        self.watch_frozen(self.frozen)

    def watch_frozen(self, frozen: tuple[str, ...]) -> None:
        preset = preset_of(frozen)
        self.draft.set("freeze.stages", preset if preset != CUSTOM else list(frozen))
        button = self.query_one(f"#preset-{preset}", RadioButton)
        if not button.value:
            button.value = True
        stages = self.query_one("#stages", SelectionList)
        if set(stages.selected) != set(frozen):
            with stages.prevent(SelectionList.SelectedChanged):
                stages.deselect_all()
                for stage in frozen:
                    stages.select(stage)
        self.show_total()
        self.show_plan()

    def on_radio_set_changed(self, event: RadioSet.Changed) -> None:
        event.stop()
        preset = event.pressed.id.removeprefix("preset-")
        if preset != CUSTOM:
            self.frozen = FREEZE_PRESETS[preset]

    def on_selection_list_selected_changed(self, event: SelectionList.SelectedChanged) -> None:
        event.stop()
        self.frozen = tuple(stage for stage in STAGES if stage in event.selection_list.selected)

    def on_field_changed(self, event: Field.Changed) -> None:
        self.show_plan()

    def show_total(self) -> None:
        counts = self.draft.model.stage_parameters
        trainable = sum(n for stage, n in counts.items() if stage not in self.frozen)
        total = sum(counts.values())
        embedding = self.draft.model.model.config.embedding_size
        speakers = self.draft.train_speakers
        head = f"{embedding} × {speakers} speakers = {embedding * speakers:,}" if speakers else f"{embedding} × speakers"
        self.query_one("#total", Static).update(
            f"Trainable: {trainable:,} of {total:,} encoder parameters ({trainable / total:.0%}), "
            f"plus the new head ({head}).")

    def show_plan(self) -> None:
        freeze, epochs = self.draft.config.freeze, self.draft.config.run.epochs
        tuned = [stage for stage in STAGES if stage not in self.frozen]
        learns = f"the head and {', '.join(tuned)}" if tuned else "only the head (every stage is frozen)"
        rate = f" at {freeze.backbone_lr_scale:g}× the learning rate" if tuned and freeze.backbone_lr_scale != 1 else ""
        if freeze.head_only_epochs:
            plan = (f"Phase 1, epochs 1–{freeze.head_only_epochs}: only the new head learns. "
                    f"Phase 2, epochs {freeze.head_only_epochs + 1}–{epochs}: {learns}{rate}.")
        else:
            plan = f"One phase, epochs 1–{epochs}: {learns}{rate}."
        if freeze.l2_sp:
            plan += f" L2-SP (weight {freeze.l2_sp:g}) holds the tuned weights near the pretrained ones."
        self.query_one("#plan", Static).update(plan)

    def blocker(self) -> str | None:
        if any(field.problem for field in self.query(Field)):
            return "Correct the highlighted fields first."
        return None
