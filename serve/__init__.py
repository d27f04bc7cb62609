"""spkft serving layer: the gRPC speaker service and its client helpers (built on spkft.core)."""
