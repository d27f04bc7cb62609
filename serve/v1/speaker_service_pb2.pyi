from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SampleFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLE_FORMAT_UNSPECIFIED: _ClassVar[SampleFormat]
    SAMPLE_FORMAT_INT16: _ClassVar[SampleFormat]
    SAMPLE_FORMAT_FLOAT32: _ClassVar[SampleFormat]
SAMPLE_FORMAT_UNSPECIFIED: SampleFormat
SAMPLE_FORMAT_INT16: SampleFormat
SAMPLE_FORMAT_FLOAT32: SampleFormat

class Audio(_message.Message):
    __slots__ = ("content", "pcm")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    PCM_FIELD_NUMBER: _ClassVar[int]
    content: bytes
    pcm: PcmAudio
    def __init__(self, content: _Optional[bytes] = ..., pcm: _Optional[_Union[PcmAudio, _Mapping]] = ...) -> None: ...

class PcmAudio(_message.Message):
    __slots__ = ("samples", "sample_rate_hertz", "format", "channel_count")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    samples: bytes
    sample_rate_hertz: int
    format: SampleFormat
    channel_count: int
    def __init__(self, samples: _Optional[bytes] = ..., sample_rate_hertz: _Optional[int] = ..., format: _Optional[_Union[SampleFormat, str]] = ..., channel_count: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("audio",)
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    audio: Audio
    def __init__(self, audio: _Optional[_Union[Audio, _Mapping]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embedding", "duration_seconds")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    duration_seconds: float
    def __init__(self, embedding: _Optional[_Iterable[float]] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("reference_audio", "speaker_id", "test_audio", "threshold", "p_target")
    REFERENCE_AUDIO_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    TEST_AUDIO_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    P_TARGET_FIELD_NUMBER: _ClassVar[int]
    reference_audio: Audio
    speaker_id: str
    test_audio: Audio
    threshold: float
    p_target: float
    def __init__(self, reference_audio: _Optional[_Union[Audio, _Mapping]] = ..., speaker_id: _Optional[str] = ..., test_audio: _Optional[_Union[Audio, _Mapping]] = ..., threshold: _Optional[float] = ..., p_target: _Optional[float] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("score", "threshold", "accepted", "llr", "probability", "llr_threshold")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    LLR_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LLR_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    score: float
    threshold: float
    accepted: bool
    llr: float
    probability: float
    llr_threshold: float
    def __init__(self, score: _Optional[float] = ..., threshold: _Optional[float] = ..., accepted: _Optional[bool] = ..., llr: _Optional[float] = ..., probability: _Optional[float] = ..., llr_threshold: _Optional[float] = ...) -> None: ...

class EnrollSpeakerRequest(_message.Message):
    __slots__ = ("speaker_id", "audios")
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIOS_FIELD_NUMBER: _ClassVar[int]
    speaker_id: str
    audios: _containers.RepeatedCompositeFieldContainer[Audio]
    def __init__(self, speaker_id: _Optional[str] = ..., audios: _Optional[_Iterable[_Union[Audio, _Mapping]]] = ...) -> None: ...

class EnrollSpeakerResponse(_message.Message):
    __slots__ = ("speaker_id", "utterance_count")
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    speaker_id: str
    utterance_count: int
    def __init__(self, speaker_id: _Optional[str] = ..., utterance_count: _Optional[int] = ...) -> None: ...

class IdentifyRequest(_message.Message):
    __slots__ = ("audio", "top_k")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    audio: Audio
    top_k: int
    def __init__(self, audio: _Optional[_Union[Audio, _Mapping]] = ..., top_k: _Optional[int] = ...) -> None: ...

class IdentifyResponse(_message.Message):
    __slots__ = ("matches",)
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[SpeakerMatch]
    def __init__(self, matches: _Optional[_Iterable[_Union[SpeakerMatch, _Mapping]]] = ...) -> None: ...

class SpeakerMatch(_message.Message):
    __slots__ = ("speaker_id", "score", "llr")
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LLR_FIELD_NUMBER: _ClassVar[int]
    speaker_id: str
    score: float
    llr: float
    def __init__(self, speaker_id: _Optional[str] = ..., score: _Optional[float] = ..., llr: _Optional[float] = ...) -> None: ...

class ListSpeakersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSpeakersResponse(_message.Message):
    __slots__ = ("speakers", "next_page_token")
    SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    speakers: _containers.RepeatedCompositeFieldContainer[Speaker]
    next_page_token: str
    def __init__(self, speakers: _Optional[_Iterable[_Union[Speaker, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Speaker(_message.Message):
    __slots__ = ("speaker_id", "utterance_count")
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    speaker_id: str
    utterance_count: int
    def __init__(self, speaker_id: _Optional[str] = ..., utterance_count: _Optional[int] = ...) -> None: ...

class DeleteSpeakerRequest(_message.Message):
    __slots__ = ("speaker_id",)
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    speaker_id: str
    def __init__(self, speaker_id: _Optional[str] = ...) -> None: ...

class DeleteSpeakerResponse(_message.Message):
    __slots__ = ("speaker_id", "utterance_count")
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    speaker_id: str
    utterance_count: int
    def __init__(self, speaker_id: _Optional[str] = ..., utterance_count: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "embedding_dim", "sample_rate_hertz", "default_threshold", "metadata", "engine", "precision", "scoring", "calibrated", "p_target")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    P_TARGET_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    embedding_dim: int
    sample_rate_hertz: int
    default_threshold: float
    metadata: _containers.ScalarMap[str, str]
    engine: str
    precision: str
    scoring: str
    calibrated: bool
    p_target: float
    def __init__(self, model_name: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., sample_rate_hertz: _Optional[int] = ..., default_threshold: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., engine: _Optional[str] = ..., precision: _Optional[str] = ..., scoring: _Optional[str] = ..., calibrated: _Optional[bool] = ..., p_target: _Optional[float] = ...) -> None: ...
