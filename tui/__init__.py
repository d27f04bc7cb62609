"""spkft's terminal interfaces: the ``spkft`` command line (Typer) and the ``spkft-tui`` wizard."""
