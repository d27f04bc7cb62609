"""``spkft data check`` and ``spkft data demo`` through the real Typer app."""

from __future__ import annotations

import json

from data_helpers import write_wav
from typer.testing import CliRunner

from spkft.tui.cli import app

runner = CliRunner()


def _messy(root):
    write_wav(root / "a.wav", seconds=1.5, rate=8000)
    write_wav(root / "b.wav", seconds=2.5, channels=2)
    (root / "fake.wav").write_text("not audio")
    (root / "list.csv").write_text("path,speaker\na.wav,alice\nb.wav,bob\nfake.wav,bob\nlost.wav,carol\n")
    return root / "list.csv"


def test_check_prints_tables_with_fixes_histogram_and_every_excluded_row(tmp_path):
    result = runner.invoke(app, ["data", "check", str(_messy(tmp_path))])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "usable recordings" in out and "excluded rows" in out
    assert "resampled to 16000 Hz" in out and "down-mixed to mono" in out
    assert "fixed when read: 1 resampled, 1 down-mixed" in out
    assert "1-2 s" in out and "20+ s" in out
    assert "list.csv:4" in out and "unreadable" in out and "fake.wav" in out
    assert "list.csv:5" in out and "missing" in out and "lost.wav" in out


def test_a_long_list_of_excluded_rows_is_summarised_by_reason(tmp_path):
    write_wav(tmp_path / "a.wav", seconds=1.5)
    write_wav(tmp_path / "b.wav", seconds=1.5)
    rows = ["path,speaker", "a.wav,alice", "b.wav,bob"]
    rows += [f"lost{i}.wav,carol" for i in range(40)]
    for i in range(5):
        (tmp_path / f"notes{i}.txt").write_text("not audio")
        rows.append(f"notes{i}.txt,dan")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    result = runner.invoke(app, ["data", "check", str(tmp_path / "list.csv")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Excluded rows (missing 40, unreadable 5)" in result.output
    assert "lost2.wav" in result.output and "lost3.wav" not in result.output
    assert "notes2.txt" in result.output and "notes3.txt" not in result.output
    assert "6 of 45: --all lists every one" in result.output
    every = runner.invoke(app, ["data", "check", str(tmp_path / "list.csv"), "--all"], env={"COLUMNS": "200"})
    assert "lost39.wav" in every.output and "notes4.txt" in every.output and "--all lists" not in every.output


def test_check_json_is_the_report_as_json(tmp_path):
    result = runner.invoke(app, ["data", "check", str(_messy(tmp_path)), "--json", "--min-seconds", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["recordings"] == 1 and data["speakers"] == 1
    assert data["min_seconds"] == 2.0
    assert data["excluded_by_reason"] == {"missing": 1, "too_short": 1, "unreadable": 1}
    assert {row["where"] for row in data["excluded_rows"]} == {"list.csv:2", "list.csv:4", "list.csv:5"}


def test_check_of_a_bad_source_is_one_error_line_and_exit_1(tmp_path):
    (tmp_path / "labels.csv").write_text("file,who\nx.wav,a\n")
    for source in (tmp_path / "absent", tmp_path / "labels.csv"):
        result = runner.invoke(app, ["data", "check", str(source)])
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert "Traceback" not in result.output


def test_demo_writes_a_synthetic_set_that_check_then_reads(tmp_path):
    target = tmp_path / "demo"
    result = runner.invoke(app, ["data", "demo", str(target), "--speakers", "3", "--test-speakers", "2",
                                 "--recordings-per-speaker", "2", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.output and str(target) in result.output
    assert f"spkft data check {target / 'train'}" in result.output
    check = runner.invoke(app, ["data", "check", str(target / "train"), "--json"])
    assert json.loads(check.output)["speakers"] == 3
    check = runner.invoke(app, ["data", "check", str(target / "test"), "--json"])
    assert json.loads(check.output)["speakers"] == 2
    table = runner.invoke(app, ["data", "check", str(target / "train")])
    assert "SYNTHETIC demo set" in table.output


def test_demo_into_a_foreign_folder_fails_cleanly(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = runner.invoke(app, ["data", "demo", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "not empty" in result.output
