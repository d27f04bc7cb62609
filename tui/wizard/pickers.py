"""Picking a file or folder from a tree of the file system, by keyboard or mouse."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Label, Static


class FilteredTree(DirectoryTree):
    """Folders, and only the files whose suffix is wanted; hidden entries are left out."""

    def __init__(self, path: Path, suffixes: tuple[str, ...], **kwargs) -> None:
        super().__init__(path, **kwargs)
        self.suffixes = tuple(s.lower() for s in suffixes)

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [
            p for p in paths
            if not p.name.startswith(".") and (p.is_dir() or not self.suffixes or p.suffix.lower() in self.suffixes)
        ]


class PathPicker(ModalScreen[Path | None]):
    """A file system tree rooted at the nearest existing folder of ``start``.

    Enter on a file picks it; a highlighted folder is picked with "Choose" when ``folders`` is true.
    Backspace climbs to the parent folder.
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("backspace", "up", "Parent folder")]

    def __init__(self, start: Path, suffixes: tuple[str, ...] = (), folders: bool = True) -> None:
        super().__init__()
        root = start if start.is_dir() else start.parent
        while not root.is_dir():
            root = root.parent
        self.root = root.resolve()
        self.suffixes, self.folders = suffixes, folders
        self.choice: Path | None = start.resolve() if start.exists() else None

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="picker"):
            yield Label("Choose a file" if not self.folders else "Choose a file or folder", classes="dialog-title")
            yield FilteredTree(self.root, self.suffixes, id="tree")
            yield Static(self._shown(), id="choice", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Parent folder", id="up", compact=True)
                yield Button("Cancel", id="cancel", compact=True)
                yield Button("Choose", id="choose", variant="primary", compact=True)

    def _shown(self) -> str:
        return f"selected: {self.choice}" if self.choice is not None else "nothing selected"

    def _select(self, path: Path) -> None:
        self.choice = path
        self.query_one("#choice", Static).update(self._shown())

    def on_tree_node_highlighted(self, event: DirectoryTree.NodeHighlighted) -> None:
        if event.node.data is not None:
            self._select(event.node.data.path)

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.dismiss(event.path)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        match event.button.id:
            case "up":
                self.action_up()
            case "cancel":
                self.dismiss(None)
            case "choose" if self.choice is not None and (self.folders or self.choice.is_file()):
                self.dismiss(self.choice)

    def action_up(self) -> None:
        tree = self.query_one(FilteredTree)
        tree.path = Path(tree.path).resolve().parent

    def action_cancel(self) -> None:
        self.dismiss(None)
