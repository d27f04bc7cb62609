"""The gRPC speaker service: real servers on port 0, real channels, a tiny exported model.

One server (no auth) serves most tests; small extra servers share the same loaded model for
auth/TLS and the queue limit; three ``spkft serve`` subprocesses check kill -9 and SIGTERM.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from typer.testing import CliRunner

from spkft.core.errors import EnrollmentError
from spkft.core.onnx_model import OnnxEmbedder
from spkft.serve import codegen
from spkft.serve.batching import Batcher, BatcherClosedError
from spkft.serve.client import ServiceError, SpeakerClient
from spkft.serve.server import ServerConfig, ServerError, create_server
from spkft.serve.service import SERVICE_NAME
from spkft.serve.v1 import speaker_service_pb2 as pb
from spkft.serve.v1 import speaker_service_pb2_grpc as pb_grpc
from spkft.tui.cli import app

from serve_helpers import ROOT, SPKFT, read_line, spawn_server, started, wait_until, wav_bytes

CODE = grpc.StatusCode
MAX_AUDIO_SECONDS = 20.0


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_file, onnx_embedder):
    config = ServerConfig(model=model_file, port=0, enroll_db=tmp_path_factory.mktemp("db") / "e.sqlite",
                          threshold=0.5, max_audio_seconds=MAX_AUDIO_SECONDS)
    server = started(config, onnx_embedder)
    yield server
    server.drain(0)


@pytest.fixture(scope="module")
def client(server):
    with SpeakerClient(server.address) as client:
        yield client


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.SpeakerServiceStub(channel)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


# ---------------------------------------------------------------- stubs, health, reflection


def test_checked_in_stubs_are_current(tmp_path):
    pytest.importorskip("grpc_tools")
    fresh = codegen.generate(tmp_path)
    assert sorted(p.name for p in fresh) == sorted(p.name for p in codegen.STUBS.glob("*_pb2*"))
    for path in fresh:
        assert path.read_bytes() == (codegen.STUBS / path.name).read_bytes(), (
            f"serve/v1/{path.name} is stale: run python -m spkft.serve.codegen"
        )


def test_health_is_not_serving_until_the_model_is_loaded(tmp_path, model_file, onnx_embedder):
    server = create_server(ServerConfig(model=model_file, port=0, enroll_db=tmp_path / "e.sqlite"))
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                request = health_pb2.HealthCheckRequest(service=service)
                assert health.Check(request).status == health_pb2.HealthCheckResponse.NOT_SERVING
            code, details = status_of(lambda: pb_grpc.SpeakerServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest()))
            assert code == CODE.UNAVAILABLE and "loading" in details
            server.load(onnx_embedder)
            for service in ("", SERVICE_NAME):
                request = health_pb2.HealthCheckRequest(service=service)
                assert health.Check(request).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.drain(0)


def test_a_second_server_on_the_same_enrollment_store_is_refused(server, model_file, onnx_embedder):
    second = create_server(ServerConfig(model=model_file, port=0, enroll_db=server.config.enroll_db))
    second.start()
    try:
        with pytest.raises(EnrollmentError, match="in use by another server or process"):
            second.load(onnx_embedder)
    finally:
        second.drain(0)


def test_the_audio_of_one_call_is_bounded(stub, speech):
    data, rate = speech
    audios = [pb.Audio(content=b"x")] * 33  # refused on the count, before anything is decoded
    code, details = status_of(lambda: stub.EnrollSpeaker(pb.EnrollSpeakerRequest(speaker_id="many", audios=audios)))
    assert code == CODE.INVALID_ARGUMENT and "33 recordings in one call; at most 32" in details
    # Six recordings of 18 s: each under the 20 s limit, 108 s in all against 5 x 20 s.
    long = wav_bytes(np.tile(data, 2)[: 18 * rate], rate, "FLAC")
    request = pb.EnrollSpeakerRequest(speaker_id="long", audios=[pb.Audio(content=long)] * 6)
    code, details = status_of(lambda: stub.EnrollSpeaker(request))
    assert code == CODE.INVALID_ARGUMENT and "more than 100 s of audio in all (over it at audios[5])" in details
    assert "long" not in {s.speaker_id for s in stub.ListSpeakers(pb.ListSpeakersRequest()).speakers}


def test_reflection_lists_the_services(server):
    with grpc.insecure_channel(server.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(responses).list_services_response.service}
    assert {"spkft.v1.SpeakerService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


# ---------------------------------------------------------------- the RPCs


def test_served_embedding_equals_spkft_embed_with_the_same_model(client, model_file, speech_file):
    served = client.embed(speech_file)
    result = CliRunner().invoke(app, ["embed", "--model", str(model_file), str(speech_file)])
    assert result.exit_code == 0, result.output
    local = json.loads(result.output)
    assert len(served.embedding) == len(local["embedding"]) == 192
    np.testing.assert_allclose(np.array(served.embedding), local["embedding"], atol=1e-5)
    assert served.duration_seconds == pytest.approx(local["duration_seconds"], abs=1e-4)


def test_pcm_and_encoded_audio_embed_alike(client, clips):
    samples, rate = sf.read(io.BytesIO(clips[2]), dtype="int16")
    from_file = np.array(client.embed(clips[2]).embedding)
    as_int16 = pb.Audio(pcm=pb.PcmAudio(samples=samples.astype("<i2").tobytes(), sample_rate_hertz=rate,
                                        format=pb.SAMPLE_FORMAT_INT16))
    np.testing.assert_allclose(np.array(client.embed(as_int16).embedding), from_file, atol=1e-5)
    stereo = np.repeat((samples / 32768.0).astype("<f4")[:, None], 2, axis=1)
    as_float32 = pb.Audio(pcm=pb.PcmAudio(samples=stereo.tobytes(), sample_rate_hertz=rate,
                                          format=pb.SAMPLE_FORMAT_FLOAT32, channel_count=2))
    np.testing.assert_allclose(np.array(client.embed(as_float32).embedding), from_file, atol=1e-5)


def test_verify_against_a_recording_and_with_thresholds(client, clips, other_speaker):
    same = client.verify(clips[0], reference=clips[0])
    assert same.score == pytest.approx(1.0, abs=1e-5) and same.threshold == 0.5 and same.accepted
    other = client.verify(clips[0], reference=other_speaker, threshold=1.0)
    assert other.threshold == 1.0 and not other.accepted and -1.0 <= other.score < 1.0


def test_enroll_identify_list_verify_delete(client, clips, other_speaker):
    assert client.enroll("alice", clips[:2]).utterance_count == 2
    assert client.enroll("alice", [clips[2]]).utterance_count == 3  # adds to the earlier enrollment
    assert client.enroll("bob", [other_speaker]).utterance_count == 1
    listed = {(s.speaker_id, s.utterance_count) for s in client.speakers().speakers}
    assert {("alice", 3), ("bob", 1)} <= listed

    matches = client.identify(other_speaker, top_k=2).matches
    # The index holds enrolled embeddings in float16: a recording scored against itself comes within
    # about 1e-4 of 1, the rounding of 192 half-precision components.
    assert [m.speaker_id for m in matches][0] == "bob" and matches[0].score == pytest.approx(1.0, abs=2e-4)
    assert len(matches) == 2 and matches[0].score >= matches[1].score
    assert len(client.identify(other_speaker).matches) == 1  # top_k 0 means 1

    verified = client.verify(other_speaker, speaker_id="bob")
    assert verified.accepted and verified.score == pytest.approx(1.0, abs=2e-4)  # float16, as above

    deleted = client.delete("bob")
    assert (deleted.speaker_id, deleted.utterance_count) == ("bob", 1)
    assert "bob" not in {s.speaker_id for s in client.speakers().speakers}
    client.delete("alice")


def test_model_info(client, model_file, onnx_embedder):
    info = client.info()
    assert (info.engine, info.precision) == (onnx_embedder.engine.name, onnx_embedder.engine.precision)
    assert info.model_name == "tiny" and info.embedding_dim == 192 and info.sample_rate_hertz == 16000
    assert info.HasField("default_threshold") and info.default_threshold == 0.5  # the server's --threshold
    assert info.metadata["framework"] == "3d-speaker" and info.metadata["spkft_variant"] == "eres2netv2_w24s4ep4"


# ---------------------------------------------------------------- errors


def pcm(samples: bytes, rate: int = 16000, fmt: int = pb.SAMPLE_FORMAT_INT16, channels: int = 0) -> pb.Audio:
    return pb.Audio(pcm=pb.PcmAudio(samples=samples, sample_rate_hertz=rate, format=fmt, channel_count=channels))


def tone(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


BAD_AUDIO = {
    "empty bytes": (pb.Audio(content=b""), "no bytes"),
    "random bytes": (pb.Audio(content=np.random.default_rng(0).bytes(4000)), "not a readable audio file"),
    "a text file": (pb.Audio(content=b"path,speaker\nrecordings/a.wav,alice\n"), "not a readable audio file"),
    "0.05 s": (pb.Audio(content=wav_bytes(tone(0.05))), "too short"),
    "over the limit": (pb.Audio(content=wav_bytes(tone(MAX_AUDIO_SECONDS + 1))), "too long"),
    "pcm over the limit": (pcm((tone(MAX_AUDIO_SECONDS + 1) * 32767).astype("<i2").tobytes()), "too long"),
    "silence": (pcm(np.zeros(16000, "<i2").tobytes()), "silent"),
    "no source": (pb.Audio(), "holds no audio"),
    "unspecified format": (pcm(np.ones(16000, "<i2").tobytes(), fmt=pb.SAMPLE_FORMAT_UNSPECIFIED), "SAMPLE_FORMAT_UNSPECIFIED"),
    "unknown format": (pcm(np.ones(16000, "<i2").tobytes(), fmt=7), "format is 7"),
    "int16 sent as float32": (pcm(np.full(16000, 20000, "<i2").tobytes(), fmt=pb.SAMPLE_FORMAT_FLOAT32),
                              "outside [-1, 1]"),
    "odd byte count": (pcm(b"\x01\x02\x03"), "not a whole number"),
    "no sample rate": (pcm(np.ones(16000, "<i2").tobytes(), rate=0), "sample rate must be positive"),
    # 2 s, yet more samples than MAX_AUDIO_SECONDS of 48 kHz stereo: refused from the header.
    "8 channels at 192 kHz": (pb.Audio(content=wav_bytes(np.tile(tone(2.0, 192_000)[:, None], (1, 8)), 192_000, "FLAC")),
                              "too much audio"),
}


@pytest.mark.parametrize("audio, message", BAD_AUDIO.values(), ids=BAD_AUDIO.keys())
def test_bad_audio_is_invalid_argument(stub, audio, message):
    code, details = status_of(lambda: stub.Embed(pb.EmbedRequest(audio=audio)))
    assert code == CODE.INVALID_ARGUMENT and message in details
    assert " at 0x" not in details  # no Python object's address (of a buffer, say) leaks out


MALFORMED = {
    "a truncated varint": ("Identify", b"\x10\xff\xff"),  # top_k, its varint cut short
    "invalid UTF-8 in a string": ("DeleteSpeaker", b"\x0a\x02\xff\xfe"),  # speaker_id
    "a length past the end": ("Embed", b"\x0a\x7f\x0a"),
}


@pytest.mark.parametrize("method, raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_message_is_invalid_argument_with_one_log_line(server, caplog, method, raw):
    with grpc.insecure_channel(server.address) as channel, caplog.at_level(logging.INFO):
        call = channel.unary_unary(f"/{SERVICE_NAME}/{method}")  # bytes in, bytes out
        code, details = status_of(lambda: call(raw, timeout=10))
    assert code == CODE.INVALID_ARGUMENT and "malformed request" in details
    mine = [r for r in caplog.records if "malformed" in r.getMessage() or r.exc_info]
    assert len(mine) <= 1 and not any(r.exc_info for r in caplog.records)


def test_an_odd_sample_rate_embeds_like_its_round_neighbour(stub):
    one = (tone(1.0, 16_000) * 32767).astype("<i2").tobytes()
    at_16000 = stub.Embed(pb.EmbedRequest(audio=pcm(one, rate=16_000))).embedding
    at_16001 = stub.Embed(pb.EmbedRequest(audio=pcm(one, rate=16_001))).embedding
    assert float(np.dot(at_16000, at_16001)) > 0.999


BAD_REQUESTS = {
    "embed without audio": ("Embed", pb.EmbedRequest(), CODE.INVALID_ARGUMENT, "audio is missing"),
    "top_k below 0": ("Identify", pb.IdentifyRequest(top_k=-1), CODE.INVALID_ARGUMENT, "top_k"),
    "top_k above 1000": ("Identify", pb.IdentifyRequest(top_k=1001), CODE.INVALID_ARGUMENT, "top_k"),
    "enroll without id": ("EnrollSpeaker", pb.EnrollSpeakerRequest(audios=[pb.Audio(content=b"x")]),
                          CODE.INVALID_ARGUMENT, "speaker_id must not be empty"),
    "enroll without audio": ("EnrollSpeaker", pb.EnrollSpeakerRequest(speaker_id="carol"), CODE.INVALID_ARGUMENT, "audios is empty"),
    "enroll bad audio": ("EnrollSpeaker", pb.EnrollSpeakerRequest(speaker_id="carol", audios=[pb.Audio(content=b"")]),
                         CODE.INVALID_ARGUMENT, "audios[0]"),
    "delete without id": ("DeleteSpeaker", pb.DeleteSpeakerRequest(), CODE.INVALID_ARGUMENT, "speaker_id"),
    "delete unknown": ("DeleteSpeaker", pb.DeleteSpeakerRequest(speaker_id="nobody"), CODE.NOT_FOUND, "'nobody' is not enrolled"),
    "verify without reference": ("Verify", pb.VerifyRequest(test_audio=pb.Audio(content=b"x")), CODE.INVALID_ARGUMENT,
                                 "reference_audio or speaker_id"),
    "verify empty id": ("Verify", pb.VerifyRequest(speaker_id=""), CODE.INVALID_ARGUMENT, "speaker_id"),
    "verify unknown": ("Verify", pb.VerifyRequest(speaker_id="nobody"), CODE.NOT_FOUND, "'nobody' is not enrolled"),
    "threshold above 1": ("Verify", pb.VerifyRequest(speaker_id="nobody", threshold=1.5), CODE.INVALID_ARGUMENT, "[-1, 1]"),
    "threshold NaN": ("Verify", pb.VerifyRequest(speaker_id="nobody", threshold=float("nan")), CODE.INVALID_ARGUMENT, "finite"),
    "p_target 0": ("Verify", pb.VerifyRequest(speaker_id="nobody", p_target=0.0), CODE.INVALID_ARGUMENT, "p_target"),
}


@pytest.mark.parametrize("method, request_, code, message", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests(stub, method, request_, code, message):
    got, details = status_of(lambda: getattr(stub, method)(request_))
    assert got == code and message in details
    assert "carol" not in {s.speaker_id for s in stub.ListSpeakers(pb.ListSpeakersRequest()).speakers}


def test_a_message_over_the_size_limit_is_resource_exhausted(stub, server):
    code, _ = status_of(lambda: stub.Embed(pb.EmbedRequest(audio=pb.Audio(content=b"\0" * (server.config.max_message_bytes + 1)))))
    assert code == CODE.RESOURCE_EXHAUSTED


# ---------------------------------------------------------------- concurrency


def test_batcher_batches_equal_lengths_only():
    seen: list[tuple[int, int]] = []
    gate = threading.Event()

    def embed_batch(features: np.ndarray) -> np.ndarray:
        seen.append(features.shape[:2])
        gate.wait(10)
        return features[:, 0, :2].copy()

    batcher = Batcher(embed_batch, workers=1, max_batch=4)
    inputs = [np.full((1, frames, 80), i, np.float32) for i, frames in enumerate([10, 10, 12, 10, 10, 10])]
    results = run_while_busy(batcher, inputs, gate, seen)
    batcher.close()
    assert seen == [(1, 5), (4, 10), (1, 12), (1, 10)]  # four 10-frame rows together; the fifth and the 12 apart
    assert [r[0, 0] for r in results] == list(range(6))  # every caller gets its own row back

    seen.clear()
    batcher = Batcher(embed_batch, workers=1, max_batch=16, max_batch_frames=25)
    run_while_busy(batcher, [np.zeros((rows, 10, 80), np.float32) for rows in (1, 1, 1, 3)], gate, seen)
    batcher.close()
    assert seen == [(1, 5), (2, 10), (1, 10), (3, 10)]  # at most 25 frames a batch, but an input is never split


def test_a_lone_input_runs_in_its_callers_thread_and_errors_reach_every_caller_of_the_batch():
    threads = []

    def embed_batch(features: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread())
        if features[0, 0, 0] < 0:
            raise ValueError("negative")
        return features[:, 0, :2].copy()

    batcher = Batcher(embed_batch, workers=1, max_wait_seconds=1.0)
    assert batcher.run(np.ones((1, 10, 80), np.float32)).shape == (1, 2)
    assert threads == [threading.current_thread()]  # no hand-off to another thread
    errors = []

    def failing(x: np.ndarray) -> None:
        try:
            batcher.run(x)
        except ValueError as exc:
            errors.append(str(exc))

    callers = [threading.Thread(target=failing, args=(np.full((1, 10, 80), -1, np.float32),)) for _ in range(3)]
    for caller in callers:
        caller.start()
        wait_until(lambda: batcher.pending == callers.index(caller) + 1)
    for caller in callers:
        caller.join(10)
    assert errors == ["negative"] * 3 and len(threads) == 2  # one batch, one error, three callers told
    batcher.close()
    with pytest.raises(BatcherClosedError):
        batcher.run(np.ones((1, 10, 80), np.float32))


def run_while_busy(batcher: Batcher, inputs: list[np.ndarray], gate: threading.Event, seen: list) -> list[np.ndarray]:
    """Each input from its own thread, queued in order while a 5-frame input holds the only slot until ``gate``."""
    gate.clear()
    results: list = [None] * len(inputs)

    def call(i: int) -> None:
        results[i] = batcher.run(inputs[i])

    blocker = threading.Thread(target=batcher.run, args=(np.zeros((1, 5, 80), np.float32),))
    blocker.start()
    wait_until(lambda: (1, 5) in seen)  # the blocker is being embedded
    callers = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for i, caller in enumerate(callers):
        caller.start()
        wait_until(lambda: batcher.pending == i + 1)
    gate.set()
    for caller in [blocker, *callers]:
        caller.join(10)
    return results


def test_200_concurrent_embeds_are_all_answered_like_sequential_ones(stub, clips):
    sequential = [np.array(stub.Embed(pb.EmbedRequest(audio=pb.Audio(content=c))).embedding) for c in clips]
    futures = [stub.Embed.future(pb.EmbedRequest(audio=pb.Audio(content=clips[i % len(clips)]))) for i in range(200)]
    for i, future in enumerate(futures):
        np.testing.assert_allclose(np.array(future.result(timeout=120).embedding), sequential[i % len(clips)], atol=1e-5)


class ControlledEmbedder(OnnxEmbedder):
    """The tiny model, with inference a test can hold back or make fail."""

    def __init__(self, model: OnnxEmbedder) -> None:
        super().__init__(model.engine, model.path)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.failure: Exception | None = None
        self.finished = 0  # calls that returned

    def embed_batch(self, features):
        self.entered.set()
        self.gate.wait(60)
        if self.failure is not None:
            raise self.failure
        out = super().embed_batch(features)
        self.finished += 1
        return out


@pytest.fixture
def controlled(tmp_path, model_file, onnx_embedder):
    model = ControlledEmbedder(onnx_embedder)
    config = ServerConfig(model=model_file, port=0, enroll_db=tmp_path / "e.sqlite", workers=1, max_queue=1,
                          batch_wait_seconds=0)
    server = started(config, model)
    yield server, model
    model.gate.set()
    server.drain(0)


def test_a_full_queue_is_resource_exhausted(controlled, clips):
    server, model = controlled
    model.gate.clear()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SpeakerServiceStub(channel)
        request = pb.EmbedRequest(audio=pb.Audio(content=clips[0]))
        running = stub.Embed.future(request)
        wait_until(model.entered.is_set)  # the only worker is busy with it
        waiting = stub.Embed.future(request)
        wait_until(lambda: server.batcher.pending == 1)  # the queue (max_queue=1) is full
        code, details = status_of(lambda: stub.Embed(request))
        assert code == CODE.RESOURCE_EXHAUSTED and "busy" in details
        model.gate.set()
        assert len(running.result(timeout=30).embedding) == len(waiting.result(timeout=30).embedding) == 192


def test_health_answers_at_once_while_hundreds_of_calls_wait_or_are_refused(tmp_path, model_file, onnx_embedder, clips):
    model = ControlledEmbedder(onnx_embedder)
    config = ServerConfig(model=model_file, port=0, enroll_db=tmp_path / "e.sqlite", handler_threads=4, max_queue=8)
    server = started(config, model)
    model.gate.clear()  # inference never finishes while the probes run: every handler thread stays busy
    channels = [grpc.insecure_channel(server.address) for _ in range(10)]
    try:
        request = pb.EmbedRequest(audio=pb.Audio(content=clips[0]))
        calls = [pb_grpc.SpeakerServiceStub(channels[i % 10]).Embed.future(request) for i in range(400)]
        probes = [health_pb2_grpc.HealthStub(channels[i % 10]).Check.future(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5) for i in range(15)]
        assert [probe.result().status for probe in probes] == [health_pb2.HealthCheckResponse.SERVING] * 15
        held = config.handler_threads + config.max_queue
        wait_until(lambda: sum(call.done() for call in calls) == len(calls) - held)
        assert server.calls_held == held
        refused = [call for call in calls if call.done()]
        assert {call.code() for call in refused} == {CODE.RESOURCE_EXHAUSTED}
        assert "busy" in refused[0].details()
        status = health_pb2_grpc.HealthStub(channels[0]).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        model.gate.set()
        assert all(len(call.result(timeout=60).embedding) == 192 for call in calls if call not in refused)
    finally:
        model.gate.set()
        for channel in channels:
            channel.close()
        server.drain(0)


def test_an_enrollment_whose_caller_gave_up_is_never_stored(controlled, clips):
    server, model = controlled
    model.gate.clear()  # inference blocks until the test lets it go
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SpeakerServiceStub(channel)
        request = pb.EnrollSpeakerRequest(speaker_id="late", audios=[pb.Audio(content=clip) for clip in clips[:3]])
        call = stub.EnrollSpeaker.future(request, timeout=3.0)
        wait_until(model.entered.is_set)  # the work has reached the network...
        assert call.exception(timeout=30).code() == CODE.DEADLINE_EXCEEDED  # ...when the caller gives up
        model.gate.set()  # the work could now finish
        wait_until(lambda: model.finished >= 1 and server.batcher.pending == 0)
        time.sleep(0.5)  # time for the handler to reach its store step, if it went on
        # Nothing is stored for a call that is no longer there, so the retry enrolls once.
        assert stub.ListSpeakers(pb.ListSpeakersRequest()).speakers == []
        assert stub.EnrollSpeaker(request, timeout=60).utterance_count == 3


def test_an_unexpected_failure_is_internal_and_the_server_lives_on(controlled, clips, caplog):
    server, model = controlled
    model.failure = RuntimeError("onnxruntime fell over")
    with SpeakerClient(server.address) as client:
        with pytest.raises(ServiceError) as caught:
            client.embed(clips[0])
        assert caught.value.code == "INTERNAL" and "logged on the server" in caught.value.details
        assert "onnxruntime fell over" not in str(caught.value) and "Traceback" not in str(caught.value)
        model.failure = None
        assert len(client.embed(clips[0]).embedding) == 192
    assert any("onnxruntime fell over" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


# ---------------------------------------------------------------- auth and TLS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory, model_file, onnx_embedder, tls_files):
    cert, key = tls_files
    config = ServerConfig(model=model_file, port=0, enroll_db=tmp_path_factory.mktemp("secure") / "e.sqlite",
                          auth_token="s3cret", tls_cert=cert, tls_key=key)
    server = started(config, onnx_embedder)
    yield server
    server.drain(0)


@pytest.mark.parametrize("token, code", [(None, "UNAUTHENTICATED"), ("wrong", "UNAUTHENTICATED"), ("s3cret", None)])
def test_bearer_token_over_tls(secure_server, tls_files, clips, token, code):
    with SpeakerClient(secure_server.address, auth_token=token, tls_ca=tls_files[0]) as client:
        if code is None:
            assert len(client.embed(clips[0]).embedding) == 192
            assert client.info().model_name == "tiny"
        else:
            with pytest.raises(ServiceError) as caught:
                client.info()
            assert caught.value.code == code and "bearer token" in caught.value.details


@pytest.mark.parametrize("metadata, code", [
    ((("authorization", "bearer s3cret"),), None),  # the scheme's name in any case (RFC 6750)
    ((("authorization", "BEARER s3cret"),), None),
    ((("authorization", "Basic s3cret"),), CODE.UNAUTHENTICATED),
    ((("authorization", "Bearer s3cret"), ("authorization", "Bearer s3cret")), CODE.UNAUTHENTICATED),
    ((("authorization", "Bearer wrong"), ("authorization", "Bearer s3cret")), CODE.UNAUTHENTICATED),
])
def test_the_bearer_scheme_and_one_authorization_entry(secure_server, tls_files, metadata, code):
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_files[0].read_bytes())
    with grpc.secure_channel(secure_server.address, credentials) as channel:
        stub = pb_grpc.SpeakerServiceStub(channel)
        if code is None:
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata).model_name == "tiny"
        else:
            got, details = status_of(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata))
            assert got == code and (len(metadata) == 1 or "more than one authorization" in details)


def test_an_empty_auth_token_is_refused_not_taken_as_no_auth(model_file, tmp_path):
    with pytest.raises(ServerError, match="the auth token is empty"):
        create_server(ServerConfig(model=model_file, port=0, enroll_db=tmp_path / "e.sqlite", auth_token=""))
    result = CliRunner().invoke(app, ["serve", "--model", str(model_file), "--auth-token", "",
                                      "--enroll-db", str(tmp_path / "e.sqlite")])
    assert result.exit_code != 0 and "the auth token is empty" in result.output


def test_health_needs_no_token_but_reflection_does(secure_server, tls_files):
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_files[0].read_bytes())
    with grpc.secure_channel(secure_server.address, credentials) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        code, _ = status_of(lambda: next(reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
        assert code == CODE.UNAUTHENTICATED


def test_bad_tls_files_are_named_not_taken_for_a_busy_port(tls_files, model_file, tmp_path):
    cert, key = tls_files
    other_key = tmp_path / "other.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-out", str(other_key)], check=True, capture_output=True)
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    for tls_cert, tls_key, message in ((junk, key, f"{junk} is not a PEM certificate"),
                                       (cert, junk, f"{junk} is not a PEM private key"),
                                       (cert, other_key, f"the key {other_key} does not belong to the certificate")):
        with pytest.raises(ServerError) as refused:
            create_server(ServerConfig(model=model_file, port=0, enroll_db=tmp_path / "e.sqlite",
                                       tls_cert=tls_cert, tls_key=tls_key))
        assert message in str(refused.value) and "port" not in str(refused.value)


def test_a_plaintext_client_cannot_talk_to_a_tls_server(secure_server):
    with SpeakerClient(secure_server.address, auth_token="s3cret", timeout_seconds=5) as client:
        with pytest.raises(ServiceError, match="UNAVAILABLE"):
            client.info()


# ---------------------------------------------------------------- the command line


def test_client_commands(server, clips, other_speaker, tmp_path):
    files = []
    for i, audio in enumerate([clips[0], clips[1], other_speaker]):
        files.append(tmp_path / f"{i}.wav")
        files[-1].write_bytes(audio)
    runner = CliRunner()

    def spkft(*args: str) -> str:
        result = runner.invoke(app, ["client", *args, "--server", server.address])
        assert result.exit_code == 0, result.output
        return result.output

    assert "1.50 s, 192 values" in spkft("embed", str(files[0]))
    assert '"embedding": [' in spkft("embed", str(files[0]), "--json")
    assert spkft("enroll", "dave", str(files[0]), str(files[1])) == "enrolled dave: 2 recording(s) in all\n"
    assert "dave  2 recording(s)" in spkft("speakers")
    assert spkft("verify", str(files[0]), str(files[0])) == "score 1.0000 >= threshold 0.5000: same speaker\n"
    assert "same speaker" in spkft("verify", str(files[0]), "--speaker", "dave", "--threshold", "-1")
    assert "1. dave" in spkft("identify", str(files[0]), "--top-k", "3")
    assert '"default_threshold": 0.5' in spkft("info", "--json")
    served = server.service.model
    assert re.search(rf"^engine +{served.engine} \({served.precision}\)$", spkft("info"), re.MULTILINE)
    assert spkft("delete", "dave") == "deleted dave (2 recording(s))\n"

    missing = runner.invoke(app, ["client", "delete", "dave", "--server", server.address])
    assert missing.exit_code == 1
    assert missing.output.strip() == "error: NOT_FOUND: speaker 'dave' is not enrolled"

    # An error about a file sent names that file, in the server's own words about it.
    notes = tmp_path / "notes.wav"
    notes.write_text("not audio\n")
    for args in (["verify", str(notes), str(files[0])], ["verify", str(files[0]), str(notes)],
                 ["enroll", "erin", str(files[0]), str(notes)], ["identify", str(notes)], ["embed", str(notes)]):
        refused = runner.invoke(app, ["client", *args, "--server", server.address])
        assert refused.exit_code == 1
        assert refused.output.strip() == (f"error: INVALID_ARGUMENT: {notes}: not a readable audio file "
                                           "(WAV, FLAC, OGG or MP3 expected): Format not recognised."), args


# ---------------------------------------------------------------- spkft serve in a subprocess


def test_enrollments_survive_kill_9_and_a_restart(tmp_path, model_file, clips, other_speaker):
    args = ("--model", str(model_file), "--enroll-db", str(tmp_path / "e.sqlite"))
    process, address = spawn_server(*args)
    try:
        with SpeakerClient(address) as client:
            client.enroll("alice", clips[:2])
            client.enroll("bob", [other_speaker])
            client.enroll("alice", [clips[2]])
            before = client.verify(clips[3], speaker_id="alice", threshold=0.0).score
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    process, address = spawn_server(*args)
    try:
        with SpeakerClient(address) as client:
            assert [(s.speaker_id, s.utterance_count) for s in client.speakers().speakers] == [("alice", 3), ("bob", 1)]
            assert client.verify(clips[3], speaker_id="alice", threshold=0.0).score == pytest.approx(before, abs=1e-6)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()


SLOW_SERVER = """
import os, sys, time
from spkft.core.onnx_model import OnnxEmbedder

