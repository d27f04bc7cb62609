"""The ``spkft.v1.SpeakerService`` RPCs, on a loaded model and an enrollment store.

Every RPC runs in a gRPC request thread: it checks the request, decodes its audio and computes
fbank there, and waits for the network on the shared :class:`~spkft.serve.batching.Batcher`.
Failures leave as gRPC status codes (see :func:`status_of`): bad input is INVALID_ARGUMENT,
an unknown speaker NOT_FOUND, a full queue RESOURCE_EXHAUSTED, an unreachable enrollment
database UNAVAILABLE; anything unexpected is logged
here with its traceback and reaches the client as INTERNAL with a reference to that log line,
never as UNKNOWN with a traceback.
"""

from __future__ import annotations

import base64
import functools
import logging
import math
import threading
import uuid
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from spkft.core.audio import Waveform, decode_pcm, load_audio
from spkft.core.calibration import Calibration, bayes_threshold, probability
from spkft.core.embedding import Embedding, SpeakerEmbedder
from spkft.core.enrollment import EnrollmentStore, check_speaker_id
from spkft.core.errors import AudioError, EnrollmentError, InputTooShortError, StoreUnavailableError, UnknownSpeakerError
from spkft.core.features import SAMPLE_RATE, fbank
from spkft.core.plda import Plda, score_kind
from spkft.serve.batching import BatcherClosedError, QueueFullError
from spkft.serve.metrics import note_audio
from spkft.serve.v1 import speaker_service_pb2 as pb
from spkft.serve.v1 import speaker_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpeakerService"].full_name
MAX_TOP_K = 1000
# The prior of a same-speaker trial a Verify request gets unless it or the server sets another:
# the operating point NIST's speaker recognition evaluations and spkft eval's minDCF use.
DEFAULT_P_TARGET = 0.01
DEFAULT_PAGE_SIZE = 1000  # ListSpeakers
MAX_PAGE_SIZE = 10_000
# A request's audio is at most 48 kHz stereo: samples (frames times channels) per second of it.
MAX_SAMPLES_PER_SECOND = 48_000 * 2
_PCM_FORMATS = {pb.SAMPLE_FORMAT_INT16: "int16", pb.SAMPLE_FORMAT_FLOAT32: "float32"}


class InvalidRequestError(Exception):
    """A request field that is missing or out of range."""


class NotReadyError(Exception):
    """The model is not loaded yet."""


