"""Who may use the dashboard (SPEC §15), as pure decisions on a request's parts: no I/O, no aiohttp.

The model: `gpud ui` makes a random token and prints it in one URL. Whoever opens that URL gets the token
as an HttpOnly, SameSite=Strict cookie (and is sent on to the same page without the token, so it does not
stay in the address bar); every request without the token or that cookie is 401. The page then acts with
the rights of the user who started `gpud ui` on the control socket — there is no second authorization.

Writes (POST, PUT, PATCH, DELETE) must also come from the page itself: the browser's Origin header has to
name the host the request was sent to. SameSite keeps the cookie off requests from other sites, but
another page on the same host (another port is the same *site*) would still send it; the Origin check is
what refuses that (403), and it needs no CSRF token in the page.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
TOKEN_PARAM = "token"


def new_token() -> str:
    """A fresh secret for one `gpud ui` run (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def cookie_name(token: str) -> str:
    """The cookie's name, distinct per `gpud ui` run.

    Browsers keep cookies per host, not per port, so two dashboards on one host (or two boxes forwarded
    to two local ports) would overwrite one shared name; a name derived from the token keeps them apart.
    """
    return "gpud_ui_" + hashlib.sha256(token.encode()).hexdigest()[:12]


def cookie_header(token: str) -> str:
    """The Set-Cookie value: a session cookie that scripts cannot read and other sites do not send."""
    return f"{cookie_name(token)}={token}; HttpOnly; SameSite=Strict; Path=/"


def _same(secret: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(secret.encode(), given.encode())


def same_origin(origin: str | None, host: str | None) -> bool:
    """True when the Origin header names the very host:port the request was addressed to (its Host header).

    Compared with Host rather than the listen address, so that a dashboard reached through an SSH tunnel on
    another local port still works; a page of any other origin (another port included) differs.
    """
    if not origin or not host or origin == "null":
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query or parts.fragment:
        return False
    return parts.netloc.lower() == host.lower()


@dataclass(frozen=True)
class Decision:
    """What to do with a request: serve it (status 0), or answer `status` with `reason`.

    `set_cookie` is a Set-Cookie value to add to the answer; `redirect` a location to send the browser to
    instead (the token exchanged for the cookie, the URL cleaned of it).
    """

    status: int = 0
    reason: str = ""
    set_cookie: str | None = None
    redirect: str | None = None

    @property
    def allowed(self) -> bool:
        return self.status == 0


def decide(
    token: str,
    *,
    method: str,
    path: str,
    query_token: str | None,
    cookies: dict[str, str],
    origin: str | None,
    host: str | None,
    fetch_site: str | None = None,
) -> Decision:
    """Check one request against the token, the cookie and (for writes) its origin.

    `fetch_site` is the Sec-Fetch-Site header, when the browser sent one: a write marked anything but
    `same-origin` is refused as well.
    """
    by_query = _same(token, query_token)
    by_cookie = _same(token, cookies.get(cookie_name(token)))
    if not (by_query or by_cookie):
        return Decision(401, "Open the URL that `gpud ui` printed: this page needs its token.")
    if method.upper() in WRITE_METHODS:
        if not same_origin(origin, host) or fetch_site not in (None, "same-origin"):
            return Decision(403, "Refused: a change to gpud must come from the gpud ui page itself "
                                 "(this request came from another origin).")
    if by_query:
        # The token is traded for the cookie; a page load also leaves the token out of the address bar.
        redirect = path if method.upper() == "GET" and not path.startswith("/api/") else None
        return Decision(0, set_cookie=cookie_header(token), redirect=redirect)
    return Decision()
