"""The per-model routes of the proxy (SPEC §16), as pure functions: no sockets, no registry, no event loop.

A gateway keeps one model per worker URL, so each model of a node is reachable under its own prefix:
`/m/{NAME}/{rest}` is the request `/{rest}` for model NAME (NAME URL-encoded, so `Qwen%2FQwen2.5-7B`).
The proxy's dispatcher asks `split_model_path` whether a request is one of these, and `model_health` what
`GET /m/{NAME}/health` answers; everything else about such a request is the proxy's ordinary hot path.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import quote, unquote

PREFIX = "/m/"

# The model states (ModelState values, plus "idle" from SPEC §12) in which the gateway may send requests:
# "idle" has no replica running, and the first request wakes it.
_SERVABLE_WITHOUT_READY = frozenset({"idle"})
_NEVER_SERVABLE = frozenset({"stopping"})


class ModelPath(NamedTuple):
    """A request under `/m/{NAME}/`: the model's name (decoded) and the path for the replica (raw, with
    its query string, always starting with "/")."""

    name: str
    rest: str


def split_model_path(raw_path_qs: str) -> ModelPath | None:
    """`/m/{NAME}/{rest}?q` → (NAME decoded, `/{rest}?q`); None when the path is not a per-model route.

    The split is made on the raw (still encoded) path, so a "/" inside a name arrives as %2F and stays part
    of the name; `/m/NAME` alone is the replica's `/`. The query string goes with `rest`, unchanged. An empty
    NAME (`/m//…`) is the name "", which no model has: the proxy answers 404 rather than guessing.
    """
    if not raw_path_qs.startswith(PREFIX):
        return None
    path, mark, query = raw_path_qs.partition("?")
    encoded, _, rest = path[len(PREFIX):].partition("/")
    return ModelPath(unquote(encoded), "/" + rest + mark + query)


def model_prefix(name: str) -> str:
    """The path prefix of model `name`'s routes: `/m/` and the name with every reserved character encoded."""
    return PREFIX + quote(name, safe="")


class Health(NamedTuple):
    """What `GET /m/{NAME}/health` answers: the status code and the JSON body."""

    status: int
    body: dict[str, object]


def model_health(name: str, state: str | None, ready_replicas: int) -> Health:
    """The per-model health answer (SPEC §16) for a model in `state` (None: no such model on this node).

    200 while the model has a ready replica or is idle (a request will wake it); 503 while it starts with
    none ready, has failed, or is stopping; 404 for a model this node does not have.
    """
    if state is None:
        return Health(404, {"status": "not_found", "model": name})
    if state not in _NEVER_SERVABLE and (ready_replicas > 0 or state in _SERVABLE_WITHOUT_READY):
        return Health(200, {"status": "ok", "model": name, "state": state, "ready": ready_replicas})
    return Health(503, {"status": "unavailable", "model": name, "state": state, "ready": ready_replicas})
