"""What kind of failure an exception is: the user's input (exit 65, never retried) or a
transient outage (a retryable failure), and the classification of library and OS errors.

Modules that touch the outside world (storage, models, the dataset loader) turn what the
libraries raise into `InvalidInputError` or `TransientError` with a message naming the field or file;
`classify` is also the last resort for whatever reaches the run's top level unclassified.
The libraries' own exception types decide (huggingface_hub.errors, httpx, botocore, aiohttp,
requests, fsspec, OSError errno); a library that was never imported cannot have raised, so
they are looked up in `sys.modules` and nothing heavy is imported here.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from enum import Enum
from typing import Any


class InvalidInputError(Exception):
    """The run cannot succeed as configured: the message names the field or file and what to
    do. Exit code 65; never retried."""


class TransientError(Exception):
    """A network or server failure that may go away by itself: retried (exit code 1)."""


class Kind(Enum):
    """How an exception counts."""

    INPUT = "input"
    TRANSIENT = "transient"


#: HTTP statuses worth retrying: timeouts, rate limits and server errors (5xx).
RETRY_STATUSES = frozenset({408, 425, 429})
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EBUSY,  # s3fs: 503 SlowDown / ServiceUnavailable
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.ENETUNREACH,
        errno.EPIPE,
        errno.EREMOTEIO,  # s3fs: 500 InternalError
        errno.ETIMEDOUT,
    }
)
INPUT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EINVAL,  # s3fs: 400 Bad Request
    }
)
_NO_CREDENTIALS = (
    "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); on a "
    "cluster, name a Secret holding them in spec.secrets.storage"
)
_MAX_DETAIL = 240
TRANSIENT_HINT = "transient (network or server): try again later; a cluster retries it"


def _module(name: str) -> Any:
    return sys.modules.get(name)


def _types(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """The exception classes `names` of `module` if it is imported (else none: not raised)."""
    mod = _module(module)
    if mod is None:
        return ()
    return tuple(t for t in (getattr(mod, n, None) for n in names) if isinstance(t, type))


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (the type name if it has none)."""
    for line in str(exc).splitlines():
        if line.strip():
            text = line.strip()
            return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."
    return type(exc).__name__


def chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what caused it (``raise ... from``) or was being handled when it was raised."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 32:
        seen.add(id(current))
        yield current
        suppressed = current.__suppress_context__  # `raise ... from None`: context not a cause
        current = current.__cause__ or (None if suppressed else current.__context__)


def _status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (httpx/requests response, aiohttp, botocore)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status
    status = getattr(exc, "status", None)  # aiohttp ClientResponseError
    return status if isinstance(status, int) and 100 <= status < 600 else None


def _by_status(status: int) -> tuple[Kind, str]:
    if status in RETRY_STATUSES or status >= 500:
        return Kind.TRANSIENT, f"the server answered {status}"
    if status in (401, 403):
        return Kind.INPUT, f"access denied ({status}): check the token or credentials"
    if status in (404, 410):
        return Kind.INPUT, "not found"
    return Kind.INPUT, f"refused by the server ({status})"


def _hub_kind(exc: BaseException) -> tuple[Kind, str] | None:
    hub = "huggingface_hub.errors"
    if isinstance(exc, _types(hub, "OfflineModeIsEnabled")):
        return Kind.INPUT, "HF_HUB_OFFLINE is set and it is not in the local Hub cache"
    if isinstance(exc, _types(hub, "GatedRepoError")):
        return Kind.INPUT, "a gated repository: accept its terms on the Hub and set a token"
    not_found = _types(hub, "RepositoryNotFoundError", "RevisionNotFoundError")
    if isinstance(exc, not_found + _types(hub, "RemoteEntryNotFoundError")):
        return Kind.INPUT, (
            "not found on the Hugging Face Hub (a private repository needs a token: "
            "HF_TOKEN, or spec.secrets.hfToken on a cluster)"
        )
    if isinstance(exc, _types(hub, "DisabledRepoError")):
        return Kind.INPUT, "the repository is disabled on the Hub"
    if isinstance(exc, _types(hub, "HFValidationError")):
        return Kind.INPUT, f"not a valid Hub repository name ({first_line(exc)})"
    return None


def _network_kind(exc: BaseException) -> tuple[Kind, str] | None:
    botocore = "botocore.exceptions"
    missing = ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError")
    if isinstance(exc, _types(botocore, *missing)):
        return Kind.INPUT, _NO_CREDENTIALS
    config = ("NoRegionError", "ProfileNotFound", "ParamValidationError", "InvalidConfigError")
    if isinstance(exc, _types(botocore, *config)):
        return Kind.INPUT, first_line(exc)
    unreachable = (
        _types(botocore, "HTTPClientError", "ConnectionError")
        + _types("httpx2", "TransportError")
        + _types("httpx", "TransportError")
        + _types("aiohttp", "ClientConnectionError", "ClientPayloadError", "ServerTimeoutError")
        + _types("requests.exceptions", "ConnectionError", "Timeout", "ChunkedEncodingError")
        + _types("fsspec.exceptions", "FSTimeoutError")
        + _types("urllib3.exceptions", "HTTPError")
        + (TimeoutError, ConnectionError)
    )
    if isinstance(exc, unreachable):
        return Kind.TRANSIENT, f"unreachable ({type(exc).__name__}: {first_line(exc)})"
    return None


def _specific(exc: BaseException) -> tuple[Kind, str] | None:
    """What a library's own exception type or HTTP status says."""
    found = _hub_kind(exc) or _network_kind(exc)
    if found is None and (status := _status(exc)) is not None:
        found = _by_status(status)
    return found


def _generic(exc: BaseException) -> tuple[Kind, str] | None:
    """What an OSError says by its errno or type."""
    if not isinstance(exc, OSError):
        return None
    if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOENT:
        return Kind.INPUT, "not found"
    if exc.errno in TRANSIENT_ERRNOS:
        return Kind.TRANSIENT, exc.strerror or first_line(exc)
    if exc.errno in INPUT_ERRNOS:
        return Kind.INPUT, exc.strerror or first_line(exc)
    if isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return Kind.INPUT, first_line(exc)
    return None


def classify(exc: BaseException, where: str) -> InvalidInputError | TransientError | None:
    """`exc` as InvalidInputError or TransientError with a one-line message ``where: what``
    (`where` names the field or file; may be empty), or None when it is neither (a bug: report
    it with its traceback).

    The whole cause chain counts. A transient error anywhere in it wins (the Hub client raises
    "not in the local cache" from a connection error); otherwise what a library's own type or
    HTTP status says comes before the errno of a translated OSError."""
    if isinstance(exc, (InvalidInputError, TransientError)):
        return exc
    links = list(chain(exc))
    specific = [found for link in links if (found := _specific(link)) is not None]
    generic = [found for link in links if (found := _generic(link)) is not None]
    prefix = f"{where}: " if where else ""
    for kind, what in specific + generic:
        if kind is Kind.TRANSIENT:
            return TransientError(f"{prefix}{what}; {TRANSIENT_HINT}")
    if specific or generic:
        return InvalidInputError(f"{prefix}{(specific + generic)[0][1]}")
    return None
