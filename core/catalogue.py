"""Released ERes2NetV2 checkpoints by name: 3D-Speaker's, fetched once into a user cache, and the
small demo base that ships inside spkft.

A catalogue name works wherever a checkpoint path does (:func:`resolve_checkpoint`; a file of
that name in the working folder wins). The file comes from ModelScope's file URL for the model,
revision and file name (the endpoint can be changed with ``SPKFT_MODEL_ENDPOINT``, for mirrors),
and is kept at ``<cache>/models/<name>/<revision>/<file>``. A file is taken into the cache only
once it loads strictly as its variant, every key and shape; a record beside it
(``<file>.json``) says it passed. A file placed there by hand is checked the first time it is
used. The cache is ``$SPKFT_HOME``, or else the platform's user cache folder.

The facts of 3D-Speaker's entries are those it publishes (``speakerlab/bin/infer_sv.py``, the
ModelScope model cards); sizes are those of the float32 state_dicts. The bundled entry is a file
in this package (``core/models/``), needs no download and is never copied into the cache; README's
"Demo base model" section says how it was made.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote, quote_plus

import platformdirs

from spkft.core.download import DownloadError, Progress, download
from spkft.core.errors import CheckpointError
from spkft.core.files import sha256_of

DEFAULT_ENDPOINT = "https://www.modelscope.cn"
ENDPOINT_VARIABLE = "SPKFT_MODEL_ENDPOINT"
HOME_VARIABLE = "SPKFT_HOME"
BUNDLED_FOLDER = Path(__file__).resolve().with_name("models")


def megabytes(count: int) -> str:
    """A size as people read it: whole megabytes, tenths below 10 MB."""
    return f"{count / 1e6:.0f} MB" if count >= 10_000_000 else f"{count / 1e6:.1f} MB"


@dataclass(frozen=True)
class ReleasedModel:
    """One released checkpoint: where it is published and what it is."""

    name: str
    variant: str
    model_id: str  # ModelScope's owner/name
    revision: str
    file: str
    parameters: int
    size_bytes: int  # the float32 state_dict's tensors; the file is a few kB larger
    training_data: str
    licence: str
    language: str
    sample_rate_hertz: int = 16000
    model_args: Mapping[str, Any] = field(default_factory=dict)  # constructor arguments beyond the variant's
    bundled: bool = False  # shipped inside spkft (BUNDLED_FOLDER): nothing to download

    @property
    def page(self) -> str:
        if self.bundled:
            return "bundled with spkft (README: Demo base model)"
        return f"https://modelscope.cn/models/{self.model_id}"

    def url(self, endpoint: str | None = None) -> str:
        """ModelScope's download URL of the file at the pinned revision."""
        if self.bundled:
            raise ValueError(f"{self.name} is bundled with spkft and has no download URL")
        base = (endpoint or model_endpoint()).rstrip("/")
        return (f"{base}/api/v1/models/{quote(self.model_id)}/repo"
                f"?Revision={quote_plus(self.revision)}&FilePath={quote_plus(self.file)}")

    def cached_path(self) -> Path:
        """Where the file lives: in the cache (and where to place it by hand), or in the package if bundled."""
        if self.bundled:
            return BUNDLED_FOLDER / self.file
        return cache_home() / "models" / self.name / self.revision / self.file

    def summary(self) -> str:
        return (f"{self.variant}, {self.parameters / 1e6:.1f} M parameters, {megabytes(self.size_bytes)}; "
                f"{self.training_data}; {self.licence}; {self.page}")


@dataclass(frozen=True)
class Availability:
    """Where an entry's file stands on this machine."""

    state: str  # bundled, cached, placed (by hand, checked on first use), partial, missing
    path: Path  # the file, or where it will be
    partial_bytes: int = 0  # of a download in progress or cut
    record: dict[str, Any] | None = None  # the cache record that vouches for a cached file

    @property
    def ready(self) -> bool:
        """Loading needs no download."""
        return self.state in ("bundled", "cached", "placed")

    def describe(self, entry: ReleasedModel) -> str:
        """One line for a person."""
        if self.state == "bundled":
            return f"bundled with spkft: {self.path}"
        if self.state == "cached":
            return f"downloaded: {self.path}"
        if self.state == "placed":
            return f"placed by hand at {self.path}: checked when first loaded"
        if self.state == "partial":
            return (f"{self.partial_bytes / 1e6:.0f} of {megabytes(entry.size_bytes)} downloaded: "
                    "the download resumes")
        return f"not downloaded yet: {megabytes(entry.size_bytes)} from ModelScope, fetched once"


CATALOGUE: dict[str, ReleasedModel] = {
    entry.name: entry
    for entry in (
        ReleasedModel(
            name="eres2netv2_w24s4ep4",
            variant="eres2netv2_w24s4ep4",
            model_id="iic/speech_eres2netv2w24s4ep4_sv_zh-cn_16k-common",
            revision="v1.0.1",
            file="pretrained_eres2netv2w24s4ep4.ckpt",
            parameters=53_513_632,
            size_bytes=214_353_512,
            training_data="3D-Speaker's 200k labelled speakers (Mandarin)",
            licence="Apache-2.0",
            language="zh-cn",
        ),
        ReleasedModel(
            name="eres2netv2",
            variant="eres2netv2",
            model_id="iic/speech_eres2netv2_sv_zh-cn_16k-common",
            revision="v1.0.1",
            file="pretrained_eres2netv2.ckpt",
            parameters=17_859_632,
            size_bytes=71_587_336,
            training_data="3D-Speaker's 200k labelled speakers (Mandarin)",
            licence="Apache-2.0",
            language="zh-cn",
        ),
        ReleasedModel(
            name="spkft_demo_base",
            variant="eres2netv2",
            model_id="",
            revision="2",
            file="spkft_demo_base.ckpt",
            parameters=712_724,
            size_bytes=2_870_008,
            training_data="289 speakers of LibriSpeech train-clean-100 and speechocean762 (English read speech), "
                          "by spkft",
            licence="Apache-2.0; trained on LibriSpeech (CC BY 4.0) and speechocean762 (free for any use)",
            language="en",
            model_args={"m_channels": 8},
            bundled=True,
        ),
    )
}
DEMO_BASE = "spkft_demo_base"


