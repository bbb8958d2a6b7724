"""[cluster] settings: defaults, normalisation, and every kind of bad input naming the key and the file;
a daemon given bad [cluster] input refuses to start with exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpud.cluster.settings import ClusterSettings, reachability_warning
from gpud.config import load_settings
from gpud.errors import InvalidInput


def load(tmp_path: Path, text: str) -> ClusterSettings:
    path = tmp_path / "gpud.toml"
    path.write_text(text)
    return load_settings({"config": str(path)}, {"HOME": str(tmp_path)}).cluster


def test_no_cluster_by_default(tmp_path: Path) -> None:
    cluster = load(tmp_path, "")
    assert cluster == ClusterSettings() and not cluster.enabled and cluster.sync_sec == 10


def test_a_full_table(tmp_path: Path) -> None:
    cluster = load(tmp_path, '[cluster]\ngateway = "https://gw.example:30000/"\nadvertise = " http://10.0.0.5:8000 "\n'
                             'api_key = "secret"\nsync_sec = 2\nhealth_interval_sec = 1\nhealth_failures = 4\n'
                             'deregister_timeout_sec = 0.5\n[cluster.labels]\nzone = "a"\n')
    assert cluster.enabled
    assert (cluster.gateway, cluster.advertise, cluster.api_key) == ("https://gw.example:30000", "http://10.0.0.5:8000",
                                                                    "secret")
    assert (cluster.sync_sec, cluster.health_interval_sec, cluster.health_failures) == (2.0, 1, 4)
    assert cluster.deregister_timeout_sec == 0.5 and cluster.labels == {"zone": "a"}


def test_advertise_alone_is_no_cluster(tmp_path: Path) -> None:
    # Commenting out the gateway is how a node leaves the cluster; its advertise line may stay.
    assert not load(tmp_path, '[cluster]\nadvertise = "http://10.0.0.5:8000"\n').enabled


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('gateway = "http://gw:30000"', "'cluster.advertise'"),  # gateway without advertise
        ('gateway = "gw:30000"\nadvertise = "http://a:1"', "'cluster.gateway'"),
        ('gateway = "ftp://gw"\nadvertise = "http://a:1"', "'cluster.gateway'"),
        ('gateway = "http://"\nadvertise = "http://a:1"', "'cluster.gateway'"),
        ('gateway = "http://gw:99999"\nadvertise = "http://a:1"', "'cluster.gateway'"),
        ('gateway = "http://gw:30000"\nadvertise = "10.0.0.5:8000"', "'cluster.advertise'"),
        ('gateway = "http://gw:30000"\nadvertise = "http://a:1?x=1"', "'cluster.advertise'"),
        ('gateway = "http://gw:30000"\nadvertise = "http://u:p@a:1"', "'cluster.advertise'"),
        ('gateway = "http://gw:30000"\nadvertise = "http://0.0.0.0:8000"', "'cluster.advertise'"),
        ('gateway = 3\nadvertise = "http://a:1"', "'cluster.gateway'"),
        ('gateway = "http://gw:1"\nadvertise = "http://a:1"\nlabels = { zone = 1 }', "'cluster.labels.zone'"),
        ('gateway = "http://gw:1"\nadvertise = "http://a:1"\nlabels = { gpud_node = "x" }', "'cluster.labels.gpud_node'"),
        ('gateway = "http://gw:1"\nadvertise = "http://a:1"\nlabels = "zone=a"', "'cluster.labels'"),
        ('gateway = "http://gw:1"\nadvertise = "http://a:1"\nsync_sec = 0', "'cluster.sync_sec'"),
        ('gateway = "http://gw:1"\nadvertise = "http://a:1"\nsync_sec = -1', "'cluster.sync_sec'"),
        ('gateway = "http://gw:1"\nadvertise = "http://a:1"\nsync_sec = inf', "'cluster.sync_sec'"),
        ('gateway = "http://gw:1"\nadvertise = "http://a:1"\nsync_sec = "10s"', "'cluster.sync_sec'"),
        ('gateway = "http://gw:1"\nadvertise = "http://a:1"\nhealth_interval_sec = 0', "'cluster.health_interval_sec'"),
        ('gateway = "http://gw:1"\nadvertise = "http://a:1"\nhealth_failures = 1.5', "'cluster.health_failures'"),
        ('gateway = "http://gw:1"\nadvertise = "http://a:1"\napi_key = " "', "'cluster.api_key'"),
        ('gateway = "http://gw:1"\nadvertise = "http://a:1"\ngatway = "x"', "'cluster.gatway'"),
    ],
)
def test_bad_input_names_the_key_and_the_file(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(InvalidInput) as err:
        load(tmp_path, f"[cluster]\n{text}\n")
    assert key in err.value.message and str(tmp_path / "gpud.toml") in err.value.message


def test_the_daemon_refuses_to_start_with_exit_2(short_tmp: Path) -> None:
    config = short_tmp / "gpud.toml"
    config.write_text('[cluster]\ngateway = "http://127.0.0.1:1"\n')
    out = subprocess.run(
        [sys.executable, "-m", "gpud", "daemon", "--config", str(config), "--gpus", "sim:1x8GiB",
         "--socket", str(short_tmp / "s"), "--state-dir", str(short_tmp / "st"), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=30,
    )
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "'cluster.advertise'" in lines[0] and str(config) in lines[0]
    assert not (short_tmp / "s").exists() and not (short_tmp / "st").exists()  # nothing was started


@pytest.mark.parametrize(
    ("advertise", "listen", "warned"),
    [
        ("http://10.0.0.5:8000", "127.0.0.1", True),
        ("http://node1:8000", "localhost", True),
        ("http://10.0.0.5:8000", "0.0.0.0", False),
        ("http://10.0.0.5:8000", "10.0.0.5", False),
        ("http://127.0.0.1:8000", "127.0.0.1", False),  # one machine, as in the tests
        ("http://[::1]:8000", "::1", False),
    ],
)
def test_a_proxy_on_loopback_behind_a_remote_advertise_is_warned_about(advertise: str, listen: str,
                                                                       warned: bool) -> None:
    cluster = ClusterSettings(gateway="http://gw:30000", advertise=advertise)
    warning = reachability_warning(cluster, listen)
    assert (warning is not None) is warned
    if warning:
        assert advertise in warning and "[proxy] listen" in warning
    assert reachability_warning(ClusterSettings(advertise=advertise), listen) is None  # no gateway, no cluster
