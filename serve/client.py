"""Calling a speaker server: a channel with token and TLS, audio from files, typed errors.

Shared by ``spkft client`` and the wizard::

    with SpeakerClient("127.0.0.1:50051", auth_token="s3cret") as client:
        print(client.verify("a.wav", reference="b.wav").score)

Every method returns the RPC's response message (``spkft.serve.v1.speaker_service_pb2``) and
raises :class:`ServiceError` when the server answers with an error status.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import grpc

from spkft.core.errors import SpkftError
from spkft.serve.v1 import speaker_service_pb2 as pb
from spkft.serve.v1 import speaker_service_pb2_grpc as pb_grpc

DEFAULT_SERVER = "127.0.0.1:50051"
AudioInput = Union[str, Path, bytes, pb.Audio]


class ServiceError(SpkftError):
    """An error status from the server (or from gRPC, such as UNAVAILABLE when it is unreachable)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def to_audio(audio: AudioInput) -> pb.Audio:
    """An ``Audio`` message: a path or bytes become its encoded ``content``; a message stays as it is."""
    if isinstance(audio, pb.Audio):
        return audio
    if isinstance(audio, bytes):
        return pb.Audio(content=audio)
    return pb.Audio(content=Path(audio).read_bytes())


def open_channel(server: str, tls_ca: Path | None = None, tls: bool = False) -> grpc.Channel:
    """A channel to ``HOST:PORT``; TLS when ``tls`` or ``tls_ca`` (a PEM bundle; system roots otherwise)."""
    if tls_ca is None and not tls:
        return grpc.insecure_channel(server)
    roots = Path(tls_ca).read_bytes() if tls_ca is not None else None
    return grpc.secure_channel(server, grpc.ssl_channel_credentials(root_certificates=roots))


class SpeakerClient:
    """The SpeakerService RPCs, with the bearer token on every call and a per-call timeout."""

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        auth_token: str | None = None,
        tls_ca: Path | None = None,
        tls: bool = False,
        timeout_seconds: float = 60.0,
    ) -> None:
        self.channel = open_channel(server, tls_ca, tls)
        self.stub = pb_grpc.SpeakerServiceStub(self.channel)
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self.timeout_seconds = timeout_seconds

    def __enter__(self) -> SpeakerClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request):
        try:
            return method(request, metadata=self._metadata, timeout=self.timeout_seconds)
        except grpc.RpcError as exc:
            raise ServiceError(exc.code().name, exc.details() or "") from None

    def embed(self, audio: AudioInput) -> pb.EmbedResponse:
        return self._call(self.stub.Embed, pb.EmbedRequest(audio=to_audio(audio)))

    def verify(
        self,
        test: AudioInput,
        reference: AudioInput | None = None,
        speaker_id: str | None = None,
        threshold: float | None = None,
        p_target: float | None = None,
    ) -> pb.VerifyResponse:
        """Score ``test`` against a ``reference`` recording or an enrolled ``speaker_id`` (exactly one);
        ``p_target``: the prior of a calibrated model's probability and decision (default: the server's)."""
        if (reference is None) == (speaker_id is None):
            raise ValueError("give exactly one of reference and speaker_id")
        request = pb.VerifyRequest(test_audio=to_audio(test), threshold=threshold, p_target=p_target)
        if speaker_id is not None:
            request.speaker_id = speaker_id
        else:
            request.reference_audio.CopyFrom(to_audio(reference))
        return self._call(self.stub.Verify, request)

    def enroll(self, speaker_id: str, audios: list[AudioInput]) -> pb.EnrollSpeakerResponse:
        request = pb.EnrollSpeakerRequest(speaker_id=speaker_id, audios=[to_audio(a) for a in audios])
        return self._call(self.stub.EnrollSpeaker, request)

    def identify(self, audio: AudioInput, top_k: int = 1) -> pb.IdentifyResponse:
        return self._call(self.stub.Identify, pb.IdentifyRequest(audio=to_audio(audio), top_k=top_k))

    def speakers(self) -> pb.ListSpeakersResponse:
        """Every enrolled speaker, gathered from as many pages as the server gives."""
        everyone = pb.ListSpeakersResponse()
        token = ""
        while True:
            page = self._call(self.stub.ListSpeakers, pb.ListSpeakersRequest(page_token=token))
            everyone.speakers.extend(page.speakers)
            token = page.next_page_token
            if not token:
                return everyone

    def delete(self, speaker_id: str) -> pb.DeleteSpeakerResponse:
        return self._call(self.stub.DeleteSpeaker, pb.DeleteSpeakerRequest(speaker_id=speaker_id))

    def info(self) -> pb.GetModelInfoResponse:
        return self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest())
