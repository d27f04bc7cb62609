"""Step 3: a fine-tuning recipe, or which stages of the network keep their weights and the two-phase plan."""

from __future__ import annotations

from typing import Any

from rich.segment import Segment
from textual.app import ComposeResult
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip
from textual.widgets import Label, RadioButton, RadioSet, SelectionList, Static
from textual.widgets.option_list import OptionDoesNotExist
from textual.widgets.selection_list import Selection

from spkft.core.train.config import FREEZE_PRESETS, STAGES
from spkft.core.train.recipes import RECIPE_CHOICES
from spkft.tui.wizard.draft import CUSTOM, Draft
from spkft.tui.wizard.fields import Field, InputField, Option
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


def preset_of(frozen: tuple[str, ...]) -> str:
    return next((name for name, stages in FREEZE_PRESETS.items() if set(stages) == set(frozen)), CUSTOM)


class Checklist(SelectionList[str]):
    """A selection list whose ticked rows show ✓ (and the others a blank) as well as a colour."""

    def render_line(self, y: int) -> Strip:
        strip = super().render_line(y)
        segments = list(strip)
        try:
            option = self.get_option_at_index(self.scroll_offset.y + y)
        except OptionDoesNotExist:
            return strip
        if len(segments) < 4:  # not a row with its button: left side, mark, right side, space, prompt
            return strip
        segments[1] = Segment("✓" if option.value in self.selected else " ", segments[1].style)
        return Strip(segments, strip.cell_length)


