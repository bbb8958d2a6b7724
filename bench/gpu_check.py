"""gpud on real NVIDIA GPUs: the ledger against nvidia-smi, CUDA_VISIBLE_DEVICES isolation, memory freed on stop.

    bench/gpu-check [--replicas 2] [--vram 4GiB] [--alloc-gib 1] [--child-gib 0.5] [--deadline 480]

Run by `bench/gpu-check`. Stdlib only: gpud itself runs from this checkout on --gpud-python (default:
the repo's .venv, else this interpreter; with --wheelhouse DIR and no gpud dependencies there, a venv
with --system-site-packages is made in /tmp and they are installed offline from DIR). The replicas run on
--replica-python (default: the first of this interpreter, the gpud one and `python3` that has PyTorch
with CUDA, else the gpud one, and the replica then uses the CUDA driver API through ctypes).

1. A daemon with `--gpus auto` on a private socket, state dir and proxy port.
2. `gpud gpus -o json` against `nvidia-smi --query-gpu=…`: same GPUs (UUIDs), totals, used memory.
3. `--replicas` replicas of bench/torch_replica.py with the `command` engine: each allocates GiB with
   torch or libcuda (and a child process does too, like vLLM's EngineCore). Checked: every replica sees exactly one
   device, the one gpud placed it on (UUID, else PCI bus id); `nvidia-smi --query-compute-apps` lists its
   processes, within the reservation; gpud's `measured_bytes` (model show) agrees with nvidia-smi; the
   ledger counts their memory as gpud's, not as used by others; the proxy reaches them.
4. `gpud model stop`: the processes are gone and nvidia-smi shows the memory free again; the ledger's
   reservations are 0. Then SIGTERM to the daemon: exit 0, no process left.

Prints one PASS/FAIL/WARN line per check, writes a markdown summary (and the logs) to $OUT when set,
exits 0 when nothing failed, 1 when a check failed, 2 when the machine cannot run the check (no
nvidia-smi, no CUDA torch, gpud's dependencies missing). Every step has a timeout and the whole run
stops by --deadline (default 480 s), cleaning up what it started, to stay inside a 10-minute limit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB, GiB = 2**20, 2**30
SMI_GPU_FIELDS = "index,uuid,name,pci.bus_id,memory.total,memory.used"


class Deadline(Exception):
    """The run's time is up (or it was asked to stop): clean up and report."""


@dataclass
class Report:
    checks: list[tuple[str, str, str]] = field(default_factory=list)  # (PASS|FAIL|WARN, name, detail)
    facts: list[str] = field(default_factory=list)

    def check(self, ok: bool, name: str, detail: str = "", *, warn_only: bool = False) -> bool:
        verdict = "PASS" if ok else "WARN" if warn_only else "FAIL"
        self.checks.append((verdict, name, detail))
        print(f"{verdict} {name}" + (f" — {detail}" if detail else ""), flush=True)
        return ok

    @property
    def failed(self) -> bool:
        return any(v == "FAIL" for v, _, _ in self.checks)

    def markdown(self) -> str:
        lines = ["# gpud GPU check", "", *[f"- {f}" for f in self.facts], "", "| result | check | detail |",
                 "| --- | --- | --- |"]
        lines += [f"| {v} | {n} | {d.replace('|', '/')} |" for v, n, d in self.checks]
        passed = sum(v == "PASS" for v, _, _ in self.checks)
        lines += ["", f"{passed}/{len(self.checks)} checks passed" + (", FAILED" if self.failed else "") + "."]
        return "\n".join(lines) + "\n"


# ---- nvidia-smi (pure parsing + one runner) ------------------------------------------------------------------

def parse_csv(text: str) -> list[list[str]]:
    """`--format=csv,noheader,nounits` output: one list of stripped fields per line."""
    return [[cell.strip() for cell in line.split(",")] for line in text.splitlines() if line.strip()]


def parse_gpus(text: str) -> list[dict[str, Any]]:
    gpus = []
    for index, uuid, name, bus, total, used in parse_csv(text):
        gpus.append({"index": int(index), "uuid": uuid, "name": name, "pci_bus_id": bus.upper(),
                     "total_bytes": int(float(total)) * MiB, "used_bytes": int(float(used)) * MiB})
    return gpus


def parse_apps(text: str) -> list[dict[str, Any]]:
    """Compute apps: pid, used memory (None when the driver cannot tell), GPU UUID."""
    apps = []
    for pid, used, uuid in parse_csv(text):
        apps.append({"pid": int(pid), "used_bytes": int(float(used)) * MiB if used.replace(".", "").isdigit() else None,
                     "gpu_uuid": uuid})
    return apps