fast = OnnxEmbedder.embed_batch

def slow(self, features):
    print("inference started", flush=True)
    time.sleep(float(os.environ.get("SLOW_SECONDS", "3")))
    return fast(self, features)

OnnxEmbedder.embed_batch = slow
from spkft.tui.cli import main
sys.argv[0] = "spkft"
main()
"""


def test_a_file_that_is_not_a_model_is_one_line_without_library_noise(tmp_path):
    (tmp_path / "bad.onnx").write_text("junk\n")  # other frameworks' readers would parse it and complain
    result = subprocess.run([*SPKFT, "serve", "--model", str(tmp_path / "bad.onnx"), "--port", "0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert result.stderr == f"error: {tmp_path / 'bad.onnx'}: not a readable ONNX model (spkft export writes one)\n"


def health_of(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                          timeout=10).status


def test_sigterm_lets_the_call_in_flight_finish_and_exits_0(tmp_path, model_file, clips):
    process, address = spawn_server("--model", str(model_file), "--enroll-db", str(tmp_path / "e.sqlite"),
                                     code=SLOW_SERVER)
    try:
        with SpeakerClient(address) as client, ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.embed, clips[0])
            read_line(process, "inference started")
            process.send_signal(signal.SIGTERM)
            # While the call finishes, health answers NOT_SERVING (as README says), and new calls are refused.
            wait_until(lambda: health_of(address) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
            with pytest.raises(ServiceError) as refused:
                client.embed(clips[1])
            assert refused.value.code == "UNAVAILABLE" and "shutting down" in refused.value.details
            assert len(in_flight.result(timeout=60).embedding) == 192
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert "stopped" in out and "draining" in err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_the_grace_period_bounds_the_exit_whatever_a_call_is_doing(tmp_path, model_file, clips):
    env = os.environ | {"SLOW_SECONDS": "120"}  # a call that would run for two minutes
    command = [sys.executable, "-c", SLOW_SERVER, "serve", "--port", "0", "--model", str(model_file),
               "--enroll-db", str(tmp_path / "e.sqlite"), "--grace-seconds", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        address = read_line(process, "listening on").split("listening on ")[1].split()[0]
        with SpeakerClient(address) as client, ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.embed, clips[0])
            read_line(process, "inference started")
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)
            took = time.monotonic() - signalled
            assert process.returncode == 0 and took < 15, took  # 1 s of grace and a small bound, not 120 s
            with pytest.raises(ServiceError):
                in_flight.result(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
