"""Generated gRPC stubs of the ``spkft.v1`` API (``protos/spkft/v1``); regenerate with ``python -m spkft.serve.codegen``."""
