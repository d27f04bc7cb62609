"""spkft serve as a fleet member: replicas sharing a PostgreSQL store, a database that goes away
and comes back, kill -9 under load, Prometheus metrics, JSON access logs, and Verify without a
threshold. The PostgreSQL tests use a real server (see ``postgres_server`` in conftest.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import urllib.request

import grpc
import numpy as np
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from spkft.serve.client import ServiceError, SpeakerClient
from spkft.serve.server import ServerConfig
from spkft.serve.service import SERVICE_NAME
from spkft.serve.v1 import speaker_service_pb2 as pb
from spkft.serve.v1 import speaker_service_pb2_grpc as pb_grpc
from spkft.tui.cli import app

from serve_helpers import SPKFT, spawn_server, started, wait_until

CODE = grpc.StatusCode
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def service_health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                          timeout=10).status


@pytest.fixture
def replicas(postgres_url, model_file, onnx_embedder):
    servers = [started(ServerConfig(model=model_file, port=0, enroll_db=postgres_url, threshold=0.5), onnx_embedder)
               for _ in range(2)]
    yield servers
    for server in servers:
        server.drain(0)


def test_replicas_share_enrollments_within_a_second(replicas, clips, other_speaker):
    a, b = replicas
    with SpeakerClient(a.address) as on_a, SpeakerClient(b.address) as on_b:
        on_a.enroll("alice", clips[:2])
        on_a.enroll("bob", [other_speaker])
        # (the tiny model's weights are random: who ranks first says nothing, who is found does)
        wait_until(lambda: {m.speaker_id for m in on_b.identify(clips[2], top_k=5).matches} == {"alice", "bob"},
                   timeout=1.0)
        assert on_b.verify(clips[3], speaker_id="alice").score == pytest.approx(
            on_a.verify(clips[3], speaker_id="alice").score, abs=1e-6)
        assert [s.speaker_id for s in on_b.speakers().speakers] == ["alice", "bob"]
        on_b.delete("alice")
        wait_until(lambda: {m.speaker_id for m in on_a.identify(clips[2], top_k=5).matches} == {"bob"}, timeout=1.0)
        with pytest.raises(ServiceError) as gone:
            on_a.verify(clips[3], speaker_id="alice")
        assert gone.value.code == "NOT_FOUND"


def test_a_lost_database_is_unavailable_and_its_return_brings_serving_back(postgres_url, postgres_control, model_file,
                                                                           onnx_embedder, clips):
    server = started(ServerConfig(model=model_file, port=0, enroll_db=postgres_url, threshold=0.5), onnx_embedder)
    try:
        with SpeakerClient(server.address) as client:
            client.enroll("carol", [clips[0]])
            postgres_control("stop")
            wait_until(lambda: service_health(server.address) == NOT_SERVING, timeout=10)
            with pytest.raises(ServiceError) as refused:
                client.enroll("dave", [clips[1]])
            assert refused.value.code == "UNAVAILABLE" and "unreachable" in refused.value.details
            assert len(client.embed(clips[2]).embedding) == 192  # what needs no database goes on
            assert [m.speaker_id for m in client.identify(clips[0]).matches] == ["carol"]
            postgres_control("start")
            wait_until(lambda: service_health(server.address) == SERVING, timeout=15)
            assert client.enroll("dave", [clips[1]]).utterance_count == 1
    finally:
        server.drain(0)


def test_kill_9_under_concurrent_enrollments_loses_no_acknowledged_one(postgres_url, model_file, clips):
    process, address = spawn_server("--model", str(model_file), "--enroll-db", postgres_url)
    acknowledged = {f"speaker-{i}": 0 for i in range(8)}
    sent = dict(acknowledged)
    stop = threading.Event()

    def enroll_forever(speaker_id: str) -> None:
        with SpeakerClient(address) as client:
            while not stop.is_set():
                sent[speaker_id] += 1
                try:
                    acknowledged[speaker_id] = client.enroll(speaker_id, [clips[0]]).utterance_count
                except ServiceError:
                    return

    threads = [threading.Thread(target=enroll_forever, args=(speaker,)) for speaker in acknowledged]
    for thread in threads:
        thread.start()
    wait_until(lambda: sum(acknowledged.values()) >= 40, timeout=60)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    stop.set()
    for thread in threads:
        thread.join(30)
    with psycopg.connect(postgres_url) as conn:
        stored = dict(conn.execute("SELECT speaker_id, utterance_count FROM speakers").fetchall())
    for speaker, count in acknowledged.items():
        # every acknowledged enrollment is there; at most the one in flight at the kill is there unacknowledged
        assert count <= stored.get(speaker, 0) <= sent[speaker], speaker


def test_migrate_moves_a_store_to_postgresql_and_back(tmp_path, postgres_url, model_file, onnx_embedder, clips,
                                                      other_speaker):
    source = tmp_path / "enrollments.sqlite"
    server = started(ServerConfig(model=model_file, port=0, enroll_db=source), onnx_embedder)
    with SpeakerClient(server.address) as client:
        client.enroll("alice", clips[:3])
        client.enroll("bob", [other_speaker])
        before = client.identify(clips[3], top_k=2)
    server.drain(0)

    runner = CliRunner()
    moved = runner.invoke(app, ["enroll-db", "migrate", "--from", str(source), "--to", postgres_url])
    assert moved.exit_code == 0, moved.output
    assert "2 speakers, 4 recordings" in moved.output and "verified" in moved.output
    again = runner.invoke(app, ["enroll-db", "migrate", "--from", str(source), "--to", postgres_url])
    assert again.exit_code == 1 and "already holds 2 speakers" in again.output

    back = tmp_path / "back.sqlite"
    returned = runner.invoke(app, ["enroll-db", "migrate", "--from", postgres_url, "--to", str(back)])
    assert returned.exit_code == 0, returned.output
    for store in (postgres_url, back):
        server = started(ServerConfig(model=model_file, port=0, enroll_db=store), onnx_embedder)
        with SpeakerClient(server.address) as client:
            after = client.identify(clips[3], top_k=2)
            assert [m.speaker_id for m in after.matches] == [m.speaker_id for m in before.matches]
            assert [m.score for m in after.matches] == pytest.approx([m.score for m in before.matches], abs=1e-6)
            assert [(s.speaker_id, s.utterance_count) for s in client.speakers().speakers] == [("alice", 3), ("bob", 1)]
        server.drain(0)


def test_migrate_refuses_a_missing_source_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["enroll-db", "migrate", "--from", str(tmp_path / "none.sqlite"),
                                      "--to", str(tmp_path / "out.sqlite")])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {tmp_path / 'none.sqlite'}: no such enrollment store"
    assert not (tmp_path / "out.sqlite").exists()


# ---------------------------------------------------------------- metrics, access logs, Verify


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_metrics_count_calls_by_rpc_and_code(tmp_path, model_file, onnx_embedder, clips):
    config = ServerConfig(model=model_file, port=0, enroll_db=tmp_path / "e.sqlite", metrics_port=0)
    server = started(config, onnx_embedder)
    try:
        assert server.metrics_port
        before = scrape(server.metrics_port)
        assert before['spkft_enrolled_speakers'] == 0
        with SpeakerClient(server.address) as client:
            client.embed(clips[0])
            client.embed(clips[1])
            client.enroll("alice", clips[:2])
            with pytest.raises(ServiceError):
                client.verify(clips[0], speaker_id="nobody")
        after = scrape(server.metrics_port)
        assert after['spkft_requests_total{code="OK",rpc="Embed"}'] == 2
        assert after['spkft_requests_total{code="OK",rpc="EnrollSpeaker"}'] == 1
        assert after['spkft_requests_total{code="NOT_FOUND",rpc="Verify"}'] == 1
        assert after['spkft_request_duration_seconds_count{rpc="Embed"}'] == 2
        assert after['spkft_request_audio_seconds_total{rpc="Embed"}'] == pytest.approx(3.0, abs=0.01)
        assert after['spkft_batch_rows_count'] >= 4 and after['spkft_inference_seconds_count'] >= 4
        assert after['spkft_enrolled_speakers'] == 1 and after['spkft_enrollment_store_up'] == 1
        assert after['spkft_queue_depth'] == 0
        served = server.service.model
        assert after[f'spkft_model_info{{engine="{served.engine}",enrollment_store="sqlite",model="{model_file.stem}",'
                     f'precision="{served.precision}"}}'] == 1
    finally:
        server.drain(0)


def test_json_logs_have_one_access_line_per_call(tmp_path, model_file, clips):
    process, address = spawn_server("--model", str(model_file), "--enroll-db", str(tmp_path / "e.sqlite"),
                                    "--log-format", "json")
    try:
        with SpeakerClient(address) as client:
            client.embed(clips[0])
            with pytest.raises(ServiceError):
                client.delete("nobody")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    lines = [json.loads(line) for line in stderr.splitlines()]  # every line is JSON
    access = [line for line in lines if line["logger"] == "spkft.access"]
    assert [(line["rpc"], line["code"]) for line in access] == [("Embed", "OK"), ("DeleteSpeaker", "NOT_FOUND")]
    assert access[0]["audio_seconds"] == pytest.approx(1.5, abs=0.01) and access[0]["milliseconds"] > 0
    assert access[0]["peer"].startswith(("ipv4:", "ipv6:"))


def test_verify_without_any_threshold_answers_the_score_alone(tmp_path, model_file, onnx_embedder, clips):
    # The tiny model has no calibrated threshold, and this server is given none.
    server = started(ServerConfig(model=model_file, port=0, enroll_db=tmp_path / "e.sqlite"), onnx_embedder)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.SpeakerServiceStub(channel)
            audio = [pb.Audio(content=clip) for clip in clips]
            plain = stub.Verify(pb.VerifyRequest(reference_audio=audio[0], test_audio=audio[1]))
            assert -1 <= plain.score <= 1 and plain.score != 0
            assert not plain.HasField("accepted") and not plain.HasField("threshold")
            decided = stub.Verify(pb.VerifyRequest(reference_audio=audio[0], test_audio=audio[1], threshold=-1.0))
            assert decided.HasField("accepted") and decided.accepted and decided.threshold == -1.0
            assert decided.score == pytest.approx(plain.score, abs=1e-6)
            with pytest.raises(grpc.RpcError) as unknown:
                stub.Verify(pb.VerifyRequest(speaker_id="nobody", test_audio=audio[1]))
            assert unknown.value.code() == CODE.NOT_FOUND
        shown = CliRunner().invoke(app, ["client", "verify", "--server", server.address, str(_write(tmp_path, clips[0])),
                                         str(_write(tmp_path, clips[1], "b.wav"))])
        assert shown.exit_code == 0, shown.output
        assert shown.output.startswith(f"score {plain.score:.4f} (no threshold")
    finally:
        server.drain(0)


def _write(folder, content: bytes, name: str = "a.wav"):
    path = folder / name
    path.write_bytes(content)
    return path


def test_serve_refuses_a_metrics_port_in_use(tmp_path, model_file):
    process, _ = spawn_server("--model", str(model_file), "--enroll-db", str(tmp_path / "a.sqlite"), "--metrics-port", "0")
    try:
        taken = int(process.announcement.split("metrics on http://127.0.0.1:")[1].split("/")[0])
        result = subprocess.run([*SPKFT, "serve", "--model", str(model_file), "--port", "0",
                                 "--enroll-db", str(tmp_path / "b.sqlite"), "--metrics-port", str(taken)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert result.stderr.startswith(f"error: cannot serve metrics on 127.0.0.1:{taken}: ")
        assert len(result.stderr.splitlines()) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
