"""``spkft-tui``: the Textual wizard that takes a person from recordings to a served model.

It only assembles a config and calls ``spkft.core`` (and ``spkft.serve`` to start and call a
server), exactly as the ``spkft`` command line does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spkft.core import __version__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="spkft-tui",
        description="A keyboard-first wizard: scan your recordings, choose a model and what to freeze, "
                    "fine-tune with live feedback, evaluate, export to ONNX and serve over gRPC.",
    )
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="a saved config (spkft-tui's Save, or any spkft train config) to start from")
    parser.add_argument("--version", action="version", version=f"spkft-tui {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``spkft-tui`` console script."""
    args = parse_args(argv)
    # Imported here so that --help and --version answer without loading Textual; the app itself
    # shows its first screen before torch and the steps have loaded.
    from spkft.tui.wizard.app import WizardApp

    draft = None
    if args.config is not None:  # checked before the screen opens, so a bad file is one line here
        from spkft.core.errors import SpkftError
        from spkft.core.train import load_config
        from spkft.tui.wizard.draft import Draft

        try:
            draft = Draft.from_config(load_config(args.config))
        except SpkftError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None
    made = WizardApp(draft).run()
    if made:  # Finish: what was made stays in the terminal after the wizard closes
        print("\n".join(made))
