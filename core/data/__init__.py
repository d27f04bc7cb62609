"""Data sources: detect and scan them, split by speaker, segment, make and read trials.

The public API of ``spkft.core.data``; the modules behind it are one concept each:
``sources`` (layouts), ``scan`` and ``report`` (checking rows against audio), ``splits``,
``segments``, ``trials`` and ``demo`` (a small synthetic set).
"""

from spkft.core.data.demo import DEMO_RECORDINGS, DEMO_SPEAKERS, DEMO_TEST_SPEAKERS, write_demo
from spkft.core.data.report import (
    HISTOGRAM_EDGES,
    Excluded,
    HistogramBin,
    Reason,
    ScanReport,
    SourceKind,
)
from spkft.core.data.scan import ScanProgress, scan
from spkft.core.data.segments import segment
from spkft.core.data.sources import AUDIO_SUFFIXES, POOL_SEPARATOR, detect_source
from spkft.core.data.splits import Split, split_sources, split_speakers
from spkft.core.data.trials import make_trials, read_trials, write_trials

__all__ = [
    "AUDIO_SUFFIXES",
    "HISTOGRAM_EDGES",
    "Excluded",
    "HistogramBin",
    "POOL_SEPARATOR",
    "Reason",
    "ScanProgress",
    "ScanReport",
    "SourceKind",
    "Split",
    "detect_source",
    "make_trials",
    "read_trials",
    "scan",
    "segment",
    "split_sources",
    "split_speakers",
    "write_demo",
    "DEMO_RECORDINGS",
    "DEMO_SPEAKERS",
    "DEMO_TEST_SPEAKERS",
    "write_trials",
]
