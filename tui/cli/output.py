"""Formatting shared by commands that print embeddings; light, so ``spkft client`` loads no model code."""

from __future__ import annotations

import numpy as np


def compact_floats(vector: np.ndarray) -> list[float]:
    """The vector as JSON-ready floats of eight significant digits: every bit of a float32 that
    matters, in half the text."""
    return [float(f"{x:.8g}") for x in vector.tolist()]