class CallEndedError(Exception):
    """The client cancelled the call or its deadline passed: the rest of the work is not done."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        remaining = context.time_remaining()
        self.code = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
                     else grpc.StatusCode.CANCELLED)
        super().__init__("the call ended (deadline passed or cancelled) before its work was done; nothing was stored")


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc``; unexpected errors are logged here."""
    if isinstance(exc, UnknownSpeakerError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, StoreUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, (InvalidRequestError, AudioError, InputTooShortError, EnrollmentError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (NotReadyError, BatcherClosedError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, CallEndedError):
        return exc.code, str(exc)
    reference = uuid.uuid4().hex[:12]
    log.error("internal error %s", reference, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal server error (logged on the server as {reference})"


def _rpc(method):
    """Turns every exception an RPC raises into a status code and message (see :func:`status_of`),
    and counts the call in flight, so a draining server knows when the last one is done."""

    @functools.wraps(method)
    def handler(self, request, context: grpc.ServicerContext):
        if not self._enter():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        try:
            return method(self, request, context)
        except Exception as exc:  # every failure must become a status code, never UNKNOWN
            code, message = status_of(exc)
        finally:
            self._leave()
        context.abort(code, message)

    return handler


@dataclass(frozen=True)
class ServedModel:
    """What the service needs once the model is loaded."""

    embedder: SpeakerEmbedder  # batched: its network calls go through the shared batcher
    store: EnrollmentStore
    model_name: str
    metadata: dict[str, str]
    default_threshold: float | None
    engine: str  # what runs the network, and in what precision (GetModelInfo reports both)
    precision: str
    plda: Plda | None = None  # scores are its LLRs instead of cosines
    calibration: Calibration | None = None  # maps scores to calibrated LLRs
    explicit_threshold: bool = False  # default_threshold was the server's --threshold (it wins over Bayes decisions)
    p_target: float = DEFAULT_P_TARGET  # the server's prior of a same-speaker trial
    c_miss: float = 1.0
    c_fa: float = 1.0

    @property
    def scoring(self) -> str:
        return score_kind(self.plda)

    def score(self, claimed: np.ndarray, test: np.ndarray) -> float:
        """The trial's score: the cosine of the two unit embeddings, or the PLDA's LLR."""
        if self.plda is None:
            return float(np.clip(np.dot(claimed, test), -1.0, 1.0))
        return float(self.plda.llr(claimed[None, :], test[None, :])[0])


class SpeakerService(pb_grpc.SpeakerServiceServicer):
    """The RPCs; UNAVAILABLE until :meth:`serve` is given the loaded model."""

    def __init__(self, max_audio_seconds: float, max_recordings: int = 32, max_call_seconds: float = 300.0,
                 max_preparing: int = 2) -> None:
        self.max_audio_seconds = max_audio_seconds
        # Decoding, resampling and fbank take tens of MB each for a minute of audio, for a moment:
        # at most this many calls do them at once (they are CPU-bound, so more would not be faster).
        self._preparing = threading.BoundedSemaphore(max_preparing)
        # Work per call: an EnrollSpeaker of many small, well-compressed recordings fits in one
        # message yet could keep the server busy for minutes.
        self.max_recordings = max_recordings
        self.max_call_seconds = max_call_seconds
        # Decoded audio is bounded like a message: no more samples (frames times channels) than
        # max_audio_seconds of 48 kHz stereo, however small its encoding.
        self.max_samples = int(max_audio_seconds * MAX_SAMPLES_PER_SECOND)
        self._model: ServedModel | None = None
        self._calls = threading.Condition()
        self._in_flight = 0
        self._draining = False

    def serve(self, model: ServedModel) -> None:
        self._model = model

    def _enter(self) -> bool:
        with self._calls:
            if self._draining:
                return False
            self._in_flight += 1
            return True

    def _leave(self) -> None:
        with self._calls:
            self._in_flight -= 1
            self._calls.notify_all()

    def drain(self, timeout: float) -> bool:
        """Refuse new calls (UNAVAILABLE) and wait up to ``timeout`` s for those in flight; whether all finished."""
        with self._calls:
            self._draining = True
            return self._calls.wait_for(lambda: self._in_flight == 0, timeout)

    @property
    def model(self) -> ServedModel:
        if self._model is None:
            raise NotReadyError("the model is still loading; retry shortly")
        return self._model

    @_rpc
    def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        embedding = self._embed(_required(request, "audio"), "audio", context)
        return pb.EmbedResponse(embedding=embedding.vector.tolist(), duration_seconds=embedding.duration_seconds)

    @_rpc
    def Verify(self, request: pb.VerifyRequest, context) -> pb.VerifyResponse:
        model = self.model
        threshold = self._threshold(request)  # checked before any audio is decoded
        p_target = self._p_target(request)
        reference = request.WhichOneof("reference")
        if reference is None:
            raise InvalidRequestError("set reference_audio or speaker_id")
        reference_seconds = None  # an enrolled speaker: its length is not kept, and counts as the longer side
        if reference == "speaker_id":
            claimed = model.store.embedding(check_speaker_id(request.speaker_id))
        else:
            embedded = self._embed(request.reference_audio, "reference_audio", context)
            claimed, reference_seconds = embedded.vector, embedded.duration_seconds
        test = self._embed(_required(request, "test_audio"), "test_audio", context)
        score = model.score(claimed, test.vector)
        response = pb.VerifyResponse(score=score)
        if model.calibration is not None:
            llr = float(model.calibration.llr(score, reference_seconds, test.duration_seconds))
            response.llr, response.probability = llr, float(probability(llr, p_target))
            # A score threshold the request or the operator gave wins; else a calibrated model decides by Bayes.
            if not request.HasField("threshold") and not model.explicit_threshold:
                llr_threshold = bayes_threshold(p_target, model.c_miss, model.c_fa)
                response.llr_threshold, response.accepted = llr_threshold, llr >= llr_threshold
                return response
        if threshold is not None:
            response.threshold, response.accepted = threshold, score >= threshold
        return response

    @_rpc
    def EnrollSpeaker(self, request: pb.EnrollSpeakerRequest, context) -> pb.EnrollSpeakerResponse:
        speaker_id = check_speaker_id(request.speaker_id)
        if not request.audios:
            raise InvalidRequestError("audios is empty: give at least one recording of the speaker")
        if len(request.audios) > self.max_recordings:
            raise InvalidRequestError(f"{len(request.audios)} recordings in one call; at most {self.max_recordings} "
                                      "are accepted (enroll the rest in further calls: they add up)")
        # Decode every recording (within the call's total) before embedding any, and embed every one
        # before storing any, so a bad one leaves the speaker unchanged.
        prepared, total = [], 0.0
        for i, audio in enumerate(request.audios):
            features, seconds = self._prepare(audio, f"audios[{i}]")
            total += seconds
            if total > self.max_call_seconds:
                raise InvalidRequestError(f"the recordings hold more than {self.max_call_seconds:g} s of audio in all "
                                          f"(over it at audios[{i}]); enroll the rest in further calls")
            prepared.append(features)
            _still_active(context)
        vectors = []
        for features in prepared:
            vectors.append(self.model.embedder.embed_features(features))
            # After the last one, this is the last moment to learn that the caller gave up: what it
            # will not be told of is not stored.
            _still_active(context)
        count = self.model.store.enroll(speaker_id, np.stack(vectors))
        return pb.EnrollSpeakerResponse(speaker_id=speaker_id, utterance_count=count)

    @_rpc
    def Identify(self, request: pb.IdentifyRequest, context) -> pb.IdentifyResponse:
        if not 0 <= request.top_k <= MAX_TOP_K:
            raise InvalidRequestError(f"top_k must be between 0 and {MAX_TOP_K} (0 means 1), got {request.top_k}")
        embedding = self._embed(_required(request, "audio"), "audio", context)
        matches = self.model.store.identify(embedding.vector, max(1, request.top_k))
        calibration = self.model.calibration
        if calibration is None:
            return pb.IdentifyResponse(matches=[pb.SpeakerMatch(speaker_id=m.speaker_id, score=m.score)
                                                for m in matches])
        llrs = calibration.llr(np.array([m.score for m in matches]), None, embedding.duration_seconds)
        return pb.IdentifyResponse(matches=[pb.SpeakerMatch(speaker_id=m.speaker_id, score=m.score, llr=float(llr))
                                            for m, llr in zip(matches, llrs)])

    @_rpc
    def ListSpeakers(self, request: pb.ListSpeakersRequest, context) -> pb.ListSpeakersResponse:
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidRequestError(f"page_size must be between 0 and {MAX_PAGE_SIZE} (0 means "
                                      f"{DEFAULT_PAGE_SIZE}), got {request.page_size}")
        size = request.page_size or DEFAULT_PAGE_SIZE
        after = _page_position(request.page_token) if request.page_token else None
        speakers = self.model.store.speakers(after=after, limit=size + 1)  # one more says whether a page follows
        page = speakers[:size]
        return pb.ListSpeakersResponse(
            speakers=[pb.Speaker(speaker_id=s.speaker_id, utterance_count=s.utterance_count) for s in page],
            next_page_token=_page_token(page[-1].speaker_id) if len(speakers) > size else "",
        )

    @_rpc
    def DeleteSpeaker(self, request: pb.DeleteSpeakerRequest, context) -> pb.DeleteSpeakerResponse:
        speaker_id = check_speaker_id(request.speaker_id)
        count = self.model.store.delete(speaker_id)
        return pb.DeleteSpeakerResponse(speaker_id=speaker_id, utterance_count=count)

    @_rpc
    def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.GetModelInfoResponse:
        model = self.model
        return pb.GetModelInfoResponse(
            model_name=model.model_name,
            embedding_dim=model.embedder.embedding_dim,
            sample_rate_hertz=SAMPLE_RATE,
            default_threshold=model.default_threshold,
            metadata=model.metadata,
            engine=model.engine,
            precision=model.precision,
            scoring=model.scoring,
            calibrated=model.calibration is not None,
            p_target=model.p_target,
        )

    def _threshold(self, request: pb.VerifyRequest) -> float | None:
        """The request's threshold, else the server's default; None when neither exists."""
        if request.HasField("threshold"):
            if not math.isfinite(request.threshold):
                raise InvalidRequestError(f"threshold must be a finite number, got {request.threshold}")
            if self.model.plda is None and not -1.0 <= request.threshold <= 1.0:
                raise InvalidRequestError(f"threshold must be in [-1, 1] for cosine scores, got {request.threshold}")
            return request.threshold
        return self.model.default_threshold

    def _p_target(self, request: pb.VerifyRequest) -> float:
        """The request's prior of a same-speaker trial, else the server's."""
        if not request.HasField("p_target"):
            return self.model.p_target
        if not (math.isfinite(request.p_target) and 0.0 < request.p_target < 1.0):
            raise InvalidRequestError(f"p_target must lie strictly between 0 and 1, got {request.p_target}")
        return request.p_target

    def _embed(self, audio: pb.Audio, name: str, context: grpc.ServicerContext) -> Embedding:
        features, seconds = self._prepare(audio, name)
        _still_active(context)  # decoded: is anyone still waiting before the network runs?
        vector = self.model.embedder.embed_features(features)
        _still_active(context)
        return Embedding(vector.astype(np.float32), seconds)

    def _prepare(self, audio: pb.Audio, name: str) -> tuple[torch.Tensor, float]:
        """The recording's mean-normalised fbank and its length, decoded by at most ``max_preparing`` calls at once."""
        with self._preparing:
            waveform = self._waveform(audio, name)
            note_audio(waveform.duration_seconds)
            return fbank(waveform.tensor()), waveform.duration_seconds

    def _waveform(self, audio: pb.Audio, name: str) -> Waveform:
        source = audio.WhichOneof("source")
        if source is None:
            raise InvalidRequestError(f"{name} holds no audio: set content or pcm")
        if source == "content":
            return load_audio(audio.content, name=name, max_seconds=self.max_audio_seconds,
                              max_samples=self.max_samples)
        pcm = audio.pcm
        if pcm.format not in _PCM_FORMATS:
            # proto3 enums are open: a newer client may send a number this server has no name for.
            label = pb.SampleFormat.Name(pcm.format) if pcm.format in pb.SampleFormat.values() else pcm.format
            raise InvalidRequestError(f"{name}.pcm.format is {label}; use SAMPLE_FORMAT_INT16 or SAMPLE_FORMAT_FLOAT32")
        return decode_pcm(
            pcm.samples,
            pcm.sample_rate_hertz,
            _PCM_FORMATS[pcm.format],
            pcm.channel_count or 1,
            name=f"{name}.pcm",
            max_seconds=self.max_audio_seconds,
            max_samples=self.max_samples,
        )


def _page_token(speaker_id: str) -> str:
    return base64.urlsafe_b64encode(speaker_id.encode()).decode()


def _page_position(token: str) -> str:
    """The last speaker of the previous page, from its token; INVALID_ARGUMENT for a token this server did not make."""
    try:
        return base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (ValueError, UnicodeError):
        raise InvalidRequestError("page_token is not one this server gave (use next_page_token as it came)") from None


def _still_active(context: grpc.ServicerContext) -> None:
    """Stop the call's work when its client has gone: cancelled, or past its deadline."""
    if not context.is_active():
        raise CallEndedError(context)


def _required(request, field: str) -> pb.Audio:
    """The request's audio ``field``, or INVALID_ARGUMENT when it is not set."""
    if not request.HasField(field):
        raise InvalidRequestError(f"{field} is missing")
    return getattr(request, field)


def add_to_server(service: SpeakerService, server: grpc.Server) -> None:
    """Register ``service``'s RPCs on ``server``, parsing each request in its handler.

    grpc's own parsing answers a malformed message (a truncated varint, invalid UTF-8 in a
    string) with INTERNAL and logs a traceback for each one; here it is INVALID_ARGUMENT and at
    most one log line.
    """
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["SpeakerService"].methods:
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _parsed(getattr(service, method.name), getattr(pb, method.input_type.name), method.name),
            request_deserializer=None,  # the bytes as they came
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _parsed(handler, request_type, name: str):
    def parse_then_handle(raw: bytes, context: grpc.ServicerContext):
        try:
            request = request_type.FromString(raw)
        except DecodeError:
            log.info("%s: a malformed request from %s", name, context.peer())
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"malformed request: not a valid {request_type.DESCRIPTOR.full_name} message")
        return handler(request, context)

    return parse_then_handle
