"""Form fields bound to one config key: validated by the config schema as typed, explained by it.

Every field shows the schema's own description (or a better sentence for this wizard) and, while
the typed text is not a valid value, the schema's reason. Valid values go straight into the draft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.validation import ValidationResult, Validator
from textual.widgets import Button, Input, Label, RadioButton, Select, Static

from spkft.tui.wizard.draft import Draft
from spkft.tui.wizard.pickers import PathPicker


def as_text(value: Any) -> str:
    """How a config value is typed: empty for None."""
    return "" if value is None else str(value)


class SchemaValidator(Validator):
    """Accepts the text when the config schema accepts it for ``key``; empty means None if ``optional``."""

    def __init__(self, draft: Draft, key: str, optional: bool) -> None:
        super().__init__()
        self.draft, self.key, self.optional = draft, key, optional

    def parse(self, text: str) -> Any:
        text = text.strip()
        return None if self.optional and not text else text

    def validate(self, value: str) -> ValidationResult:
        if not self.optional and not value.strip():
            return self.failure("a value is needed")
        problem = self.draft.check(self.key, self.parse(value))
        return self.success() if problem is None else self.failure(problem)


class Field(Vertical):
    """A label and a control on one line, a hint below it and, when the value is refused, why."""

    class Changed(Message):
        """A field's value went into the draft."""

        def __init__(self, field: Field) -> None:
            super().__init__()
            self.field = field

        @property
        def control(self) -> Field:
            return self.field

    def __init__(self, draft: Draft, key: str, label: str, hint: str | None = None, **kwargs: Any) -> None:
        super().__init__(classes="field", **kwargs)
        self.draft, self.key, self.label = draft, key, label
        self.hint = hint if hint is not None else self._description()
        self.problem: str | None = None

    def _description(self) -> str:
        section = self.draft.section(self.key)
        return type(section).model_fields[self.key.split(".", 1)[1]].description or ""

    def compose(self) -> ComposeResult:
        with Horizontal(classes="field-row"):
            yield Label(self.label, classes="field-label")
            yield from self.compose_control()
        yield Static(self.hint, classes="field-hint", markup=False)
        yield Static("", classes="field-error", markup=False)
        yield Static("", classes="field-warning", markup=False)

    def compose_control(self) -> ComposeResult:
        raise NotImplementedError

    def show_problem(self, problem: str | None) -> None:
        self.problem = problem
        self.set_class(problem is not None, "-invalid")
        self.query_one(".field-error", Static).update(f"✗ {problem}" if problem else "")

    def show_warning(self, warning: str | None) -> None:
        """A value that is valid but very likely a slip: said beside the field, not refused."""
        self.set_class(warning is not None, "-warned")
        self.query_one(".field-warning", Static).update(f"⚠ {warning}" if warning else "")

    def accept(self, event: Input.Changed) -> bool:
        """Show why the typed text is refused, or clear the reason; whether it was accepted."""
        event.stop()
        result = event.validation_result
        if result is not None and not result.is_valid:
            self.show_problem(result.failure_descriptions[0])
            return False
        self.show_problem(None)
        return True


class InputField(Field):
    """A typed value: text, a number or a path."""

    def __init__(self, draft: Draft, key: str, label: str, hint: str | None = None, *,
                 optional: bool = False, placeholder: str = "", **kwargs: Any) -> None:
        super().__init__(draft, key, label, hint, **kwargs)
        self.validator = SchemaValidator(draft, key, optional)
        self.placeholder = placeholder

    def compose_control(self) -> ComposeResult:
        yield Input(as_text(self.draft.get(self.key)), placeholder=self.placeholder, validators=[self.validator],
                    validate_on=["changed", "submitted"], compact=True)

    @property
    def input(self) -> Input:
        return self.query_one(Input)

    def on_input_changed(self, event: Input.Changed) -> None:
        if not self.accept(event):
            return
        if self.draft.edit(self.key, self.draft.validated(self.key, self.validator.parse(event.value))):
            self.post_message(self.Changed(self))

    def refresh_value(self) -> None:
        """Show the draft's value again (after something other than the user changed it)."""
        self.input.value = as_text(self.draft.get(self.key))


class PathInput(Horizontal):
    """A path typed, or picked from the file system with Browse…."""

    def __init__(self, value: str = "", *, suffixes: tuple[str, ...] = (), folders: bool = True,
                 placeholder: str = "", validators: list[Validator] | None = None, id: str | None = None) -> None:
        super().__init__(classes="path-input", id=id)
        self.value, self.suffixes, self.folders = value, suffixes, folders
        self.placeholder, self.validators = placeholder, validators or []

    def compose(self) -> ComposeResult:
        yield Input(self.value, placeholder=self.placeholder, validators=self.validators,
                    validate_on=["changed", "submitted"], compact=True)
        yield Button("Browse…", classes="browse", compact=True)

    @property
    def input(self) -> Input:
        return self.query_one(Input)

    @property
    def path(self) -> Path | None:
        text = self.input.value.strip()
        return Path(text).expanduser() if text else None

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.app.push_screen(PathPicker(self.path or Path("."), self.suffixes, self.folders), self._picked)

    def _picked(self, path: Path | None) -> None:
        if path is not None:
            self.input.value = str(path)


class PathField(InputField):
    """A config path typed or picked from the file system."""

    def __init__(self, draft: Draft, key: str, label: str, hint: str | None = None, *,
                 suffixes: tuple[str, ...] = (), folders: bool = True, **kwargs: Any) -> None:
        super().__init__(draft, key, label, hint, **kwargs)
        self.suffixes, self.folders = suffixes, folders

    def compose_control(self) -> ComposeResult:
        yield PathInput(as_text(self.draft.get(self.key)), suffixes=self.suffixes, folders=self.folders,
                        placeholder=self.placeholder, validators=[self.validator])


class SelectField(Field):
    """One value out of a few."""

    def __init__(self, draft: Draft, key: str, label: str, options: list[tuple[str, Any]],
                 hint: str | None = None, **kwargs: Any) -> None:
        super().__init__(draft, key, label, hint, **kwargs)
        self.options = options

    def compose_control(self) -> ComposeResult:
        value = self.draft.get(self.key)
        # Unset (None), the first option shows; choosing it sets the key.
        yield Select(self.options, value=Select.NULL if value is None else value, allow_blank=False, compact=True)

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        if self.draft.edit(self.key, event.value):
            self.post_message(self.Changed(self))


class Option(RadioButton):
    """A radio button whose state shows as a symbol (● chosen, ○ not) as well as by colour."""

    @property
    def BUTTON_INNER(self) -> str:  # noqa: N802 (Textual's name for the glyph)
        return "●" if self.value else "○"
