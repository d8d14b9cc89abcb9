"""Domain errors, one class per gRPC status the servicer maps them to.

The engine raises these with a message that names the problem and the fix; the servicer only translates the
class into a status code, so the mapping lives in one place (`servicer._status_for`).
"""

from __future__ import annotations


def shown(value: str, limit: int = 200) -> str:
    """A client-supplied string as an error message may quote it: control characters escaped, and shortened in
    the middle past `limit` characters. A status message over ~8 KiB makes gRPC clients drop it and report
    RESOURCE_EXHAUSTED instead of the real error."""
    text = value if value.isprintable() else repr(value)[1:-1]
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]}…{text[-(limit // 2) :]}"


class WorkerError(Exception):
    """Base class of every error the worker reports to the client on purpose."""


class InvalidRequest(WorkerError, ValueError):
    """The request itself is wrong (bad file, language, granularity...): INVALID_ARGUMENT."""


class NotReady(WorkerError):
    """The worker cannot serve this yet (no model loaded, model freed, timestamps disabled): FAILED_PRECONDITION."""


class ModelIdentityMismatch(WorkerError):
    """The request names another model than the loaded one: NOT_FOUND (LocalAI's router looks for this)."""


class Unsupported(WorkerError):
    """This worker or its model cannot do what was asked (live transcription turned off): UNIMPLEMENTED."""


class Overloaded(WorkerError):
    """The worker holds as much as its limits allow (audio memory, temporary disk): RESOURCE_EXHAUSTED, with the
    limit and the option that sets it."""


class Cancelled(WorkerError):
    """The client went away or its deadline passed; the work stopped at the next window."""
