"""Released models by name: downloaded from a ModelScope stand-in on loopback, resumed, checked, cached.

A tiny w24s4ep4 (m_channels 8) is served under a catalogue entry made for the tests; one test
serves a full-size random eres2netv2 under the real entry, so the real name, URL layout and
strict check are exercised too.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from spkft.core import catalogue
from spkft.core.catalogue import CATALOGUE, DEMO_BASE, cache_record, partial_path
from spkft.core.checkpoint import embedding_state_dict, load_model, read_checkpoint
from spkft.core.model import build_model, count_parameters
from spkft.core.train.config import check_paths, load_config
from spkft.tui.cli import app

from data_helpers import write_closed_set
from model_server import PROXY_VARIABLES, TINY, state_bytes

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def spkft(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result, after_progress: bool = False) -> str:
    """The error, one line and exit 1; with ``after_progress``, below the download's progress lines."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and (after_progress or len(lines) == 1), result.stderr
    assert "Traceback" not in result.output
    return lines[-1]


def cached_files(home: Path) -> list[Path]:
    return sorted(p for p in (home / "models").rglob("*") if p.is_file()) if (home / "models").exists() else []


def test_download_by_name_caches_a_checked_file(home, server, tiny_bytes):
    result = spkft("models", "download", TINY.name)
    assert result.exit_code == 0, result.output
    path = home / "models" / TINY.name / TINY.revision / TINY.file
    assert path.read_bytes() == tiny_bytes
    assert f"verified (every tensor loads as {TINY.variant}) and cached as {path}" in result.stderr
    assert server.seen[0].path == (f"/api/v1/models/{TINY.model_id}/repo?Revision={TINY.revision}"
                                   f"&FilePath={TINY.file}")
    assert cache_record(TINY)["sha256"] == hashlib.sha256(tiny_bytes).hexdigest()
    assert not partial_path(TINY).exists()

    printed = spkft("models", "path", TINY.name)
    assert printed.exit_code == 0 and printed.stdout == f"{path}\n"
    listed = json.loads(spkft("models", "list", "--json").stdout)
    row = next(r for r in listed["models"] if r["name"] == TINY.name)
    assert row["state"] == "cached" and row["path"] == str(path) and listed["cache"] == str(home)
    again = spkft("models", "download", TINY.name)
    assert again.exit_code == 0 and "already cached" in again.stdout and len(server.seen) == 1


def test_a_download_cut_halfway_resumes_and_completes(home, server, tiny_bytes):
    half = len(tiny_bytes) // 2
    server.cut_after = [half]
    result = spkft("models", "download", TINY.name)
    assert result.exit_code == 0, result.output
    assert TINY.cached_path().read_bytes() == tiny_bytes
    assert [s.headers.get("Range") for s in server.seen] == [None, f"bytes={half}-"]
    assert server.seen[1].headers.get("If-Range") == '"spkft-test-1"'


def test_a_download_that_gives_up_is_resumed_by_the_next_attempt(home, server, tiny_bytes):
    third = len(tiny_bytes) // 3
    server.cut_after = [third, 0, 0, 0, 0]  # then nothing more arrives, try after try
    line = one_error_line(spkft("models", "download", TINY.name), after_progress=True)
    assert "stopped after" in line and "kept and the next attempt resumes" in line
    assert cached_files(home) == [] and partial_path(TINY).stat().st_size == third

    server.seen.clear()
    result = spkft("models", "download", TINY.name)
    assert result.exit_code == 0, result.output
    assert server.seen[0].headers.get("Range") == f"bytes={third}-"
    assert TINY.cached_path().read_bytes() == tiny_bytes and not partial_path(TINY).exists()


def test_a_server_error_is_tried_again(home, server, tiny_bytes):
    server.fail_with = [503, 502]
    result = spkft("models", "download", TINY.name)
    assert result.exit_code == 0, result.output
    assert len(server.seen) == 3 and TINY.cached_path().read_bytes() == tiny_bytes


def test_a_file_changed_upstream_between_attempts_is_fetched_whole(home, server, tiny_bytes):
    third = len(tiny_bytes) // 3
    server.cut_after = [third, 0, 0, 0, 0]
    one_error_line(spkft("models", "download", TINY.name), after_progress=True)
    changed = state_bytes("eres2netv2_w24s4ep4", seed=1, m_channels=8)
    server.files[(TINY.model_id, TINY.revision, TINY.file)] = changed
    server.etag = '"spkft-test-2"'
    server.seen.clear()
    result = spkft("models", "download", TINY.name)
    assert result.exit_code == 0, result.output
    assert server.seen[0].headers.get("If-Range") == '"spkft-test-1"'  # the server answers 200: all of it
    assert TINY.cached_path().read_bytes() == changed != tiny_bytes


