"""Typed errors that carry a message a person can act on.

Every error spkft raises on purpose derives from :class:`SpkftError`, so front ends (the CLI,
the wizard, the gRPC server) can turn them into one clear line without a traceback.
"""


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


class InputTooShortError(SpkftError):
    """A feature sequence with fewer frames than the model's statistics pooling needs."""


class CheckpointError(SpkftError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


class DeviceError(SpkftError):
    """A compute device that was asked for but is not available."""


class EvaluationError(SpkftError, ValueError):
    """Scores, labels or trials that cannot be evaluated (no targets, NaN scores, mismatches)."""


class DataError(SpkftError):
    """A data source, split request or trial list that cannot be used as given."""
