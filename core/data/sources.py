"""Recognising a data source and reading the rows it lists, before any audio is opened.

Four layouts are accepted, told apart automatically:
- a CSV list with at least ``path`` and ``speaker`` columns (optional ``utt_id``, ``start``,
  ``stop`` in seconds); relative paths are relative to the CSV's folder;
- 3D-Speaker's ``train.csv`` (``ID,dur,path,start,stop,spk``), each row a segment of a file;
- a folder with one subfolder per speaker, audio files anywhere below each of them;
- a Kaldi data directory: ``wav.scp`` and ``utt2spk`` (and ``segments`` when there is one);
- a pool: a CSV with columns ``source,name`` listing other sources (any layout above, relative
  paths relative to the pool's CSV) read as one; every speaker and utterance id is prefixed with
  its source's ``name`` and a slash, so two corpora that both have a speaker ``103`` keep two;
- only where speaker labels are optional (``allow_unlabelled``, e.g. fitting a backend
  adaptation): a folder of audio files with no speaker folders, every recording unlabelled.

A folder holding a ``manifest.csv`` is read through that list: labels someone wrote down
win over labels inferred from folder names. Relative paths in ``wav.scp`` are taken relative
to the data directory, like every other list here.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from spkft.core.data.report import Excluded, Reason, SourceKind
from spkft.core.errors import DataError

AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".mp3", ".opus"})
MANIFEST_NAME = "manifest.csv"
# Written by spkft data demo beside its recordings; a demo in two parts has train/ and test/ below it.
DEMO_MARKER_NAME = "spkft-demo.json"
UNLABELLED = ""  # the speaker of a recording from an unlabelled source

_CSV_COLUMNS = {"path", "speaker"}
_3D_SPEAKER_COLUMNS = {"id", "dur", "path", "start", "stop", "spk"}
_POOL_COLUMNS = {"source", "name"}
POOL_SEPARATOR = "/"
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Row:
    """One utterance a source lists: where it is listed and what it claims, unchecked."""

    where: str
    utt_id: str
    path: Path
    speaker: str
    start_seconds: float = 0.0
    stop_seconds: float | None = None


@dataclass(frozen=True)
class Listing:
    """The rows of a source, plus rows already rejected while parsing the list itself."""

    source: Path
    kind: SourceKind
    rows: tuple[Row, ...]
    rejected: tuple[Excluded, ...]


def detect_source(source: str | Path, *, allow_unlabelled: bool = False) -> tuple[SourceKind, Path]:
    """Which layout ``source`` has, and the file or folder to read it from.

    A folder of audio files without speaker folders is :attr:`SourceKind.AUDIO_FOLDER` when
    ``allow_unlabelled``, else an error. Raises :class:`DataError` when it is none of the
    accepted layouts.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: no such file or folder")
    path = Path(os.path.abspath(path))
    if path.is_file() and path.name in {"wav.scp", "utt2spk", "segments"}:
        path = path.parent  # someone pointed at one file of a Kaldi data directory
    if path.is_file():
        if path.suffix.lower() in AUDIO_SUFFIXES:
            raise DataError(f"{source}: one audio file is not a data set; give a list, a folder "
                            "of speaker folders or a Kaldi data directory")
        return _csv_kind(path, _read_header(path)), path
    if (path / "wav.scp").is_file():
        if not (path / "utt2spk").is_file():
            raise DataError(f"{source}: a Kaldi data directory needs utt2spk beside wav.scp")
        return SourceKind.KALDI, path
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        return _csv_kind(manifest, _read_header(manifest)), manifest
    if any(_has_audio(folder) for folder in _speaker_folders(path)):
        return SourceKind.SPEAKER_FOLDERS, path
    if _loose_audio(path):
        if allow_unlabelled:
            return SourceKind.AUDIO_FOLDER, path
        raise DataError(
            f"{source}: audio files but no speaker labels; put each speaker's files in a folder "
            f"named after the speaker, or list them in a {MANIFEST_NAME} with columns path,speaker"
        )
    raise DataError(
        f"{source}: no audio found; expected one subfolder per speaker, a Kaldi data directory "
        f"(wav.scp + utt2spk), a {MANIFEST_NAME} or a CSV list"
    )


