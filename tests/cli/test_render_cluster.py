"""`gpud status` with a `[cluster]`: the gateway, how the last sync went, and this node's workers."""

from __future__ import annotations

from typing import Any

from gpud.cli import render

BASE: dict[str, Any] = {"version": "0.1.0", "uptime_sec": 5, "models": 1, "replicas": 1, "ready": 1}


def lines(cluster: Any) -> list[str]:
    return render.format_status({**BASE, "cluster": cluster}).splitlines()


def test_no_cluster_adds_nothing() -> None:
    assert lines(None) == render.format_status(BASE).splitlines()
    assert not any(line.startswith("Gateway") for line in lines(None))


def test_a_good_sync_and_its_workers() -> None:
    shown = lines({"gateway": "http://gw:30000", "advertise": "http://10.0.0.5:8000",
                   "last_sync": {"ok": True, "at": 1.0, "age_sec": 3.2, "error": None},
                   "workers": [{"model": "a", "url": "u", "id": "1", "status": "ready"},
                               {"model": "b/c", "url": "v", "id": None, "status": "registering"}]})
    assert shown[-3:] == ["Gateway:     http://gw:30000 (last sync ok, 3s ago)",
                          "Advertised:  http://10.0.0.5:8000",
                          "Workers:     a (ready), b/c (registering)"]


def test_a_failed_sync_says_why_and_a_first_one_says_not_yet() -> None:
    failed = lines({"gateway": "http://gw:30000", "advertise": "http://n:8000", "workers": [],
                    "last_sync": {"ok": False, "at": 1.0, "age_sec": 65, "error": "Cannot reach the gateway."}})
    assert failed[-3] == "Gateway:     http://gw:30000 (last sync failed, 1m 5s ago: Cannot reach the gateway.)"
    assert failed[-1] == "Workers:     none"
    first = lines({"gateway": "http://gw:30000", "advertise": "http://n:8000", "workers": [],
                   "last_sync": {"ok": None, "at": None, "age_sec": None, "error": None}})
    assert first[-3] == "Gateway:     http://gw:30000 (not synced yet)"
