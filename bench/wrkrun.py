"""wrk, run once per port at the same time, and its output read: the one home for both in bench/."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WrkResult:
    requests_per_sec: float  # summed over the ports
    p50_ms: float  # the worst port's
    p99_ms: float


def run_wrk(ports: list[int], connections: int, duration: float, script: Path,
            path: str = "/v1/completions") -> WrkResult:
    """One `wrk -t1` per port, `connections` split between them; an error answer or a failed wrk aborts the bench."""
    per = max(1, connections // len(ports))
    procs = [subprocess.Popen(["wrk", "-t1", f"-c{per}", f"-d{duration:g}s", "--latency", "-s", str(script),
                               f"http://127.0.0.1:{p}{path}"], stdout=subprocess.PIPE, text=True)
             for p in ports]
    total, p50, p99 = 0.0, 0.0, 0.0
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"wrk failed:\n{out}")
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if bad:
            raise SystemExit(f"wrk saw {bad.group(1)} error answers:\n{out}")
        rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if rate is None:
            raise SystemExit(f"wrk printed no Requests/sec:\n{out}")
        total += float(rate.group(1))
        p50 = max(p50, latency_ms(out, "50"))
        p99 = max(p99, latency_ms(out, "99"))
    return WrkResult(total, p50, p99)


def latency_ms(out: str, percentile: str) -> float:
    """One line of wrk's --latency distribution, in milliseconds."""
    match = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if match is None:
        raise SystemExit(f"wrk printed no {percentile}% latency:\n{out}")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