def read_source(source: str | Path, *, allow_unlabelled: bool = False) -> Listing:
    """Detect the layout of ``source`` and list its rows (no audio is opened)."""
    root = Path(source).expanduser()
    if (root / DEMO_MARKER_NAME).is_file() and (root / "train" / MANIFEST_NAME).is_file():
        raise DataError(f"{source}: a demo set in two parts, whose folders are not speakers: train on "
                        f"{root / 'train'} and test on {root / 'test'}")
    kind, path = detect_source(source, allow_unlabelled=allow_unlabelled)
    if kind is SourceKind.KALDI:
        rows, rejected = _read_kaldi(path)
    elif kind is SourceKind.SPEAKER_FOLDERS:
        rows, rejected = _read_speaker_folders(path)
    elif kind is SourceKind.AUDIO_FOLDER:
        rows = [Row(_utt_id_for(p, path), _utt_id_for(p, path), p, UNLABELLED) for p in _loose_audio(path)]
        rejected = []
    elif kind is SourceKind.POOL:
        rows, rejected = _read_pool(path)
    else:
        rows, rejected = _read_csv(path, kind)
    if not rows and not rejected:
        raise DataError(f"{source}: lists no recordings")
    return Listing(path, kind, tuple(rows), tuple(rejected))


def _utt_id_for(path: Path, root: Path) -> str:
    """An utterance id made from a path: relative to ``root`` where possible, no whitespace."""
    try:
        name = path.relative_to(root).as_posix()
    except ValueError:
        name = path.as_posix().lstrip("/")
    # Trial lists separate fields by whitespace, so an id must hold none.
    return _WHITESPACE.sub("_", name)


def _read_header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            # A bounded read: a binary file given by mistake may hold no newline at all.
            return _columns(handle.readline(65536))
    except (UnicodeDecodeError, csv.Error):
        raise DataError(f"{path}: not a CSV list (the file is not UTF-8 text)") from None


def _columns(header_line: str) -> list[str]:
    return [name.strip().lower() for name in next(csv.reader([header_line], delimiter=_delimiter(header_line)), [])]


def _delimiter(header_line: str) -> str:
    return "\t" if "\t" in header_line and "," not in header_line else ","


def _csv_kind(path: Path, header: list[str]) -> SourceKind:
    columns = set(header)
    if _3D_SPEAKER_COLUMNS <= columns:
        return SourceKind.THREED_SPEAKER_CSV
    if _CSV_COLUMNS <= columns:
        return SourceKind.CSV
    if _POOL_COLUMNS <= columns:
        return SourceKind.POOL
    found = repr(",".join(header)[:80]) if header else "nothing"
    raise DataError(
        f"{path}: not a data list: needs columns path,speaker (or 3D-Speaker's "
        f"ID,dur,path,start,stop,spk, or source,name for a pool of sources); found {found}"
    )


def _read_csv(path: Path, kind: SourceKind) -> tuple[list[Row], list[Excluded]]:
    speaker_column = "spk" if kind is SourceKind.THREED_SPEAKER_CSV else "speaker"
    id_column = "id" if kind is SourceKind.THREED_SPEAKER_CSV else "utt_id"
    rows: list[Row] = []
    rejected: list[Excluded] = []
    consumed = 0
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            first = handle.readline()
            header = _columns(first)
            reader = csv.reader(handle, delimiter=_delimiter(first))
            for fields in reader:
                # line_num counts physical lines, so quoted fields spanning lines keep numbers right;
                # the header line was read before the reader started counting.
                where = f"{path.name}:{consumed + 2}"
                consumed = reader.line_num
                if not any(field.strip() for field in fields):
                    continue
                if len(fields) != len(header):
                    rejected.append(Excluded(Reason.BAD_ROW, where,
                                             f"expected {len(header)} fields, found {len(fields)}"))
                    continue
                values = {name: value.strip() for name, value in zip(header, fields)}
                row = _row(where, path.parent, values["path"], values[speaker_column],
                           values.get(id_column, ""), values.get("start", ""), values.get("stop", ""))
                (rows if isinstance(row, Row) else rejected).append(row)
    except (UnicodeDecodeError, csv.Error) as exc:
        # The list itself is broken, not one row of it: nothing after this point can be trusted.
        raise DataError(f"{path}: cannot read the list past line {consumed + 1}: {exc}") from None
    return rows, rejected


