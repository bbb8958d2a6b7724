"""The `[cluster]` table of the config file: ClusterSettings and its validation (stdlib only; gpud.config
reads it from here).

Bad input names the key and the file, and the daemon refuses to start with exit 2 (SPEC §16): a gateway
without an advertised address, a URL that is not http(s), labels that are not strings, a sync_sec of 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gpud.errors import InvalidInput

NODE_LABEL = "gpud_node"  # set by gpud on every registration: the worker's owner (its advertise URL)
# Hosts a gateway on another machine can never reach this node at.
_UNREACHABLE_HOSTS = frozenset({"0.0.0.0", "::"})


@dataclass(frozen=True)
class ClusterSettings:
    """SPEC §16 `[cluster]`: this node's registration with a Shepherd Model Gateway (gpud.cluster)."""

    gateway: str | None = None  # the gateway's URL; None: no cluster
    advertise: str | None = None  # the URL at which the gateway reaches this node's proxy
    api_key: str | None = None  # the gateway's control-plane key (Authorization: Bearer)
    labels: dict[str, str] = field(default_factory=dict)  # added to every registration
    sync_sec: float = 10.0  # full reconcile with the gateway's worker list this often
    # How the gateway probes each worker's /m/NAME/health (its own default of 60 s is slow to notice a dead
    # node; it retries a failed request on another worker anyway, so a dead node costs latency, not errors).
    health_interval_sec: int = 5
    health_timeout_sec: int = 5
    health_failures: int = 2  # failed probes in a row before the gateway stops sending to a worker
    health_successes: int = 1  # /m/NAME/health is already gpud's own verdict: one pass is enough
    request_timeout_sec: float = 5.0  # one call to the gateway's control plane
    # `model stop` and SIGTERM wait this long at most for the gateway to stop sending before draining.
    deregister_timeout_sec: float = 10.0

    @property
    def enabled(self) -> bool:
        return self.gateway is not None


def check_url(value: str, key: str, where: str) -> str:
    """An http(s) URL with a host and no query or fragment, without its trailing "/"."""
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment or "@" in parts.netloc:
        raise InvalidInput(
            f"Config key 'cluster.{key}'{where} must be an http:// or https:// URL such as "
            f"http://10.0.0.5:8000, not {value!r}."
        )
    return value.strip().rstrip("/")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    import ipaddress  # here: gpud.config (and so every CLI command) imports this module

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def reachability_warning(cluster: ClusterSettings, listen_host: str) -> str | None:
    """A sentence for the log when the gateway most likely cannot reach this node: the proxy listens on a
    loopback address only, while cluster.advertise names another host (not an error: a local reverse proxy
    may stand in between)."""
    host = urlsplit(cluster.advertise).hostname if cluster.advertise else None
    if cluster.gateway is None or host is None or not _loopback(listen_host) or _loopback(host):
        return None
    return (f"cluster.advertise is {cluster.advertise}, but the proxy listens on {listen_host} only: a gateway on "
            "another machine cannot reach it (set [proxy] listen, e.g. 0.0.0.0:8000).")


def cluster_settings(table: Mapping[str, Any], where: str) -> ClusterSettings:
    """ClusterSettings from the `[cluster]` table (types already checked by gpud.config.read_config_file)."""
    given: dict[str, Any] = {}
    for key in ("gateway", "advertise"):
        if key in table:
            given[key] = check_url(table[key], key, where)
    advertise = given.get("advertise")
    if advertise is not None and urlsplit(advertise).hostname in _UNREACHABLE_HOSTS:
        raise InvalidInput(
            f"Config key 'cluster.advertise'{where} must be an address the gateway can reach "
            f"(this machine's IP or name), not {advertise!r}."
        )
    if "gateway" in given and advertise is None:
        raise InvalidInput(
            f"Config key 'cluster.advertise'{where} is missing: with cluster.gateway set, say at which URL the "
            "gateway reaches this node's proxy (e.g. http://10.0.0.5:8000)."
        )
    if "api_key" in table:
        if not table["api_key"].strip():
            raise InvalidInput(f"Config key 'cluster.api_key'{where} cannot be empty.")
        given["api_key"] = table["api_key"].strip()
    if "labels" in table:
        labels = table["labels"]
        bad = [k for k, v in labels.items() if not isinstance(v, str)]
        if bad:
            raise InvalidInput(f"Config key 'cluster.labels.{bad[0]}'{where} must be a string.")
        if NODE_LABEL in labels:
            raise InvalidInput(
                f"Config key 'cluster.labels.{NODE_LABEL}'{where} is gpud's own (it holds cluster.advertise); "
                "pick another label name."
            )
        given["labels"] = dict(labels)
    for key in ("sync_sec", "request_timeout_sec", "deregister_timeout_sec"):
        if key in table:
            if not 0 < table[key] < math.inf:
                raise InvalidInput(f"Config key 'cluster.{key}'{where} must be a number of seconds more than 0.")
            given[key] = float(table[key])
    for key in ("health_interval_sec", "health_timeout_sec", "health_failures", "health_successes"):
        if key in table:
            if table[key] < 1:
                raise InvalidInput(f"Config key 'cluster.{key}'{where} must be a whole number of at least 1.")
            given[key] = table[key]
    return ClusterSettings(**given)
