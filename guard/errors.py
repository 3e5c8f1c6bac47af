"""Typed errors raised by the runtime core.

The core never imports grpc: `server/interceptors.py` owns the single table
that maps these types to status codes. Every message says what was wrong and
what the caller can do about it.
"""


class GuardError(Exception):
    """Base class for every error the runtime raises on purpose."""


class InvalidImageError(GuardError):
    """The image bytes cannot be decoded, are too large, or have an unsupported media type."""


class InvalidRequestError(GuardError):
    """The request itself is malformed: empty or oversized question, bad generation settings."""


class BackendUnavailableError(GuardError):
    """The model is not loaded or not ready to serve yet."""


class DeadlineExceededError(GuardError):
    """The request ran out of time before it finished."""


class CancelledError(GuardError):
    """The caller cancelled the request; decoding stopped early."""


class ResourceExhaustedError(GuardError):
    """Too many requests are queued; the caller should retry later."""


class ModelLoadError(GuardError):
    """A model directory or bundle is missing, incomplete or corrupt."""
