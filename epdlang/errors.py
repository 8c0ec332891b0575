"""Typed errors shared by the DSL, the runtime and the server (no torch here)."""
from __future__ import annotations


class EpdError(Exception):
    """Base of every error epdlang raises on purpose. `status` is the HTTP status it maps to."""

    status: int = 500
    code: str = "internal_error"


class InvalidRequest(EpdError, ValueError):
    """The request itself is wrong: the caller must change it."""

    status = 400
    code = "invalid_request_error"


class InvalidSamplingParams(InvalidRequest):
    """Sampling parameters are out of range or contradict each other."""


class PromptTooLong(InvalidRequest):
    """The prompt (plus requested output) can never fit the context or the KV pool."""


class ImageError(InvalidRequest):
    """An image could not be read, decoded or is too large."""


class RequestAborted(EpdError):
    """The request was cancelled before it finished."""

    status = 499
    code = "request_aborted"


class Overloaded(EpdError):
    """The server's waiting queue is full: retry after `retry_after_s` seconds (HTTP 503 + Retry-After)."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnknownImage(InvalidRequest):
    """An `epd-image:` id the server does not hold (never uploaded, or evicted): upload the image again."""

    code = "unknown_image"