class Choices(RadioSet):
    """A radio set whose choice may press a button of another set (the recipe's preset, or custom).

    RadioSet posts its Changed while RadioButton.Changed is prevented, and a handler of it inherits
    that: a button it presses in another set would go unheard there, leaving two pressed. Picked is
    posted from the button's own change instead, outside that.
    """

    class Picked(Message):
        def __init__(self, choices: Choices, choice: str) -> None:
            super().__init__()
            self.choices = choices
            self.choice = choice  # the button's id less the set's prefix

    def __init__(self, *buttons: RadioButton, prefix: str, **kwargs: Any) -> None:
        super().__init__(*buttons, **kwargs)
        self.prefix = prefix

    def on_radio_button_changed(self, event: RadioButton.Changed) -> None:
        if event.value:
            self.post_message(self.Picked(self, event.radio_button.id.removeprefix(self.prefix)))


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

    def __init__(self, draft: Draft) -> None:
        super().__init__(draft)
        # Before composing: the fields show the knobs of the recipe chosen for this data and model.
        self.recipe_note = draft.settle_recipe()

    def compose_body(self) -> ComposeResult:
        draft = self.draft
        yield Static("A recipe sets what stays frozen and how the rest learns, for your data. A frozen stage "
                     "keeps its pretrained weights and BatchNorm statistics.", classes="intro")
        with Choices(prefix="recipe-", id="recipes", classes="inline"):
            for name in (*RECIPE_CHOICES, CUSTOM):
                yield Option(name, value=name == draft.recipe, id=f"recipe-{name}",
                                  disabled=draft.recipe_refused(name))
        yield Static(id="recipe-line", markup=False)
        refused = [name for name in RECIPE_CHOICES if draft.recipe_refused(name)]
        if refused:
            yield Static(f"{' and '.join(refused)} fine-tune a pretrained checkpoint; step 2 chose a fresh "
                         "network, which has nothing to keep.", id="recipe-refused", markup=False)
        yield Label("Frozen stages (space toggles)", classes="section")
        with Choices(prefix="preset-", id="presets", classes="inline"):
            for name in (*FREEZE_PRESETS, CUSTOM):
                yield Option(name, id=f"preset-{name}")
        yield Checklist(*self.stage_options(), id="stages")
        yield Static(id="total", markup=False)
        yield Label("Two-phase plan", classes="section")
        yield InputField(draft, "freeze.head_only_epochs", "Head-only epochs",
                         "Phase 1: only the new head learns while the encoder waits, so its random start "
                         "cannot pull the pretrained weights off course. 0 = one phase.")
        yield InputField(draft, "freeze.backbone_lr_scale", "Encoder lr scale",
                         "The unfrozen stages learn at this fraction of the learning rate (1 = the same).")
        yield InputField(draft, "freeze.l2_sp", "L2-SP weight", "Pulls tuned weights toward the pretrained "
                         "ones rather than toward zero (small data); 0 = off. Needs a pretrained checkpoint.",
                         id="l2-sp")
        yield InputField(draft, "freeze.distill", "Distillation weight", "Pulls each crop's embedding toward the "
                         "pretrained model's, keeping what it knew without old data; 0 = off. Needs a pretrained "
                         "checkpoint.", id="distill")
        yield InputField(draft, "data.rehearsal_fraction", "Rehearsed share", "Share of every batch drawn from "
                         "step 1's rehearsal recordings; only used when they are given.", id="rehearsal-fraction")
        yield Static(id="plan", markup=False)

    def stage_options(self) -> list[Selection[str]]:
        frozen = self.draft.config.freeze.frozen_stages()
        extra = EXTRA_BYTES[self.draft.config.optim.optimizer]
        counts = self.draft.model.stage_parameters
        return [
            Selection(f"{stage:<10}{counts[stage]:>10,}  saves {size(extra * counts[stage]):>8}  {ROLES[stage]}",
                      stage, stage in frozen)
            for stage in STAGES
        ]

    def on_mount(self) -> None:
        # A fresh model has nothing to pull toward; a weight kept from before stays open to clear.
        self.query_one("#l2-sp").disabled = not self.draft.pretrained and not self.draft.config.freeze.l2_sp
        self.query_one("#distill").disabled = not self.draft.pretrained and not self.draft.config.freeze.distill
        self.query_one("#rehearsal-fraction").disabled = not self.draft.rehearsal
        self.set_reactive(FreezeStep.frozen, self.draft.config.freeze.frozen_stages())
        self.watch_frozen(self.frozen)
        self.show_recipe()
        if self.recipe_note is not None:
            self.say(self.recipe_note)

    def show_recipe(self) -> None:
        """The recipe choice as the draft holds it, and what it does or why auto picked it."""
        button = self.query_one(f"#recipe-{self.draft.recipe}", RadioButton)
        if not button.value:
            button.value = True
        self.query_one("#recipe-line", Static).update(self.draft.recipe_line())

    def choose_recipe(self, choice: str) -> None:
        self.draft.choose_recipe(choice)
        stages = self.query_one("#stages", SelectionList)
        with stages.prevent(SelectionList.SelectedChanged):
            # Drawn again: what freezing a stage saves depends on the optimiser, which a recipe sets.
            stages.clear_options()
            stages.add_options(self.stage_options())
        self.frozen = self.draft.config.freeze.frozen_stages()
        for field in self.query(InputField):
            field.refresh_value()
        self.show_plan()
        self.show_recipe()

    def freeze(self, frozen: tuple[str, ...]) -> None:
        """Freeze ``frozen``, as chosen by hand (a preset or stage by stage)."""
        if set(frozen) == set(self.frozen):
            return  # the widgets catching up with the draft, not a choice
        preset = preset_of(frozen)
        self.draft.edit("freeze.stages", preset if preset != CUSTOM else list(frozen))
        self.frozen = frozen
        self.show_recipe()

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

    def on_choices_picked(self, event: Choices.Picked) -> None:
        event.stop()
        if event.choices.id == "recipes":
            if event.choice != self.draft.recipe:
                self.choose_recipe(event.choice)
        elif event.choice != CUSTOM:
            self.freeze(FREEZE_PRESETS[event.choice])

    def on_selection_list_selected_changed(self, event: SelectionList.SelectedChanged) -> None:
        event.stop()
        self.freeze(tuple(stage for stage in STAGES if stage in event.selection_list.selected))

    def on_field_changed(self, event: Field.Changed) -> None:
        self.show_plan()
        self.show_recipe()

    def show_total(self) -> None:
        counts = self.draft.model.stage_parameters
        trainable = sum(n for stage, n in counts.items() if stage not in self.frozen)
        total = sum(counts.values())
        embedding = self.draft.model.model.config.embedding_size
        speakers = self.draft.train_speakers
        head = f"{embedding} × {speakers} speakers = {embedding * speakers:,}" if speakers else f"{embedding} × speakers"
        if self.draft.rehearsal:
            head += f", and {embedding} per rehearsed speaker"
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
        if freeze.distill:
            plan += (f" Distillation (weight {freeze.distill:g}) holds each crop's embedding near the pretrained "
                     "model's.")
        data = self.draft.config.data
        if data.rehearsal is not None:
            plan += (f" {data.rehearsal_fraction:.0%} of every batch is rehearsed from {data.rehearsal}, "
                     "its speakers extra classes of the head.")
        self.query_one("#plan", Static).update(plan)

    def blocker(self) -> str | None:
        if any(field.problem for field in self.query(Field)):
            return "Correct the highlighted fields first."
        return None