def _row(where: str, root: Path, path_text: str, speaker: str, utt_id: str, start_text: str,
         stop_text: str) -> Row | Excluded:
    """A checked row, or the reason it cannot be one."""
    def bad(detail: str) -> Excluded:
        return Excluded(Reason.BAD_ROW, where, detail, utt_id or None, speaker or None,
                        _absolute(path_text, root) if path_text else None)

    if not path_text:
        return bad("no path given")
    if not speaker:
        return bad("no speaker given")
    if _WHITESPACE.search(utt_id):
        return bad(f"utterance id {utt_id!r} holds whitespace, which trial lists cannot carry")
    try:
        start = float(start_text) if start_text else 0.0
        stop = float(stop_text) if stop_text else None
    except ValueError:
        return bad(f"start {start_text!r} / stop {stop_text!r} must be numbers of seconds")
    if start < 0 or (stop is not None and stop <= start):
        return bad(f"segment {start:g}-{stop:g} s is not a forward span of time" if stop is not None
                   else f"start {start:g} s is negative")
    path = _absolute(path_text, root)
    return Row(where, utt_id or _utt_id_for(path, root), path, speaker, start, stop)


def _absolute(path_text: str, root: Path) -> Path:
    path = Path(path_text).expanduser()
    return Path(os.path.abspath(path if path.is_absolute() else root / path))


def _speaker_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def audio_files(folder: Path) -> list[Path]:
    """Audio files anywhere below ``folder``, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def _loose_audio(folder: Path) -> list[Path]:
    """Audio files directly in ``folder`` (not in its subfolders), in a stable order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def _has_audio(folder: Path) -> bool:
    return any(p.suffix.lower() in AUDIO_SUFFIXES and p.is_file() for p in folder.rglob("*"))


def _read_speaker_folders(root: Path) -> tuple[list[Row], list[Excluded]]:
    rows = [
        Row(_utt_id_for(path, root), _utt_id_for(path, root), path, folder.name)
        for folder in _speaker_folders(root)
        for path in audio_files(folder)
    ]
    rejected = [
        Excluded(Reason.BAD_ROW, path.name, "audio beside the speaker folders belongs to no speaker",
                 path=path)
        for path in _loose_audio(root)
    ]
    return rows, rejected


