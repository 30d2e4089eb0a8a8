"""The daemon's lifecycle against a real process: READY/WATCHDOG/STOPPING on a real NOTIFY_SOCKET,
SIGHUP with good and broken configs, SIGTERM within 5 s, bootctl against it, API errors."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ready_status_and_bootctl(bootd_daemon):
    d = bootd_daemon({"menu": {"timeout": 7}})
    assert d.notify.fields("READY=1")
    assert any(s.startswith("STATUS=") for s in d.notify.fields("STATUS="))
    r = d.bootctl("status", check=True)
    assert "bootd 0.1.0" in r.stdout and "services:" in r.stdout and "http" in r.stdout
    r = d.bootctl("status", "--json", check=True)
    st = json.loads(r.stdout)
    assert st["pid"] == d.proc.pid
    assert st["config_path"] == str(d.config_path)
    assert st["uptime"] >= 0


def test_watchdog_pings_at_half_the_interval(bootd_daemon):
    d = bootd_daemon({}, env={"WATCHDOG_USEC": "400000"})  # 0.4 s -> a ping every 0.2 s
    start = len(d.notify.fields("WATCHDOG=1"))
    time.sleep(1.3)
    pings = len(d.notify.fields("WATCHDOG=1")) - start
    assert 4 <= pings <= 9, pings


def test_no_watchdog_without_watchdog_usec(bootd_daemon):
    d = bootd_daemon({})
    time.sleep(0.5)
    assert d.notify.fields("WATCHDOG=1") == []


def test_sigterm_stops_cleanly_within_5s_and_says_stopping(bootd_daemon):
    d = bootd_daemon({})
    t0 = time.monotonic()
    rc = d.stop(timeout=10)
    elapsed = time.monotonic() - t0
    assert rc == 0
    assert elapsed < 5.0
    assert d.notify.fields("STOPPING=1")
    assert not Path(d.socket).exists(), "API socket left behind"


def test_sighup_with_broken_config_keeps_old_one(bootd_daemon):
    d = bootd_daemon({"menu": {"timeout": 7}})
    good = d.config_path.read_text()
    d.write_config(good + "hosts:\n  - mac: 'not-a-mac'\n    name: pc01\n")
    n = len(d.notify.messages)
    d.signal(signal.SIGHUP)
    assert d.notify.wait_for("READY=1", after=n, timeout=10)
    st = d.api.get("/api/v1/status")
    assert st["reload_errors"] and "hosts[0].mac: not a MAC address" in st["reload_errors"][0]
    assert "reload refused" in d.log() and "not a MAC address" in d.log()
    assert d.proc.poll() is None, "daemon died on a bad config"
    # The running config is the old one: the API still works, and a good file then applies.
    d.write_config(good.replace("timeout: 7", "timeout: 9"))
    n = len(d.notify.messages)
    d.signal(signal.SIGHUP)
    assert d.notify.wait_for("READY=1", after=n, timeout=10)
    st = d.api.get("/api/v1/status")
    assert st["reload_errors"] == [] and st["last_reload"]


def test_bootctl_reload_refused_and_applied(bootd_daemon):
    d = bootd_daemon({})
    good = d.config_path.read_text()
    d.write_config(good + "dhcp:\n  mode: sometimes\n")
    r = d.bootctl("reload")
    assert r.returncode == 1 and "dhcp.mode" in r.stdout
    d.write_config(good)
    assert d.bootctl("reload").returncode == 0


def test_bad_config_at_start_exits_1_with_errors(bootd_daemon):
    d = bootd_daemon({}, start=False)
    d.write_config("dhcp:\n  mode: sometimes\n")
    d.start(wait=False)
    assert d.proc.wait(timeout=20) == 1
    assert "bootd.yaml:2 dhcp.mode" in d.log()


def test_bootctl_when_not_running(tmp_path):
    r = subprocess.run([str(Path(sys.executable).parent / "bootctl"), "--socket", str(tmp_path / "none.sock"),
                        "status"], capture_output=True, text=True)
    assert r.returncode == 3 and "bootd is not running" in r.stderr


def test_api_errors_are_4xx_with_reason_and_daemon_keeps_serving(bootd_daemon):
    from bootd.cli.api_client import ApiError
    d = bootd_daemon({})
    with pytest.raises(ApiError) as ei:
        d.api.get("/api/v1/hosts/nosuchhost")
    assert ei.value.status == 404 and "no host" in str(ei.value)
    with pytest.raises(ApiError) as ei:
        d.api.get("/api/v1/hosts/nosuchhost?limit=abc")
    assert ei.value.status in (400, 404)
    with pytest.raises(ApiError) as ei:
        d.api.get("/api/v1/nothing-here")
    assert ei.value.status == 404
    assert d.api.get("/api/v1/status")["pid"] == d.proc.pid


def test_api_over_tcp_needs_the_token(bootd_daemon, tmp_path, netns):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    d = bootd_daemon({"api": {"tcp": "127.0.0.1:18081", "token_file": str(token)}}, ns=netns)
    probe = ("import sys,json,urllib.request as u\n"
             "req=u.Request('http://127.0.0.1:18081/api/v1/status',"
             " headers=dict(a.split('=',1) for a in sys.argv[1:]))\n"
             "try:\n print(u.urlopen(req).status)\nexcept Exception as e:\n print(getattr(e,'code',e))\n")
    r = netns.run([sys.executable, "-c", probe])
    assert r.stdout.strip() == "401"
    r = netns.run([sys.executable, "-c", probe, "Authorization=Bearer wrong"])
    assert r.stdout.strip() == "401"
    r = netns.run([sys.executable, "-c", probe, "Authorization=Bearer s3cret"])
    assert r.stdout.strip() == "200"
    # the Unix socket needs no token
    assert d.api.get("/api/v1/status")["pid"]