@pytest.mark.parametrize("fault", ["truncated", "wrong architecture"])
def test_a_file_that_does_not_load_strictly_is_refused_and_not_cached(fault, home, server, tiny_bytes):
    served = (tiny_bytes[: len(tiny_bytes) // 2] if fault == "truncated"
              else state_bytes("eres2netv2", m_channels=8))
    server.files[(TINY.model_id, TINY.revision, TINY.file)] = served
    line = one_error_line(spkft("models", "download", TINY.name), after_progress=True)
    assert f"{TINY.name}: the downloaded file was refused and deleted" in line
    if fault == "wrong architecture":
        assert "not ERes2NetV2 variant 'eres2netv2_w24s4ep4'" in line
    assert cached_files(home) == [] and not partial_path(TINY).exists()
    assert spkft("models", "path", TINY.name).exit_code == 1


def test_a_404_is_one_line_naming_the_url_and_where_to_place_the_file(home, server):
    del server.files[(TINY.model_id, TINY.revision, TINY.file)]
    line = one_error_line(spkft("models", "download", TINY.name))
    assert "HTTP 404" in line and TINY.url() in line
    assert f"save it in {TINY.cached_path().parent} as {TINY.file}" in line
    assert f"'spkft models path {TINY.name}' will then print {TINY.cached_path()}" in line
    assert cached_files(home) == [] and not partial_path(TINY).exists()


def test_a_refused_connection_is_one_line_and_leaves_nothing(home, monkeypatch):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("SPKFT_MODEL_ENDPOINT", f"http://127.0.0.1:{port}")
    line = one_error_line(spkft("train", "--train", "nowhere", "--init", TINY.name))
    assert f"cannot connect to 127.0.0.1:{port}" in line and "To place it by hand" in line
    assert cached_files(home) == [] and not partial_path(TINY).exists()


def test_a_file_placed_by_hand_is_checked_on_first_use(home, server, tiny_bytes):
    path = TINY.cached_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(state_bytes("eres2netv2", m_channels=8))  # the wrong model
    line = one_error_line(spkft("models", "path", TINY.name))
    assert f"{TINY.name}: {path}: not ERes2NetV2 variant" in line and "replace it" in line
    assert path.exists()  # the user's file is left for them to replace

    path.write_bytes(tiny_bytes)
    printed = spkft("models", "path", TINY.name)
    assert printed.exit_code == 0 and printed.stdout == f"{path}\n"
    assert cache_record(TINY)["source"] == "placed by hand" and server.seen == []


def test_a_file_of_the_same_name_wins_over_the_catalogue(home, tmp_path, server):
    local = tmp_path / TINY.name
    torch.save(build_model("eres2netv2", m_channels=8).state_dict(), local)
    assert catalogue.resolve_checkpoint(TINY.name) == Path(TINY.name)
    assert load_model(TINY.name).variant == "eres2netv2" and server.seen == []


def test_a_mistyped_name_lists_the_catalogue(home):
    line = one_error_line(spkft("embed", "x.wav", "--checkpoint", "eres2netv2-w24s4ep4"))
    assert "no such checkpoint file (released models by name: " in line and "eres2netv2_w24s4ep4" in line


def test_init_by_name_in_train_and_eval(home, server, fsdd_dir, tiny_bytes):
    train, val = write_closed_set(fsdd_dir, home.parent, train_takes=2, val_takes=(40,), val_digits=3)
    result = spkft("train", "--train", train, "--val", val, "--init", TINY.name, "--recipe", "linear-probe",
                   "--epochs", "2", "--batch-size", "8", "--crop-seconds", "0.5", "--device", "cpu",
                   "--output-dir", home.parent / "run")
    assert result.exit_code == 0, result.output
    assert f"downloading {TINY.name}" in result.stderr and len(server.seen) == 1
    assert yaml.safe_load((home.parent / "run" / "config.yaml").read_text())["model"]["init"] == TINY.name

    report = home.parent / "report"
    result = spkft("eval", "--checkpoint", home.parent / "run" / "best.ckpt", "--data", val,
                   "--baseline", TINY.name, "-o", report, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["comparison"] and len(server.seen) == 1  # fetched once, then cached
    result = spkft("eval", "--checkpoint", TINY.name, "--data", val, "--json")
    assert result.exit_code == 0, result.output
    assert (home.parent / f"eval-{TINY.name}-val").is_dir()  # the report stays out of the cache


def test_a_config_naming_a_released_model_passes_the_path_check(home):
    config = load_config(overrides={"data.train": str(home.parent), "model.init": TINY.name})
    check_paths(config)
    for name in ("finetune-w24s4ep4.yaml", "small-data.yaml"):
        shipped = load_config(ROOT / "configs" / name)
        assert str(shipped.model.init) == "eres2netv2_w24s4ep4"


def test_the_released_entries_match_the_published_layouts(reference_dir):
    for entry in (e for e in CATALOGUE.values() if not e.bundled):
        model = build_model(entry.variant, **entry.model_args)
        rows = [line.split("\t") for line in (reference_dir / f"{entry.variant}.keys.tsv").read_text().splitlines()]
        published = {key: tuple(int(d) for d in shape.strip("()").split(",") if d.strip()) for key, shape, _ in rows}
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == published
        assert count_parameters(model) == entry.parameters
        assert sum(v.numel() * v.element_size() for v in model.state_dict().values()) == entry.size_bytes


def test_the_bundled_demo_base_needs_no_download_and_says_where_it_came_from(home, server):
    entry = CATALOGUE[DEMO_BASE]
    path = catalogue.resolve_checkpoint(DEMO_BASE)
    assert entry.bundled and path == entry.cached_path() and path.is_file()
    assert path.parent.name == "models" and home not in path.parents  # in the package, not the cache
    catalogue.verify(entry, path)  # every key and shape of its variant
    state = embedding_state_dict(read_checkpoint(path))
    assert sum(v.numel() * v.element_size() for v in state.values()) == entry.size_bytes
    loaded = load_model(DEMO_BASE)
    assert count_parameters(loaded.model) == entry.parameters
    # Its provenance travels in the file: what it was trained on, and that training helped.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["config"]["data"]["train"] == "configs/demo-base-sources.csv"
    assert checkpoint["best_eer"] < checkpoint["initial_eer"]
    corpora = {speaker.split("/")[0] for speaker in checkpoint["speakers"]}
    assert corpora == {"librispeech", "speechocean762"} and len(checkpoint["speakers"]) == 289
    assert set(checkpoint["provenance"]["data"]) == corpora and "CC BY 4.0" in checkpoint["provenance"]["data"]["librispeech"]
    # Measured on speakers held out of training and of picking the epoch, corpus by corpus.
    for corpus in corpora:
        figures = checkpoint["test_evaluation"][corpus]
        assert 0 < figures["eer"] < 0.25 and figures["speakers"] >= 20

    listed = json.loads(spkft("models", "list", "--json").stdout)
    row = next(r for r in listed["models"] if r["name"] == DEMO_BASE)
    assert row["state"] == "bundled" and row["ready"] and row["url"] is None and row["path"] == str(path)
    assert spkft("models", "path", DEMO_BASE).stdout == f"{path}\n"
    again = spkft("models", "download", DEMO_BASE)
    assert again.exit_code == 0 and "nothing to download" in again.stdout
    assert not server.seen  # nothing was asked of the network
    assert not (home / "models" / DEMO_BASE).exists()


def test_a_released_name_downloads_under_modelscope_layout(tmp_path, monkeypatch, server):
    """The real entry eres2netv2 (full size, random weights): its URL, size and strict check."""
    entry = CATALOGUE["eres2netv2"]
    body = state_bytes("eres2netv2")
    server.files[(entry.model_id, entry.revision, entry.file)] = body
    monkeypatch.setenv("SPKFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPKFT_MODEL_ENDPOINT", server.url())
    for proxy in PROXY_VARIABLES:
        monkeypatch.delenv(proxy, raising=False)
    result = spkft("models", "download", "eres2netv2")
    assert result.exit_code == 0, result.output
    assert server.seen[0].path == ("/api/v1/models/iic/speech_eres2netv2_sv_zh-cn_16k-common/repo"
                                   "?Revision=v1.0.1&FilePath=pretrained_eres2netv2.ckpt")
    assert entry.cached_path() == tmp_path / "home" / "models" / "eres2netv2" / "v1.0.1" / "pretrained_eres2netv2.ckpt"
    assert entry.cached_path().stat().st_size == len(body)
    assert abs(len(body) - entry.size_bytes) < 200_000  # the catalogue's size is the tensors'