def smi(query: str, fields: str, timeout: float = 30) -> str:
    done = subprocess.run(["nvidia-smi", f"--query-{query}={fields}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"nvidia-smi --query-{query} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def smi_gpus() -> list[dict[str, Any]]:
    return parse_gpus(smi("gpu", SMI_GPU_FIELDS))


def smi_apps() -> list[dict[str, Any]]:
    return parse_apps(smi("compute-apps", "pid,used_memory,gpu_uuid"))


def normalize_pci(bus_id: str | None) -> tuple[int, ...] | None:
    """"00000000:3B:00.0" (nvidia-smi), "0000:3b:00.0" (CUDA): the same device as (domain, bus, device, fn)."""
    if not bus_id:
        return None
    try:
        domain, bus, rest = bus_id.strip().split(":")
        device, function = rest.split(".")
        return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16)
    except ValueError:
        return None


def gpud_env() -> dict[str, str]:
    """This environment, with gpud importable from this checkout and no GPUD_SOCKET of another daemon."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("GPUD_SOCKET", None)
    return env


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# ---- the run --------------------------------------------------------------------------------------------------

class Run:
    def __init__(self, args: argparse.Namespace, report: Report, work: Path) -> None:
        self.args, self.report, self.work = args, report, work
        self.deadline = time.monotonic() + args.deadline
        self.socket = str(work / "gpud.sock")
        self.state = work / "state"
        self.env = gpud_env()
        self.daemon: subprocess.Popen[bytes] | None = None
        self.pids: set[int] = set()  # every replica process seen: must all be gone at the end
        self.port = 0

    def left(self, cap: float) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 1:
            raise Deadline(f"the --deadline of {self.args.deadline:g} s was reached")
        return min(cap, remaining)

    def gpud(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.args.gpud_python, "-m", "gpud", "--socket", self.socket, *args],
                              capture_output=True, text=True, timeout=self.left(timeout), env=self.env)

    def gpud_json(self, *args: str, timeout: float = 60) -> Any:
        done = self.gpud(*args, "-o", "json", timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"gpud {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def wait(self, predicate: Callable[[], Any], cap: float, what: str) -> Any:
        end = time.monotonic() + self.left(cap)
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            time.sleep(0.5)
        return None

    # -- steps --
    def start_daemon(self) -> bool:
        self.state.mkdir()
        config = self.work / "gpud.toml"
        config.write_text("[supervisor]\nhealth_interval_sec = 1\nstop_timeout_sec = 20\ndrain_timeout_sec = 5\n")
        with socket_free_port() as port:
            self.port = port
        self.log = open(self.work / "daemon.log", "wb")  # noqa: SIM115 - closed in cleanup()
        self.daemon = subprocess.Popen(
            [self.args.gpud_python, "-m", "gpud", "daemon", "--gpus", self.args.gpus, "--config", str(config),
             "--socket", self.socket, "--state-dir", str(self.state), "--listen", f"127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
        )
        up = self.wait(lambda: self.daemon.poll() is not None or self.gpud("status", timeout=10).returncode == 0,
                       60, "the daemon")
        return self.report.check(bool(up) and self.daemon.poll() is None, "daemon starts with --gpus " + self.args.gpus,
                                 "" if self.daemon.poll() is None else f"exited {self.daemon.returncode}")

    def check_ledger(self, before: list[dict[str, Any]], stage: str) -> dict[int, dict[str, Any]]:
        ledger = {g["index"]: g for g in self.gpud_json("gpus")["gpus"]}
        smi_now = {g["index"]: g for g in smi_gpus()}
        tol = self.args.tolerance_mib * MiB
        self.report.check(sorted(ledger) == sorted(smi_now), f"{stage}: ledger lists nvidia-smi's GPUs",
                          f"ledger {sorted(ledger)}, nvidia-smi {sorted(smi_now)}")
        for index, gpu in smi_now.items():
            mine = ledger.get(index)
            if mine is None:
                continue
            self.report.check(mine["uuid"] == gpu["uuid"], f"{stage}: GPU {index} UUID", f"{mine['uuid']} / {gpu['uuid']}")
            self.report.check(abs(mine["total_bytes"] - gpu["total_bytes"]) < MiB, f"{stage}: GPU {index} total",
                              f"ledger {mine['total_bytes']} B, nvidia-smi {gpu['total_bytes'] // MiB} MiB")
            ours = sum(a["used_bytes"] or 0 for a in smi_apps() if a["gpu_uuid"] == gpu["uuid"] and a["pid"] in self.pids)
            others = gpu["used_bytes"] - ours
            self.report.check(abs(mine["used_by_others_bytes"] - others) <= tol, f"{stage}: GPU {index} used by others",
                              f"ledger {mine['used_by_others_bytes'] // MiB} MiB, nvidia-smi used − replicas "
                              f"{others // MiB} MiB (tolerance {self.args.tolerance_mib} MiB)")
        return ledger

    def start_model(self) -> dict[str, Any] | None:
        command = " ".join(shlex.quote(p) for p in [self.args.replica_python, str(ROOT / "bench" / "torch_replica.py")])
        command += f" --host {{host}} --port {{port}} --alloc-gib {self.args.alloc_gib:g} --child-gib {self.args.child_gib:g}"
        done = self.gpud("model", "start", "gpu-check", "--engine", "command", "--command", command,
                         "--replicas", str(self.args.replicas), "--vram", self.args.vram, "--timeout", "300",
                         "-o", "json", timeout=330)
        shown = json.loads(done.stdout) if done.stdout.strip().startswith("{") else None
        ok = done.returncode == 0 and shown is not None and shown["replicas_ready"] == self.args.replicas
        self.report.check(ok, f"{self.args.replicas} torch replicas start and become ready",
                          done.stderr.strip() if not ok else f"placed on GPUs {[r['gpus'] for r in shown['replicas']]}")
        return shown if ok else None

    def check_replicas(self, shown: dict[str, Any], gpus: dict[int, dict[str, Any]]) -> None:
        apps = smi_apps()
        app_pids = {a["pid"] for a in apps}
        for replica in shown["replicas"]:
            i, placed = replica["index"], replica["gpus"][0]
            with urllib.request.urlopen(f"http://127.0.0.1:{replica['port']}/info", timeout=self.left(10)) as resp:
                info = json.loads(resp.read())
            pids = {p for p in (info["pid"], info["child_pid"]) if p}
            self.pids |= pids
            if i == 0:
                self.report.facts.append(f"replicas allocate with {info.get('backend')}")
            self.report.check(info["pid"] == replica["pid"], f"replica {i}: gpud's pid is the engine process",
                              f"gpud {replica['pid']}, replica {info['pid']}")
            self.report.check(info["device_count"] == 1, f"replica {i}: CUDA shows exactly one device",
                              f"device_count {info['device_count']}")
            self.report.check(info["cuda_visible_devices"] == str(placed), f"replica {i}: CUDA_VISIBLE_DEVICES",
                              f"{info['cuda_visible_devices']!r}, placed on GPU {placed}")
            if info.get("uuid"):
                self.report.check(info["uuid"] == gpus[placed]["uuid"], f"replica {i}: sees the GPU it was placed on",
                                  f"torch {info['uuid']}, nvidia-smi GPU {placed} {gpus[placed]['uuid']}")
            elif info.get("pci_bus_id"):
                self.report.check(normalize_pci(info["pci_bus_id"]) == normalize_pci(gpus[placed]["pci_bus_id"]),
                                  f"replica {i}: sees the GPU it was placed on (PCI bus id)",
                                  f"torch {info['pci_bus_id']}, nvidia-smi {gpus[placed]['pci_bus_id']}")
            else:
                self.report.check(False, f"replica {i}: device identity", "this PyTorch reports neither UUID nor PCI id",
                                  warn_only=True)
            listed = pids & app_pids
            if not self.report.check(listed == pids, f"replica {i}: nvidia-smi lists its processes",
                                     f"ours {sorted(pids)}, listed {sorted(listed)} (a container's pid namespace "
                                     "hides them from NVML)" if listed != pids else f"pids {sorted(pids)}"):
                continue
            used = sum(a["used_bytes"] or 0 for a in apps if a["pid"] in pids)
            on_gpu = {a["gpu_uuid"] for a in apps if a["pid"] in pids}
            self.report.check(on_gpu == {gpus[placed]["uuid"]}, f"replica {i}: its memory is on GPU {placed} only",
                              f"{sorted(on_gpu)}")
            self.report.check(used <= replica["vram_bytes"], f"replica {i}: uses no more than its reservation",
                              f"{used // MiB} MiB used of {replica['vram_bytes'] // MiB} MiB reserved")
            self.check_measured(i, used)
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/info", headers={"X-Gpud-Model": "gpu-check"})
        with urllib.request.urlopen(request, timeout=self.left(10)) as resp:
            self.report.check(resp.status == 200 and resp.headers.get("X-Gpud-Replica") is not None,
                              "the proxy routes to a replica", f"X-Gpud-Replica {resp.headers.get('X-Gpud-Replica')}")

    def check_measured(self, index: int, used: int) -> None:
        """gpud's own measurement of the replica (model show `measured_bytes`, the sum over its process tree)
        against nvidia-smi's. The tree is re-read at each health check, so a child may take one interval."""
        tol = self.args.tolerance_mib * MiB
        seen: list[int | None] = [None]

        def close() -> bool:
            self.gpud_json("gpus")  # a fresh NVML reading for the ledger
            shown = self.gpud_json("model", "show", "gpu-check")
            seen[0] = next(r for r in shown["replicas"] if r["index"] == index).get("measured_bytes")
            return seen[0] is not None and abs(seen[0] - used) <= tol

        ok = bool(self.wait(close, 20, "gpud's measurement"))
        got = "null" if seen[0] is None else f"{seen[0] // MiB} MiB"
        self.report.check(ok, f"replica {index}: gpud measures what nvidia-smi shows",
                          f"gpud {got}, nvidia-smi {used // MiB} MiB (tolerance {self.args.tolerance_mib} MiB)")

    def stop_model(self, baseline: list[dict[str, Any]]) -> None:
        done = self.gpud("model", "stop", "gpu-check", timeout=120)
        self.report.check(done.returncode == 0, "gpud model stop", done.stderr.strip())
        alive = [p for p in self.pids if pid_alive(p)]
        self.report.check(not alive, "no replica process is left after stop", f"alive {alive}" if alive else "")
        before = {g["index"]: g["used_bytes"] for g in baseline}
        tol = self.args.tolerance_mib * MiB

        def freed() -> bool:
            return not ({a["pid"] for a in smi_apps()} & self.pids) and all(
                g["used_bytes"] - before.get(g["index"], 0) <= tol for g in smi_gpus())

        ok = bool(self.wait(freed, 30, "memory to be freed"))
        now = {g["index"]: g["used_bytes"] // MiB for g in smi_gpus()}
        self.report.check(ok, "nvidia-smi shows the memory free again",
                          f"used MiB before {({i: b // MiB for i, b in before.items()})}, after {now}")
        reserved = [g["reserved_bytes"] for g in self.gpud_json("gpus")["gpus"]]
        self.report.check(not any(reserved), "the ledger's reservations are released", f"reserved {reserved}")

    def stop_daemon(self) -> None:
        if self.daemon is None:
            return
        self.daemon.send_signal(signal.SIGTERM)
        try:
            code = self.daemon.wait(self.left(60))
        except subprocess.TimeoutExpired:
            code = None
        self.report.check(code == 0, "the daemon exits 0 on SIGTERM", f"exit {code}")
        alive = [p for p in self.pids if pid_alive(p)]
        self.report.check(not alive, "no replica process outlives the daemon", f"alive {alive}" if alive else "")

    def cleanup(self) -> None:
        """Whatever happened: the daemon and every replica process we saw are gone afterwards."""
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(45)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        for pid in self.pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if hasattr(self, "log"):
            self.log.close()


class socket_free_port:  # noqa: N801 - used like a function
    """`with socket_free_port() as port`: a TCP port free on 127.0.0.1 right now."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


# ---- entry point ----------------------------------------------------------------------------------------------

def has_modules(python: str, code: str) -> bool:
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=120, env=gpud_env()).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def preflight(args: argparse.Namespace, report: Report) -> bool:
    if shutil.which("nvidia-smi") is None:
        return report.check(False, "nvidia-smi is on PATH", "not found: this is not an NVIDIA machine")
    try:
        gpus = smi_gpus()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return report.check(False, "nvidia-smi answers", str(exc))
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
    report.facts += [f"{len(gpus)} GPU(s): " + ", ".join(f"{g['index']}: {g['name']} {g['total_bytes'] // GiB} GiB"
                                                         for g in gpus), f"driver {driver}"]
    if not has_modules(args.gpud_python, GPUD_IMPORTS) and args.wheelhouse:
        args.gpud_python = venv_from_wheelhouse(args.wheelhouse, report) or args.gpud_python
    if not has_modules(args.gpud_python, GPUD_IMPORTS):
        return report.check(False, "gpud runs", f"{args.gpud_python} cannot import gpud and its dependencies "
                            "(aiohttp, uvloop, psutil, nvidia-ml-py); pass --gpud-python or --wheelhouse")
    if args.replica_python is None:
        candidates = [sys.executable, args.gpud_python, shutil.which("python3") or ""]
        args.replica_python = next((p for p in candidates if p and has_modules(p, TORCH_CUDA)), None) or \
            next((p for p in candidates if p and has_modules(p, LIBCUDA)), None)
    if not args.replica_python:
        return report.check(False, "CUDA for the replicas", "no interpreter has PyTorch with CUDA or can load "
                            "libcuda.so.1; pass --replica-python")
    # Replicas run in the state dir: a relative path would not resolve there. No symlink resolution: a
    # venv's bin/python must keep its own path to be that venv.
    args.replica_python = os.path.abspath(shutil.which(args.replica_python) or args.replica_python)
    report.facts.append(f"gpud on {args.gpud_python}, replicas on {args.replica_python}")
    return True


GPUD_IMPORTS = "import gpud, aiohttp, uvloop, psutil, pynvml, prometheus_client"
TORCH_CUDA = "import torch, sys; sys.exit(not torch.cuda.is_available())"
LIBCUDA = "import ctypes; ctypes.CDLL('libcuda.so.1')"
GPUD_DEPS = ["aiohttp", "uvloop", "psutil", "nvidia-ml-py", "virtualenv", "prometheus-client",
             "tomli; python_version < '3.11'"]


def venv_from_wheelhouse(wheelhouse: str, report: Report) -> str | None:
    """A venv that sees the system's packages (PyTorch, if any) plus gpud's dependencies from wheels."""
    venv = Path(tempfile.gettempdir()) / "gpud-check-venv"
    python = venv / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True,
                           capture_output=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", wheelhouse,
                        *GPUD_DEPS], check=True, capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        report.check(False, "gpud's dependencies install from the wheelhouse", str(detail).strip()[-500:])
        return None
    return str(python)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    venv = ROOT / ".venv" / "bin" / "python"
    parser.add_argument("--gpud-python", default=str(venv) if venv.exists() else sys.executable,
                        help="interpreter for gpud (default: the repo's .venv, else this one)")
    parser.add_argument("--replica-python", help="interpreter for the replicas (default: search, see above)")
    parser.add_argument("--wheelhouse", help="wheels of gpud's dependencies, for a machine without them or PyPI")
    parser.add_argument("--gpus", default="auto", help="gpud's --gpus (default auto; sim:… only for dry runs)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--vram", default="4GiB", help="reservation per replica (default 4GiB)")
    parser.add_argument("--alloc-gib", type=float, default=1.0, help="GiB each replica allocates (default 1)")
    parser.add_argument("--child-gib", type=float, default=0.5, help="GiB each replica's child allocates (0.5)")
    parser.add_argument("--tolerance-mib", type=int, default=256, help="slack when comparing memory (256 MiB)")
    parser.add_argument("--deadline", type=float, default=480, help="stop everything after this many seconds")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    report = Report()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None

    def interrupted(signum: int, _frame: object) -> None:
        raise Deadline(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    if not preflight(args, report):
        write_outputs(report, out, None)
        return 2

    work = Path(tempfile.mkdtemp(prefix="gpud-gpu-", dir="/tmp"))  # short: the socket path limit is 108 bytes
    run = Run(args, report, work)
    try:
        baseline = smi_gpus()
        if run.start_daemon():
            gpus = {g["index"]: g for g in baseline}
            run.check_ledger(baseline, "idle")
            shown = run.start_model()
            if shown is not None:
                run.check_replicas(shown, gpus)
                run.check_ledger(baseline, "running")
                reserved = {g["index"]: g["reserved_bytes"] for g in run.gpud_json("gpus")["gpus"]}
                expected: dict[int, int] = {}
                for replica in shown["replicas"]:
                    for g in replica["gpus"]:
                        expected[g] = expected.get(g, 0) + replica["vram_bytes"]
                report.check(all(reserved.get(g, 0) == b for g, b in expected.items()),
                             "the ledger reserves each replica's --vram", f"reserved {reserved}")
                run.stop_model(baseline)
            run.stop_daemon()
    except Deadline as exc:
        report.check(False, "the check finished in time", str(exc))
    except Exception as exc:  # report it as a failure with its cause, then clean up
        report.check(False, "the check ran without an unexpected error", f"{type(exc).__name__}: {exc}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        run.cleanup()
        write_outputs(report, out, work)
        shutil.rmtree(work, ignore_errors=True)
    print("FAILED" if report.failed else "ALL PASSED", flush=True)
    return 1 if report.failed else 0


def write_outputs(report: Report, out: Path | None, work: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.md").write_text(report.markdown())
    if work is not None and (work / "daemon.log").exists():
        shutil.copy(work / "daemon.log", out / "daemon.log")
        for log in (work / "state").rglob("*.log"):
            shutil.copy(log, out / f"replica-{log.parent.name}-{log.name}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