def model_endpoint() -> str:
    return os.environ.get(ENDPOINT_VARIABLE) or DEFAULT_ENDPOINT


def cache_home() -> Path:
    home = os.environ.get(HOME_VARIABLE)
    return Path(home).expanduser() if home else platformdirs.user_cache_path("spkft")


def partial_path(entry: ReleasedModel) -> Path:
    """Where a download in progress collects its bytes: outside ``models/``, so nothing half-written is in the cache."""
    return cache_home() / "downloads" / f"{entry.name}-{entry.revision}-{entry.file}.part"


def released(reference: str | Path | None) -> ReleasedModel | None:
    """The catalogue entry a checkpoint reference names, unless a file of that name exists."""
    if reference is None or Path(reference).exists():
        return None
    return CATALOGUE.get(str(reference))


def resolve_checkpoint(reference: str | Path, progress: Progress | None = None,
                       cancel: threading.Event | None = None) -> Path:
    """The file a checkpoint reference means: an existing path as it is, a catalogue name fetched and cached."""
    entry = released(reference)
    return Path(reference) if entry is None else fetch(entry, progress=progress, cancel=cancel)


def availability(entry: ReleasedModel) -> Availability:
    """Whether the entry's file is bundled, cached, placed by hand, partly downloaded or missing."""
    path = entry.cached_path()
    if entry.bundled:
        return Availability("bundled", path)
    record = cache_record(entry)
    if record is not None:
        return Availability("cached", path, record=record)
    if path.is_file():
        return Availability("placed", path)
    partial = partial_path(entry)
    try:
        return Availability("partial", path, partial.stat().st_size)
    except OSError:
        return Availability("missing", path)


def fetch(entry: ReleasedModel, progress: Progress | None = None, cancel: threading.Event | None = None) -> Path:
    """The entry's cached file, downloaded and checked first if need be (a bundled entry's file as it is)."""
    path = entry.cached_path()
    if entry.bundled:
        if not path.is_file():
            raise CheckpointError(f"{entry.name}: the bundled file {path} is missing; reinstall spkft")
        return path
    if cache_record(entry) is not None:
        return path
    if path.is_file():  # placed by hand: check it once, and keep it only if it is the right model
        try:
            verify(entry, path)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; replace it with {entry.url()} or delete it") from None
        _write_record(entry, path, source="placed by hand")
        return path
    url = entry.url()
    try:
        download(url, path, partial_path(entry), progress=progress, cancel=cancel,
                 verify=lambda file: verify(entry, file, downloaded=True))
    except DownloadError as exc:
        if cancel is not None and cancel.is_set():
            raise
        raise DownloadError(f"{entry.name}: {exc}. {by_hand(entry)}") from None
    _write_record(entry, path, source=url)
    return path


def by_hand(entry: ReleasedModel) -> str:
    """How to get the file into the cache where spkft cannot download it."""
    path = entry.cached_path()
    return (f"To place it by hand: download {entry.url()} on a machine that can reach it, save it in "
            f"{path.parent} as {entry.file}, and 'spkft models path {entry.name}' will then print {path}")


def verify(entry: ReleasedModel, path: Path, downloaded: bool = False) -> None:
    """Refuse a file that does not load strictly as the entry's variant (every key, every shape)."""
    # Imported here: the checkpoint loader resolves catalogue names through this module.
    from spkft.core.checkpoint import check_layout

    try:
        check_layout(path, entry.variant, entry.model_args)
    except CheckpointError as exc:
        if downloaded:
            reason = str(exc).removeprefix(f"{path}: ")
            raise CheckpointError(f"{entry.name}: the downloaded file was refused and deleted: {reason}") from None
        raise CheckpointError(f"{entry.name}: {exc}") from None


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_record(entry: ReleasedModel, path: Path, source: str) -> None:
    stat = path.stat()
    record = {
        "name": entry.name, "model_id": entry.model_id, "revision": entry.revision, "file": entry.file,
        "source": source, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_of(path),
        "verified": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _record_path(path).write_text(json.dumps(record, indent=1) + "\n")


def cache_record(entry: ReleasedModel) -> dict[str, Any] | None:
    """The record of the entry's cached file when it vouches for the file there (same entry, same
    size and time): the file is in the cache and has passed the strict load. None otherwise."""
    path = entry.cached_path()
    try:
        record = json.loads(_record_path(path).read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return None
    vouches = (isinstance(record, dict) and record.get("model_id") == entry.model_id
               and record.get("revision") == entry.revision and record.get("bytes") == stat.st_size
               and record.get("mtime_ns") == stat.st_mtime_ns)
    return record if vouches else None
