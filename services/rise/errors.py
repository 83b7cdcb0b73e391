"""One error hierarchy for the whole platform.

Every domain error knows the gRPC status code a server answers it with and the exit code
the CLI returns, so each adapter translates errors in exactly one place.
"""

from __future__ import annotations


class RiseError(Exception):
    """Base class: a problem the user can act on, with a one-line message."""

    grpc_code: str = "INTERNAL"
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(RiseError):
    """Malformed request or data: bad JSON, missing field, duplicate id, bad flag."""

    grpc_code = "INVALID_ARGUMENT"
    exit_code = 2


class NotFound(RiseError):
    """A file, index, model or id that does not exist."""

    grpc_code = "NOT_FOUND"
    exit_code = 3


class AlreadyExists(RiseError):
    """Creating something that is already there (an index, a manifest generation)."""

    grpc_code = "ALREADY_EXISTS"
    exit_code = 4


class Mismatch(RiseError):
    """A query or append whose model identity or sketch configuration differs from the index."""

    grpc_code = "FAILED_PRECONDITION"
    exit_code = 5


class BudgetExceeded(RiseError):
    """Work over a configured budget (exact-mode storage, query count, message size)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    exit_code = 6


class Corrupt(RiseError):
    """Stored data that fails verification (sha256, format, shape)."""

    grpc_code = "DATA_LOSS"
    exit_code = 7


class StorageError(RiseError):
    """The object store could not be reached or refused an operation; retryable."""

    grpc_code = "UNAVAILABLE"
    exit_code = 8


class Cancelled(RiseError):
    """Work stopped by its cancel callback."""

    grpc_code = "CANCELLED"
    exit_code = 130


class UnsupportedModel(RiseError):
    """A model the readout cannot make exact (unknown logit transform, remote code)."""

    grpc_code = "FAILED_PRECONDITION"
    exit_code = 5


class Unauthenticated(RiseError):
    """A call without a valid bearer token."""

    grpc_code = "UNAUTHENTICATED"
    exit_code = 10


class PermissionDenied(RiseError):
    """A tenant reaching outside its own area (another tenant's objects or prefix)."""

    grpc_code = "PERMISSION_DENIED"
    exit_code = 11


class Unavailable(RiseError):
    """A dependency (broker, worker pool, scorer) did not answer in time; retry."""

    grpc_code = "UNAVAILABLE"
    exit_code = 8


def validation_message(error: Exception, *, locations: bool = False) -> str:
    """One line from a pydantic ValidationError (its messages joined, each after the field
    it concerns when ``locations``), or ``str(error)`` for any other exception."""
    errors = getattr(error, "errors", None)
    if not callable(errors):
        return str(error)
    parts = []
    for err in errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
        parts.append(f"{loc}: {err['msg']}" if loc and locations else err["msg"])
    return "; ".join(parts) or str(error)