def _kaldi_table(path: Path, rejected: list[Excluded]) -> dict[str, tuple[str, str]]:
    """``key -> (rest of line, where)`` of a Kaldi table; malformed and repeated keys are rejected."""
    table: dict[str, tuple[str, str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a Kaldi table (the file is not UTF-8 text)") from None
    for number, line in enumerate(lines, start=1):
        where = f"{path.name}:{number}"
        parts = line.strip().split(maxsplit=1)
        if not parts:
            continue
        if len(parts) == 1:
            rejected.append(Excluded(Reason.BAD_ROW, where, f"{parts[0]!r} has no value", parts[0]))
        elif parts[0] in table:
            rejected.append(Excluded(Reason.DUPLICATE, where,
                                     f"{parts[0]} is listed again (first at {table[parts[0]][1]})",
                                     parts[0]))
        else:
            table[parts[0]] = (parts[1], where)
    return table


def _read_kaldi(root: Path) -> tuple[list[Row], list[Excluded]]:
    rejected: list[Excluded] = []
    wav_scp = _kaldi_table(root / "wav.scp", rejected)
    speakers = _kaldi_table(root / "utt2spk", rejected)
    if (root / "segments").is_file():
        utterances: dict[str, tuple[str, str, str, str]] = {}
        for utt_id, (rest, where) in _kaldi_table(root / "segments", rejected).items():
            parts = rest.split()
            if len(parts) != 3 or parts[0] not in wav_scp:
                detail = ("expected '<segment> <recording> <start> <end>'" if len(parts) != 3
                          else f"recording {parts[0]} is not in wav.scp")
                rejected.append(Excluded(Reason.BAD_ROW, where, detail, utt_id))
                continue
            utterances[utt_id] = (wav_scp[parts[0]][0], where, parts[1], parts[2])
    else:
        utterances = {utt_id: (rest, where, "", "") for utt_id, (rest, where) in wav_scp.items()}
    rows: list[Row] = []
    for utt_id, (audio, where, start, stop) in utterances.items():
        if audio.endswith("|"):
            rejected.append(Excluded(
                Reason.UNSUPPORTED, where,
                "wav.scp gives a piped command; spkft reads audio files only (write the command's "
                "output to a file and list that path)", utt_id))
            continue
        if utt_id not in speakers:
            rejected.append(Excluded(Reason.BAD_ROW, where, f"{utt_id} has no speaker in utt2spk", utt_id))
            continue
        speaker = speakers[utt_id][0].split()[0]
        row = _row(where, root, audio, speaker, utt_id, start, stop)
        (rows if isinstance(row, Row) else rejected).append(row)
    # An utterance already rejected for its wav.scp line is not reported a second time here.
    reported = {e.utt_id for e in rejected}
    rejected.extend(
        Excluded(Reason.BAD_ROW, where, f"{utt_id} is in utt2spk but has no audio listed", utt_id, speaker)
        for utt_id, (speaker, where) in speakers.items()
        if utt_id not in utterances and utt_id not in reported
    )
    return rows, rejected


def _read_pool(path: Path) -> tuple[list[Row], list[Excluded]]:
    """The rows of every source a pool lists, each speaker and utterance id prefixed by its source's name."""
    rows: list[Row] = []
    rejected: list[Excluded] = []
    names: dict[str, str] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            first = handle.readline()
            header = _columns(first)
            reader = csv.reader(handle, delimiter=_delimiter(first))
            entries = [(f"{path.name}:{number}", dict(zip(header, (f.strip() for f in fields))))
                       for number, fields in enumerate(reader, start=2) if any(f.strip() for f in fields)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the pool's list: {exc}") from None
    for where, entry in entries:
        name, source = entry.get("name", ""), entry.get("source", "")
        if not name or not source or len(entry) != len(header):
            raise DataError(f"{where}: a pool row needs a source and a name")
        if _WHITESPACE.search(name) or POOL_SEPARATOR in name:
            raise DataError(f"{where}: the name {name!r} must hold no whitespace and no {POOL_SEPARATOR!r}")
        if name in names:
            raise DataError(f"{where}: the name {name!r} is given twice (first at {names[name]})")
        names[name] = where
        target = _absolute(source, path.parent)
        if detect_source(target)[0] is SourceKind.POOL:
            raise DataError(f"{where}: {source} is a pool itself; list its sources here instead")
        listing = read_source(target)
        prefix = name + POOL_SEPARATOR
        rows.extend(Row(f"{name}: {row.where}", prefix + row.utt_id, row.path, prefix + row.speaker,
                        row.start_seconds, row.stop_seconds) for row in listing.rows)
        rejected.extend(Excluded(e.reason, f"{name}: {e.where}", e.detail,
                                 None if e.utt_id is None else prefix + e.utt_id,
                                 None if e.speaker is None else prefix + e.speaker, e.path)
                        for e in listing.rejected)
    if not entries:
        raise DataError(f"{path}: a pool that lists no sources")
    return rows, rejected
