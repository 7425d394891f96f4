"""Typed errors. Every rejection names the file (or stack) and the reason.

``str(err)`` is always ``"<uri>: <reason>"`` so that a manifest row's ``error`` column
and a log line say what went wrong and where without further formatting.
"""
from __future__ import annotations


class MFFError(Exception):
    """Base class of every error ray-mff raises on purpose."""

    kind = "error"

    def __init__(self, uri: str, reason: str):
        self.uri = str(uri)
        self.reason = reason
        super().__init__(f"{self.uri}: {reason}")

    def __reduce__(self):  # keep pickling (Ray) working with the two-argument constructor
        return (self.__class__, (self.uri, self.reason))


class ImageReadError(MFFError):
    """The bytes could not be decoded: unreadable, corrupt or truncated."""

    kind = "unreadable"


class NotAnImageError(ImageReadError):
    """The file is not an image in a format ray-mff reads."""

    kind = "not_an_image"


class ImageTooLargeError(ImageReadError):
    """The image exceeds the configured pixel limit (decompression-bomb guard)."""

    kind = "too_large"


class ImageWriteError(MFFError):
    """An image could not be encoded in the requested format or written to its destination."""

    kind = "unwritable"


class StackMismatchError(MFFError):
    """Members of one stack differ in size, channel count or bit depth."""

    kind = "mismatch"


class EmptyStackError(MFFError):
    """A stack has no members, or a folder matched no stack."""

    kind = "empty"


class EngineUnavailableError(MFFError):
    """A requested engine (TensorRT, CUDA) is not available on this machine."""

    kind = "engine_unavailable"
