"""Formatting shared by commands that print embeddings; light, so ``spkft client`` loads no model code."""

from __future__ import annotations

import numpy as np


def compact_floats(vector: np.ndarray) -> list[float]:
    """The vector as JSON-ready floats of eight significant digits: every bit of a float32 that
    matters, in half the text."""
    return [float(f"{x:.8g}") for x in vector.tolist()]


def score_against(score: float, threshold: float) -> tuple[str, str]:
    """``score`` and ``threshold`` as text with enough decimals to tell them apart (4 to 8).

    ``0.9999 >= 0.9999`` says nothing; ``0.99993 >= 0.99987`` does. Equal values print alike.
    """
    for decimals in range(4, 9):
        shown = f"{score:.{decimals}f}", f"{threshold:.{decimals}f}"
        if shown[0] != shown[1]:
            return shown
    return f"{score:.4f}", f"{threshold:.4f}"
