"""The one exception hierarchy of gpud, mapped to CLI exit codes and HTTP errors.

    GpudError                  exit 1, HTTP 500 ("error")   -- anything not listed below
    ├── InvalidInput           exit 2, HTTP 422 ("invalid") -- bad flags, fields, config files
    ├── NotFound               exit 5, HTTP 404 ("not_found")
    ├── Conflict               exit 1, HTTP 409 ("conflict") -- e.g. a model name already in use
    ├── DoesNotFit             exit 4, HTTP 409 ("does_not_fit") -- placement refused; carries the plan
    ├── Forbidden              exit 1, HTTP 403 ("forbidden")
    ├── Unavailable            exit 1, HTTP 503 ("unavailable")
    └── DaemonUnreachable      exit 3 (client side only: the control socket does not answer)

Every message is one sentence meant for a person; no traceback ever reaches a user.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INVALID = 2
EXIT_UNREACHABLE = 3
EXIT_DOES_NOT_FIT = 4
EXIT_NOT_FOUND = 5


class GpudError(Exception):
    """Base of every error gpud reports to a user."""

    code = "error"
    http_status = 500
    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        body.update(self.details)
        return {"error": body}


class InvalidInput(GpudError):
    code = "invalid"
    http_status = 422
    exit_code = EXIT_INVALID


class NotFound(GpudError):
    code = "not_found"
    http_status = 404
    exit_code = EXIT_NOT_FOUND


class Conflict(GpudError):
    code = "conflict"
    http_status = 409


class DoesNotFit(GpudError):
    """Placement refused. `plan` holds the JSON plan shape ({"fits": false, "replicas": [], "reason"})."""

    code = "does_not_fit"
    http_status = 409
    exit_code = EXIT_DOES_NOT_FIT


class Forbidden(GpudError):
    code = "forbidden"
    http_status = 403


class Unavailable(GpudError):
    code = "unavailable"
    http_status = 503


class DaemonUnreachable(GpudError):
    code = "unreachable"
    exit_code = EXIT_UNREACHABLE


_BY_CODE: dict[str, type[GpudError]] = {
    cls.code: cls
    for cls in (GpudError, InvalidInput, NotFound, Conflict, DoesNotFit, Forbidden, Unavailable)
}


def from_json(body: Any, http_status: int) -> GpudError:
    """Rebuild the error a daemon sent ({"error": {"code", "message", ...}}) on the client side."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return GpudError(f"The daemon answered HTTP {http_status} without an error body.")
    extra = {k: v for k, v in err.items() if k not in ("code", "message")}
    cls = _BY_CODE.get(str(err.get("code")), GpudError)
    return cls(str(err.get("message") or f"HTTP {http_status}"), details=extra)
