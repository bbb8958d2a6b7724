"""The logger for gpud's aiohttp servers (the control socket, the proxy's fallback routes, `gpud ui`).

aiohttp logs every malformed request (a request line over its limit, a broken header, a bad chunked body)
as an error with a traceback, so any client could fill the daemon's log (and disk) with garbage; those
become one debug line. Real errors keep their traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The `logger` for aiohttp's server: malformed requests (the client's fault) at debug level, one line."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
            self.debug("%s: %s", str(msg) % args, str(exc).replace("\n", " "))
        else:
            self.error(msg, *args, exc_info=exc_info, **kwargs)
