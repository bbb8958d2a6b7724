"""The dashboard's access rules (gpud.ui.security): token, cookie, and the same-origin rule for writes."""

from __future__ import annotations

from typing import Any

import pytest

from gpud.ui.security import Decision, cookie_header, cookie_name, decide, new_token, same_origin

TOKEN = "s3cret-token"
HOST = "127.0.0.1:8765"


def check(method: str = "GET", path: str = "/", *, query: str | None = None, cookie: str | None = None,
          origin: str | None = None, host: str | None = HOST, fetch_site: str | None = None) -> Decision:
    cookies = {} if cookie is None else {cookie_name(TOKEN): cookie}
    return decide(TOKEN, method=method, path=path, query_token=query, cookies=cookies, origin=origin, host=host,
                  fetch_site=fetch_site)


def test_tokens_are_long_random_and_url_safe() -> None:
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(len(t) >= 43 and all(c.isalnum() or c in "-_" for c in t) for t in tokens)


def test_cookie_is_httponly_samesite_strict_and_named_per_token() -> None:
    header = cookie_header(TOKEN)
    assert header.startswith(f"{cookie_name(TOKEN)}={TOKEN};")
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Path=/" in header
    assert cookie_name(TOKEN) != cookie_name(TOKEN + "x")  # two dashboards on one host keep their cookies


@pytest.mark.parametrize("kwargs", [
    {},                                                   # nothing
    {"query": "wrong"},                                   # a wrong token
    {"cookie": "wrong"},                                  # a forged cookie
    {"query": TOKEN[:-1]},                                # a prefix of the token
    {"method": "POST", "path": "/api/v1/models", "origin": f"http://{HOST}"},  # a write without credentials
])
def test_without_the_token_or_its_cookie_everything_is_401(kwargs: dict[str, Any]) -> None:
    decision = check(**kwargs)
    assert decision.status == 401
    assert "URL that `gpud ui` printed" in decision.reason


def test_the_token_in_the_url_sets_the_cookie_and_cleans_the_address_bar() -> None:
    decision = check(query=TOKEN)
    assert decision.allowed and decision.set_cookie == cookie_header(TOKEN) and decision.redirect == "/"
    api = check(path="/api/v1/models", query=TOKEN)
    assert api.allowed and api.set_cookie and api.redirect is None  # an API client is answered, not redirected


def test_the_cookie_alone_is_enough_for_reads() -> None:
    assert check(cookie=TOKEN) == Decision()
    assert check(path="/api/events", cookie=TOKEN).allowed


@pytest.mark.parametrize("method", ["POST", "PATCH", "DELETE", "PUT", "post"])
def test_a_write_from_another_origin_is_403_even_with_the_cookie(method: str) -> None:
    for origin in (None, "null", "http://evil.example", "http://127.0.0.1:9999", f"https://{HOST}.evil.example",
                   f"http://{HOST}/path"):
        decision = check(method, "/api/v1/models", cookie=TOKEN, origin=origin)
        assert decision.status == 403, origin
        assert "another origin" in decision.reason
    assert check(method, "/api/v1/models", cookie=TOKEN, origin=f"http://{HOST}").allowed


def test_a_write_the_browser_marks_cross_site_is_refused() -> None:
    same = {"cookie": TOKEN, "origin": f"http://{HOST}"}
    assert check("POST", "/api/v1/models", **same, fetch_site="same-origin").allowed
    assert check("POST", "/api/v1/models", **same, fetch_site="same-site").status == 403
    assert check("POST", "/api/v1/models", **same, fetch_site="cross-site").status == 403


def test_origin_is_compared_with_the_host_the_browser_used() -> None:
    # Through `ssh -L 9000:127.0.0.1:8765` the browser says localhost:9000 in both headers.
    assert same_origin("http://localhost:9000", "localhost:9000")
    assert same_origin("http://LOCALHOST:9000", "localhost:9000")
    assert not same_origin("http://localhost:9000", "localhost:9001")
    assert not same_origin("http://localhost:9000", None)
    assert not same_origin("ftp://localhost:9000", "localhost:9000")
