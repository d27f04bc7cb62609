"""spkft core: audio, features, the ERes2NetV2 model and checkpoints, usable as a library.

Nothing here imports a user interface or RPC framework; ``spkft.tui`` and ``spkft.serve``
build on this package, never the other way round.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spkft")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
