"""contrib/systemd: the unit and the sysusers entry agree with gpud's settings, and systemd's own tools
accept them (`systemd-analyze verify`, `systemd-sysusers --dry-run`; skipped where systemd is not installed)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from gpud.config import SupervisorSettings, read_config_file
from gpud.daemon import parse_args

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "systemd" / "gpud.service"
SYSUSERS = ROOT / "contrib" / "systemd" / "gpud.sysusers"
CONFIG = ROOT / "packaging" / "gpud.toml"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (Debian: apt-get install systemd)")
needs_sysusers = pytest.mark.skipif(shutil.which("systemd-sysusers") is None,
                                    reason="systemd-sysusers is not installed (Debian: apt-get install systemd)")


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as {section: [(key, value), …]}: keys may repeat, `\\` continues a line."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {line}"
        current.append((key.strip(), value.strip()))
    return sections


UNIT_SECTIONS = parse_unit(UNIT.read_text())
SERVICE = UNIT_SECTIONS["Service"]


def one(key: str, section: list[tuple[str, str]] = SERVICE) -> str:
    values = [v for k, v in section if k == key]
    assert len(values) == 1, f"{key}= should be set exactly once, found {values}"
    return values[0]


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    for suffix in sorted(units, key=len, reverse=True):
        if value.endswith(suffix) and value[: -len(suffix)].strip().replace(".", "", 1).isdigit():
            return float(value[: -len(suffix)]) * units[suffix]
    return float(value)


def exec_start() -> list[str]:
    return shlex.split(one("ExecStart"))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_unit_is_a_notify_service_with_a_watchdog_that_only_gpud_may_feed() -> None:
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert seconds(one("WatchdogSec")) == 30
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == "2"  # invalid config: restarting cannot help
    assert one("WantedBy", UNIT_SECTIONS["Install"]) == "multi-user.target"


def test_stopping_lets_gpud_drain_and_stop_its_replicas_before_systemd_kills_anything() -> None:
    assert one("KillMode") == "mixed"
    defaults = SupervisorSettings()
    assert seconds(one("TimeoutStopSec")) > defaults.drain_timeout_sec + defaults.stop_timeout_sec
    assert one("OOMPolicy") == "continue"


def test_exec_start_names_the_system_paths_that_systemd_creates() -> None:
    argv = exec_start()
    assert argv[:2] == ["/usr/bin/gpud", "daemon"]
    parse_args(argv[2:])  # gpud's own parser accepts the flags
    assert Path(flag(argv, "--socket")).parent == Path("/run") / one("RuntimeDirectory")
    assert Path(flag(argv, "--state-dir")) == Path("/var/lib") / one("StateDirectory")
    assert Path(flag(argv, "--config")).parent == Path("/etc") / one("ConfigurationDirectory")
    assert one("LogsDirectory") == one("CacheDirectory") == "gpud"
    writable = one("ReadWritePaths").split()
    for path in ("/run/gpud", "/var/lib/gpud", "/var/cache/gpud", "/var/log/gpud"):
        assert path in writable


def test_hardening_keeps_the_gpus_reachable() -> None:
    keys = {k for k, _ in SERVICE}
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("PrivateTmp") == "yes"
    assert one("ProtectHome") == "read-only"
    # Each of these would hide /dev/nvidia* from CUDA (PrivateDevices) or deny unlisted devices (a device
    # rule, which ProtectClock= implies).
    assert not keys & {"PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock"}
    for key, value in SERVICE:
        assert not (key == "Environment" and any(w in value.upper() for w in ("TOKEN", "KEY", "SECRET", "PASSWORD"))), value


def test_the_user_group_and_socket_group_are_one_and_the_same() -> None:
    user, group = one("User"), one("Group")
    entries = [shlex.split(line) for line in SYSUSERS.read_text().splitlines() if line and not line.startswith("#")]
    assert ["u", user] == entries[0][:2] and user == group  # "u" also makes the group of the same name
    assert entries[0][4] == "/var/lib/gpud"  # home: the state dir, writable under ProtectSystem=strict
    assert ["m", user, "video"] in entries
    assert read_config_file(CONFIG)["daemon"]["socket_group"] == group


@needs_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    unit = _verifiable_copy(tmp_path, UNIT.read_text())
    problems = _verify(unit)
    assert not problems, "systemd-analyze verify complained:\n" + "\n".join(problems)


@needs_analyze
@pytest.mark.parametrize(("broken", "replacement"), [
    ("Type=notify", "Type=notifyy"),
    ("KillMode=mixed", "KilMode=mixed"),
    ("ExecStart=/usr/bin/gpud", "ExecStart=gpud-nowhere/gpud"),
])
def test_systemd_analyze_verify_does_catch_a_broken_unit(tmp_path: Path, broken: str, replacement: str) -> None:
    """The check above is only worth something if verify reports mistakes in this environment."""
    text = UNIT.read_text()
    assert broken in text
    unit = _verifiable_copy(tmp_path, text.replace(broken, replacement))
    assert _verify(unit), f"systemd-analyze verify accepted {replacement!r}"


@needs_sysusers
def test_systemd_sysusers_accepts_the_entry(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()  # an empty system: everything is created, nothing on this machine changes
    done = subprocess.run(["systemd-sysusers", "--dry-run", f"--root={tmp_path}", str(SYSUSERS)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "Creating user 'gpud'" in done.stdout + done.stderr


def _verifiable_copy(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart= pointing at an executable that exists here (verify checks that it does)."""
    fake = tmp_path / "bin" / "gpud"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    unit = tmp_path / "gpud.service"
    unit.write_text(text.replace("ExecStart=/usr/bin/gpud ", f"ExecStart={fake} "))
    return unit


def _verify(unit: Path) -> list[str]:
    """Problems verify reports about `unit`: its exit status and every output line naming the file."""
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    if done.returncode != 0:
        lines.append(f"exit status {done.returncode}: {done.stderr.strip()}")
    return lines
