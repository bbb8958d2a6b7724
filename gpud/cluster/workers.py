"""What this node wants registered on the gateway, and the plan that makes the gateway's list match (pure).

The registrar calls these with plain values and carries out the plan; nothing here does I/O, so every
rule of SPEC §16 is a test of a function:

* `keep_registered`: a model that has had a ready replica (or is idle) stays registered until it is
  stopped or fails for good; a starting model waits for its first ready replica, because the gateway
  retries a failed first probe only after ~30 s.
* `plan`: the gateway's list, filtered by this node's `gpud_node` label, is the truth the desired workers
  are compared with. Missing → register (unless a registration is already on its way); ours but not
  desired, or registered with other labels → remove; ours and draining → wait until it is gone (the
  gateway refuses a second worker at the same URL); the URL held by a worker of somebody else → conflict.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from gpud.cluster.settings import NODE_LABEL, ClusterSettings
from gpud.proxy.paths import model_prefix

# ModelState values (plus SPEC §12's "idle") after which a model is no longer served by this node.
_GONE_STATES = frozenset({"stopping", "failed"})
_SERVABLE_WITHOUT_READY = frozenset({"idle"})
DRAINING = "draining"  # the gateway's status of a worker it is removing


def keep_registered(state: str, ready_replicas: int, registered_before: bool) -> bool:
    """Whether a model in `state` with `ready_replicas` should have a worker on the gateway, given whether it
    should have had one at the previous look (that is what "has had a ready replica" remembers)."""
    if state in _GONE_STATES:
        return False
    return ready_replicas > 0 or state in _SERVABLE_WITHOUT_READY or registered_before


class ModelView(NamedTuple):
    """What the rule needs of a model: its name, `ModelState` value and number of ready replicas."""

    name: str
    state: str
    ready_replicas: int


def wanted_names(models: Iterable[ModelView], before: Collection[str]) -> frozenset[str]:
    """The names of the models that should be registered now (`before`: the answer at the previous look)."""
    return frozenset(m.name for m in models if keep_registered(m.state, m.ready_replicas, m.name in before))


@dataclass(frozen=True)
class Desired:
    """One worker this node wants on the gateway: model `name` at `url`, registered with `body`."""

    name: str
    url: str
    body: dict[str, Any] = field(hash=False, compare=False)

    @property
    def labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.body["labels"]
        return labels


def worker_url(advertise: str, name: str) -> str:
    """The URL of model `name`'s worker: the node's advertised proxy URL and the model's `/m/` prefix."""
    return advertise + model_prefix(name)


def desired_worker(settings: ClusterSettings, name: str, proxy_api_key: str | None) -> Desired:
    """The registration of model `name` (SPEC §16); `proxy_api_key`: a key of this node's proxy, which the
    gateway then sends as a Bearer token on every request to the worker."""
    assert settings.advertise is not None, "a cluster needs an advertise URL (checked in gpud.cluster.settings)"
    url = worker_url(settings.advertise, name)
    body: dict[str, Any] = {
        "url": url,
        "models": [{"id": name}],
        "runtime_type": "vllm",  # an OpenAI-compatible HTTP server, which gpud's proxy is
        "labels": {**settings.labels, NODE_LABEL: settings.advertise},
        "health": {
            "check_interval_secs": settings.health_interval_sec,
            "timeout_secs": settings.health_timeout_sec,
            "failure_threshold": settings.health_failures,
            "success_threshold": settings.health_successes,
        },
    }
    if proxy_api_key:
        body["api_key"] = proxy_api_key
    return Desired(name, url, body)


class Listed(NamedTuple):
    """One worker as the gateway's `GET /workers` lists it (only the fields gpud reads)."""

    id: str
    url: str
    status: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Plan:
    """What to do to make the gateway match: `register` and `remove` are actions; the rest is for people."""

    register: tuple[Desired, ...] = ()
    remove: tuple[Listed, ...] = ()
    registered: tuple[tuple[Desired, Listed], ...] = ()  # desired and on the gateway (in any live status)
    waiting: tuple[Desired, ...] = ()  # desired, but our old worker at that URL is still draining
    pending: tuple[Desired, ...] = ()  # desired, registration sent and not listed yet
    conflicts: tuple[tuple[Desired, Listed], ...] = ()  # the URL is registered by somebody else

    @property
    def settled(self) -> bool:
        """Nothing left to do or to wait for."""
        return not (self.register or self.remove or self.waiting or self.pending)


def _labels_match(want: Mapping[str, str], have: Mapping[str, str]) -> bool:
    # The gateway adds labels of its own (served_model_name), so only the ones gpud sets are compared.
    return all(have.get(k) == v for k, v in want.items())


def plan(desired: Iterable[Desired], listed: Iterable[Listed], node: str, pending: Collection[str] = ()) -> Plan:
    """Compare the desired workers with the gateway's list; `node`: this node's `gpud_node` label value;
    `pending`: URLs whose registration was sent recently and may not be listed yet."""
    wanted = {d.url: d for d in desired}
    listed = list(listed)
    ours = [w for w in listed if w.labels.get(NODE_LABEL) == node]
    others = {w.url: w for w in listed if w.labels.get(NODE_LABEL) != node}
    matched: dict[str, Listed] = {}
    remove: list[Listed] = []
    draining: set[str] = set()
    for worker in ours:
        want = wanted.get(worker.url)
        if worker.status == DRAINING:
            draining.add(worker.url)
        elif want is None or worker.url in matched or not _labels_match(want.labels, worker.labels):
            remove.append(worker)  # not served here, a duplicate, or registered with other labels
            draining.add(worker.url)
        else:
            matched[worker.url] = worker
    register: list[Desired] = []
    registered: list[tuple[Desired, Listed]] = []
    waiting: list[Desired] = []
    waiting_pending: list[Desired] = []
    conflicts: list[tuple[Desired, Listed]] = []
    for url, want in wanted.items():
        if url in matched:
            registered.append((want, matched[url]))
        elif url in draining:
            waiting.append(want)
        elif url in others:
            conflicts.append((want, others[url]))
        elif url in pending:
            waiting_pending.append(want)
        else:
            register.append(want)
    return Plan(tuple(register), tuple(remove), tuple(registered), tuple(waiting), tuple(waiting_pending),
                tuple(conflicts))
