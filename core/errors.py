"""Typed errors that carry a message a person can act on.

Every error spkft raises on purpose derives from :class:`SpkftError`, so front ends (the CLI,
the wizard, the gRPC server) can turn them into one clear line without a traceback.
"""


def first_line(exc: BaseException) -> str:
    """The first line of a third-party exception's message (at most 200 characters), to quote in ours."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


class SpkftError(Exception):
    """Base class of every error spkft raises for bad input or configuration."""


class AudioError(SpkftError):
    """Audio that cannot be turned into a speaker embedding."""


class AudioNotFoundError(AudioError):
    """The audio file does not exist or is not a file."""


class EmptyAudioError(AudioError):
    """The audio holds no samples at all."""


class UndecodableAudioError(AudioError):
    """The bytes are not audio in any format libsndfile reads."""


class InvalidPcmError(AudioError):
    """Raw PCM whose description (rate, format, channels, byte count) is inconsistent."""


class SilentAudioError(AudioError):
    """The audio holds nothing but (near-)digital silence."""


class AudioTooShortError(AudioError):
    """The audio is shorter than the model can embed."""


class AudioTooLongError(AudioError):
    """The audio is longer than the caller accepts (a server's duration limit)."""


class AudioTooLargeError(AudioError):
    """The audio holds more samples than the caller accepts (a server's bound on decoded size)."""


class InputTooShortError(SpkftError):
    """A feature sequence with fewer frames than the model's statistics pooling needs."""


class CheckpointError(SpkftError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


class NonFiniteEmbeddingError(SpkftError):
    """The model gave NaN or infinite numbers for finite input: the model file is broken."""


class DeviceError(SpkftError):
    """A compute device that was asked for but is not available."""


class EvaluationError(SpkftError, ValueError):
    """Scores, labels or trials that cannot be evaluated (no targets, NaN scores, mismatches)."""


class DataError(SpkftError):
    """A data source, split request or trial list that cannot be used as given."""


class EnrollmentError(SpkftError):
    """An enrollment store that cannot be used, or a request it cannot serve."""


class UnknownSpeakerError(EnrollmentError):
    """A speaker that is not enrolled."""


class StoreUnavailableError(EnrollmentError):
    """The enrollment database cannot be reached now; the call may be retried."""


class ModelError(SpkftError):
    """An exported (ONNX) model file that is missing, unreadable or not a speaker-embedding model."""


class AdaptationError(SpkftError):
    """A backend adaptation that cannot be fitted from the embeddings and labels given."""


class ExportError(SpkftError):
    """An export that could not be written or whose result does not match the PyTorch model."""
