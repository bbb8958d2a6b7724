"""The registrar: keeps this node's workers on the gateway true (SPEC §16).

One reconcile pass lists the gateway's workers, plans (gpud.cluster.workers.plan) and carries the plan out.
Passes run every `sync_sec`, at once when the registry's changes alter which models should be registered,
through `deregister` before a model stops (the removal comes first, then the model drains), and through
`close` on SIGTERM (every worker of this node removed before the daemon exits). Passes never overlap.

The gateway being down or refusing never touches the node: a failed pass is recorded, retried with
exponential backoff (up to `sync_sec`), and logged once per change of the gateway's state, not per attempt.
`deregister` and `close` wait at most `deregister_timeout_sec`, and not at all while the gateway is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gpud.cluster.client import GatewayClient, GatewayError
from gpud.cluster.settings import NODE_LABEL, ClusterSettings, reachability_warning
from gpud.cluster.workers import (
    DRAINING,
    Desired,
    Listed,
    ModelView,
    Plan,
    desired_worker,
    plan,
    wanted_names,
    worker_url,
)
from gpud.config import Settings
from gpud.registry import Model, Registry

log = logging.getLogger(__name__)

FIRST_BACKOFF_SEC = 0.5
SETTLE_SEC = 1.0  # how soon to look again after acting (to see a registration land or a worker drain)
_CONFIRM_POLL_SEC = 0.1  # how often `deregister` looks whether the gateway stopped sending


async def within(work: Awaitable[Any], timeout: float) -> bool:
    """Run `work` for at most `timeout` seconds (cancelled after that); True when it finished in time.

    Not asyncio.wait_for: up to Python 3.11 it can swallow the caller's own cancellation when `work` finishes
    at the same moment (python/cpython#86296), which would leave this loop running through the daemon's exit.
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if done:
        task.result()  # its exception, if it raised one
    return bool(done)


class Registrar:
    """See the module docstring. `run()` is the loop; `status()` is what `gpud status` shows."""

    def __init__(
        self,
        settings: ClusterSettings,
        registry: Registry,
        *,
        proxy_api_key: str | None = None,
        client: GatewayClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.gateway is not None and settings.advertise is not None
        self.settings = settings
        self.node = settings.advertise
        self._registry = registry
        self._proxy_api_key = proxy_api_key
        self._client = client or GatewayClient(settings.gateway, settings.api_key, settings.request_timeout_sec)
        self._clock = clock
        self._lock = asyncio.Lock()
        self._wanted: frozenset[str] = frozenset()  # the rule's answer at the last look
        self._acted_on: frozenset[str] | None = None  # what the last pass compared with the gateway
        self._seeded = False  # workers found on the gateway at the first listing count as registered before
        self._pending: dict[str, float] = {}  # URL → when its registration was last sent (not listed yet)
        self._announced: set[str] = set()  # URLs whose registration was logged (until they are listed)
        self._closing = False
        self._backoff = 0.0  # 0 while the gateway answers; the next retry's delay while it does not
        self._state: tuple[str, int | None] | None = None  # ("ok", None), or GatewayError.key; None: not yet
        self._problem: GatewayError | None = None  # what went wrong in the last pass
        self._last: dict[str, Any] = {"ok": None, "at": None, "error": None}
        self._plan = Plan()
        self.events_seen = 0  # registry events the loop has looked at (what a test waits on)

    @classmethod
    def for_daemon(cls, settings: Settings, registry: Registry) -> Registrar:
        """The daemon's registrar: the gateway may call the proxy with its first api key (SPEC §16)."""
        warning = reachability_warning(settings.cluster, settings.proxy.listen_host)
        if warning:
            log.warning("%s", warning)
        keys = settings.proxy.api_keys
        return cls(settings.cluster, registry, proxy_api_key=keys[0] if keys else None)

    # ---- what should be registered ------------------------------------------------------------------

    def _look(self) -> frozenset[str]:
        """Apply the rule to the registry now, remembering the answer for the next look."""
        if self._closing:
            self._wanted = frozenset()
        else:
            views = [ModelView(m.name, m.served_state(), len(m.ready_replicas())) for m in self._registry]
            self._wanted = wanted_names(views, self._wanted)
        return self._wanted

    def _seed(self, listed: list[Listed]) -> None:
        """After a daemon restart, a restored model whose worker is still on the gateway keeps it while it
        starts (the gateway's health check holds traffic back until it is ready): no removal and re-adding."""
        self._seeded = True
        names = {worker_url(self.node, m.name): m.name for m in self._registry}
        on_gateway = {names[w.url] for w in listed if w.url in names and w.status != DRAINING
                      and w.labels.get(NODE_LABEL) == self.node}
        self._wanted = self._wanted | on_gateway
        self._look()  # the rule still decides: a model that failed meanwhile is not kept

    def _desired(self) -> list[Desired]:
        return [desired_worker(self.settings, name, self._proxy_api_key) for name in sorted(self._wanted)]

    # ---- one pass -------------------------------------------------------------------------------------

    async def sync(self) -> Plan | None:
        """One reconcile pass; the plan it carried out, or None when the gateway could not be listed."""
        async with self._lock:
            return await self._pass()

    async def _pass(self) -> Plan | None:
        self._look()
        try:
            listed = await self._client.list_workers()
        except GatewayError as exc:
            self._record(exc)
            return None
        if not self._seeded:
            self._seed(listed)
        self._acted_on = self._wanted
        now = self._clock()
        seen = {w.url for w in listed}
        desired = self._desired()
        wanted_urls = {d.url for d in desired}
        self._announced &= wanted_urls - seen
        # A registration the gateway has not listed after sync_sec is sent again (its first probe may have
        # failed, and the gateway retries one only after ~30 s); one not wanted any more is forgotten then.
        grace = self.settings.sync_sec
        self._pending = {u: t for u, t in self._pending.items() if u not in seen and now - t < grace}
        work = plan(desired, listed, self.node, self._pending)
        problem: GatewayError | None = None
        for worker in work.remove:
            try:
                await self._client.remove_worker(worker.id)
            except GatewayError as exc:
                problem = problem or exc
            else:
                log.info("gateway %s: removed worker %s (%s)", self._client.gateway, worker.url, worker.id)
        for want in work.register:
            try:
                worker_id = await self._client.add_worker(want.body)
            except GatewayError as exc:
                problem = problem or exc
            else:
                self._pending[want.url] = now
                if want.url not in self._announced:
                    self._announced.add(want.url)
                    log.info("gateway %s: registering model %s as %s (worker %s)", self._client.gateway,
                             want.name, want.url, worker_id or "id not given")
                elif problem is None:
                    problem = GatewayError(
                        "unlisted",
                        f"The gateway at {self._client.gateway} accepted the registration of {want.url} but has "
                        f"not listed it after {self.settings.sync_sec:g} s: can it reach {self.node}? (It "
                        "lists a worker once its probe of the worker's /health passed.)",
                    )
        if problem is None and work.conflicts:
            want, holder = work.conflicts[0]
            problem = GatewayError(
                "conflict",
                f"The gateway at {self._client.gateway} already has a worker at {want.url} that is not this "
                f"node's (gpud_node={holder.labels.get('gpud_node', 'unset')!r}); model {want.name} stays "
                "unregistered until it is removed.",
            )
        self._plan = work
        self._record(problem)
        return work

    def _record(self, problem: GatewayError | None) -> None:
        """Remember how the pass went; log only when the gateway's state changes."""
        self._problem = problem
        state = ("ok", None) if problem is None else problem.key
        gateway = self.settings.gateway
        if state != self._state:
            if problem is None:
                again = " again" if self._state is not None else ""
                log.info("gateway %s: in sync%s (%d workers of this node)", gateway, again, len(self._desired()))
            elif problem.kind == "unreachable":
                log.warning("%s Retrying with backoff; the node serves on meanwhile.", problem.message)
            else:
                log.error("%s Retrying with backoff; the node serves on meanwhile.", problem.message)
            self._state = state
        if problem is None:
            self._backoff = 0.0
        else:
            self._backoff = min(self.settings.sync_sec, self._backoff * 2 if self._backoff else FIRST_BACKOFF_SEC)
        self._last = {"ok": problem is None, "at": time.time(), "error": problem.message if problem else None}

    # ---- the loop ---------------------------------------------------------------------------------------

    def next_delay(self, work: Plan | None) -> float:
        """Seconds until the next pass: the backoff while the gateway fails, soon while work is under way."""
        if self._backoff:
            return self._backoff
        if work is not None and not work.settled:
            return min(self.settings.sync_sec, SETTLE_SEC)
        return self.settings.sync_sec

    async def run(self) -> None:
        """Reconcile until cancelled: every sync_sec, and at once when the models to register change."""
        queue = self._registry.subscribe()
        loop = asyncio.get_running_loop()
        try:
            delay = 0.0
            while True:
                deadline = loop.time() + delay
                while (left := deadline - loop.time()) > 0:
                    if not await within(queue.get(), left):
                        break
                    self.events_seen += 1
                    # While the gateway fails, its backoff sets the pace; else a change is acted on at once.
                    if self._look() != self._acted_on and not self._backoff:
                        break
                try:
                    delay = self.next_delay(await self.sync())
                except Exception:  # a bug here must not end registration for the daemon's whole life
                    log.exception("gateway %s: reconcile pass failed", self.settings.gateway)
                    delay = self.settings.sync_sec
        finally:
            self._registry.unsubscribe(queue)

    # ---- before a model stops, and before the daemon exits ----------------------------------------------

    async def deregister(self, model: Model) -> None:
        """Remove model's worker and return once the gateway no longer sends it requests (draining or gone),
        or after deregister_timeout_sec, or at once when the gateway is down. The model is already marked
        stopping, so the rule no longer wants it. Never raises: the stop goes on whatever the gateway says."""
        url = worker_url(self.node, model.name)
        if url in self._live(self._plan):
            await self._until_gone({url}, f"model {model.name}")

    async def close(self) -> None:
        """SIGTERM: remove every worker of this node (bounded by deregister_timeout_sec), then close."""
        self._closing = True
        try:
            if self._state is not None:  # the gateway was reached at least once (or tried and failed)
                await self._until_gone(None, "this node's workers")
        except Exception:  # the daemon's stop sequence goes on whatever happens here
            log.exception("gateway %s: removing this node's workers failed", self.settings.gateway)
        finally:
            await self._client.close()

    def _live(self, work: Plan) -> set[str]:
        """URLs of this node's workers the gateway may still send requests to (or soon will)."""
        return {w.url for _, w in work.registered} | {w.url for w in work.remove} | set(self._pending)

    def _gateway_lost(self) -> bool:
        """The last pass says retrying now is pointless: the gateway does not answer or refuses gpud."""
        return self._problem is not None and self._problem.kind in ("unreachable", "refused")

    async def _until_gone(self, urls: set[str] | None, what: str) -> None:
        """Pass until none of `urls` (None: of this node's workers) is live on the gateway."""
        if self._gateway_lost():
            return  # its health check takes the workers out; waiting here would only delay the stop

        async def passes() -> None:
            while True:
                work = await self.sync()
                if work is None or self._gateway_lost():
                    return
                live = self._live(work)
                if not (live if urls is None else urls & live):
                    return
                await asyncio.sleep(_CONFIRM_POLL_SEC)

        timeout = self.settings.deregister_timeout_sec
        if await within(passes(), timeout):
            return
        log.warning("gateway %s did not confirm the removal of %s within %g s; going on.",
                    self.settings.gateway, what, timeout)

    # ---- status --------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The `cluster` object of GET /v1/status: the gateway, how the last pass went, this node's workers."""
        last = dict(self._last)
        last["age_sec"] = round(time.time() - last["at"], 3) if last["at"] is not None else None
        work = self._plan
        workers: list[dict[str, Any]] = [
            {"model": want.name, "url": want.url, "id": listed.id, "status": listed.status or "unknown"}
            for want, listed in work.registered
        ]
        for group, label in ((work.register + work.pending, "registering"), (work.waiting, "waiting"),
                             (tuple(w for w, _ in work.conflicts), "conflict")):
            workers += [{"model": w.name, "url": w.url, "id": None, "status": label} for w in group]
        return {
            "gateway": self.settings.gateway,
            "advertise": self.node,
            "last_sync": last,
            "workers": sorted(workers, key=lambda w: str(w["model"])),
        }
