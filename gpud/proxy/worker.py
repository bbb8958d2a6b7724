"""A proxy worker process (SPEC §14): `python -m gpud.proxy.worker LINK_FD`, started by the daemon.

Two file descriptors are inherited: the shared counters (gpud.proxy.counters) and LINK_FD, this worker's end
of a socket pair to the daemon, which carries JSON lines. The first is the job, never on the command line
(it holds the API keys, and any local user can read a command line):

    daemon → worker   {"t": "job", "job": {"index", "host", "port", "settings": {ProxySettings fields},
                                           "parent_pid", "counters_fd", "metrics_dir"}}   once, first
                      {"t": "table", "table": {...}}   the routing table (gpud.proxy.table): right after the
                                                        job (applied before the worker listens: a restarted
                                                        worker never answers 404 for a running model), then
                                                        on every change
                      {"t": "wake_failed", "model", "reason"}   the wake it asked for cannot be done
                      {"t": "drain"}                    stop accepting connections (shutdown begins)
    worker → daemon   {"t": "ready"}                    listening
                      {"t": "applied", "version": N}    it routes by table N from now on
                      {"t": "connect_failed", "model", "index"}
                      {"t": "wake", "model"}            requests wait for this idle model

The worker dies with the daemon: a parent-death signal, a check of getppid() against `parent_pid`, and the
end of the link (the daemon's end closes when it exits) each end it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from gpud.config import ProxySettings
from gpud.errors import GpudError
from gpud.proxy.counters import Counters
from gpud.proxy.metrics import RequestMetrics
from gpud.proxy.server import Proxy
from gpud.proxy.table import RouteTable
from gpud.supervise.lifeline import die_with_parent

log = logging.getLogger("gpud.proxy.worker")
EXIT_BIND_FAILED = 3


class DaemonLink:
    """This worker's end of the socket pair to the daemon."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def send(self, message: dict[str, Any]) -> None:
        if not self._writer.is_closing():
            self._writer.write(json.dumps(message).encode() + b"\n")

    def connect_failed(self, model: str, index: int) -> None:
        self.send({"t": "connect_failed", "model": model, "index": index})

    def wake(self, model: str) -> None:
        self.send({"t": "wake", "model": model})


def settings_from_job(job: dict[str, Any]) -> ProxySettings:
    fields = dict(job["settings"])
    fields["api_keys"] = tuple(fields.get("api_keys", ()))
    return ProxySettings(**fields)


async def serve(link_fd: int) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock = socket.socket(fileno=link_fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=64 * 2**20)
    first = await reader.readline()
    if not first:  # the daemon is gone already
        return 1
    job = json.loads(first)["job"]
    if os.getppid() != job["parent_pid"]:  # the daemon died before prctl took effect
        return 1
    logging.basicConfig(level=os.environ.get("GPUD_LOG_LEVEL", "info").upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s gpud.proxy[{job['index']}]: %(message)s")
    link = DaemonLink(writer)
    counters = Counters.attach(job["counters_fd"], job["index"])
    proxy = Proxy(settings_from_job(job), counters=counters, link=link,
                  metrics=RequestMetrics(job.get("metrics_dir")))
    table_line = await reader.readline()
    if not table_line:
        return 1
    _apply(json.loads(table_line), proxy, link)
    try:
        await proxy.start(job["host"], job["port"], reuse_port=True)
    except GpudError as exc:
        print(f"gpud proxy worker {job['index']}: {exc.message}", file=sys.stderr, flush=True)
        return EXIT_BIND_FAILED
    link.send({"t": "ready"})
    listening = loop.create_task(_follow(reader, proxy, link))
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({listening, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if listening.done() and not listening.cancelled() and listening.exception() is not None:
        log.error("the link to the daemon failed: %r", listening.exception())
    for task in (listening, stopping):
        task.cancel()
    await proxy.close()
    writer.close()
    counters.close()
    return 0


async def _follow(reader: asyncio.StreamReader, proxy: Proxy, link: DaemonLink) -> None:
    """Apply the daemon's messages until its end of the link closes (the daemon is gone)."""
    async for line in reader:
        message = json.loads(line)
        if message.get("t") == "drain":
            await proxy.stop_accepting()
        else:
            _apply(message, proxy, link)


def _apply(message: dict[str, Any], proxy: Proxy, link: DaemonLink) -> None:
    kind = message.get("t")
    if kind == "table":
        table = RouteTable.from_obj(message["table"])
        proxy.set_table(table)
        link.send({"t": "applied", "version": table.version})
    elif kind == "wake_failed":
        proxy.gate.changed(str(message.get("model")), ready=False, failure=str(message.get("reason")))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    die_with_parent(signal.SIGTERM)  # before anything else: the daemon may die while the job is read
    link_fd = int(args[0])
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(serve(link_fd))
    return uvloop.run(serve(link_fd))


if __name__ == "__main__":
    raise SystemExit(main())
