"""Regenerates the gRPC stubs of ``protos/spkft/v1/*.proto`` into ``serve/v1``.

Run from a source checkout, after editing a ``.proto`` file::

    pip install -e '.[test]'         # grpcio-tools, pinned to the version the stubs are made with
    python -m spkft.serve.codegen

The stubs are checked in, so installing spkft never needs ``protoc``; ``tests/test_serve.py``
regenerates them into a temporary folder and fails when the checked-in ones are stale.

protoc is given the virtual include path ``spkft/serve/v1=protos/spkft/v1``, so the generated
modules import each other as ``spkft.serve.v1`` while the proto package that clients see stays
``spkft.v1``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
PROTOS = REPOSITORY / "protos" / "spkft" / "v1"
STUBS = REPOSITORY / "serve" / "v1"
IMPORT_PATH = "spkft/serve/v1"


def generate(output: Path, protos: Path = PROTOS) -> list[Path]:
    """Writes ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` of every proto in ``protos`` to ``output``."""
    from grpc_tools import protoc  # a development tool, not a runtime dependency

    sources = sorted(protos.glob("*.proto"))
    if not sources:
        raise FileNotFoundError(f"no .proto files in {protos} (run this from a source checkout)")
    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "grpc_tools.protoc",
            f"-I{IMPORT_PATH}={protos}",
            f"-I{files('grpc_tools') / '_proto'}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            *(f"{IMPORT_PATH}/{source.name}" for source in sources),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(map(str, sources))}")
        output.mkdir(parents=True, exist_ok=True)
        written = []
        for generated in sorted((Path(scratch) / IMPORT_PATH).iterdir()):
            written.append(Path(shutil.copy(generated, output / generated.name)))
    return written


def main() -> None:
    for path in generate(STUBS):
        print(f"wrote {path.relative_to(REPOSITORY)}")


if __name__ == "__main__":
    sys.exit(main())
