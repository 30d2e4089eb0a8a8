"""Host state from boot events (bootd/hoststate.py summarize): the rules `bootctl hosts` and
`bootctl rooms` show, on event lists as the state store returns them (oldest first)."""
from __future__ import annotations

from bootd.hoststate import BOOTING_WINDOW, summarize

T0 = 1_000_000.0


def ev(t: float, kind: str, **detail) -> dict:
    return {"ts": T0 + t, "kind": kind, "detail": detail, "duration": None, "last_ts": None}


def test_no_events_is_off_unless_the_disk_is_connected():
    assert summarize([], now=T0).state == "off"
    assert summarize([], connected=True, now=T0).state == "up"


def test_kernel_and_initrd_fetched_is_up_with_the_boot_duration():
    events = [ev(0, "dhcp"), ev(1, "loader", outcome="complete"), ev(3, "kernel", status=200),
              ev(7.5, "initrd", status=200)]
    s = summarize(events, now=T0 + 10)
    assert (s.state, s.last_boot_duration, s.last_error) == ("up", 7.5, None)
    assert summarize(events[:3], now=T0 + 10).state == "booting"
    assert summarize(events[:3], now=T0 + 10 + BOOTING_WINDOW).state == "off"
    assert summarize(events, now=T0 + 10 + 3600, up_for=3600).state == "off"  # longer than its lease


def test_a_failure_is_failed_until_the_step_is_fetched():
    reason = "kernel vmlinuz-x: not found over HTTP"
    events = [ev(0, "dhcp"), ev(2, "failed", step="kernel", reason=reason)]
    s = summarize(events, now=T0 + 5)
    assert (s.state, s.last_error) == ("failed", reason)
    assert summarize(events, now=T0 + 5 + 10 * BOOTING_WINDOW).state == "failed"  # stays until it boots
    retried = events + [ev(30, "kernel", status=200)]
    assert summarize(retried, now=T0 + 31).state == "booting"
    up = retried + [ev(32, "initrd", status=200)]
    s = summarize(up, now=T0 + 33)
    assert s.state == "up" and s.last_error == reason  # the last error stays shown, the state moved on


def test_a_new_boot_after_a_failed_one_starts_afresh():
    events = [ev(0, "dhcp"), ev(2, "failed", step="kernel", reason="x"),
              ev(2 + 2 * BOOTING_WINDOW, "dhcp")]
    s = summarize(events, now=T0 + 3 + 2 * BOOTING_WINDOW)
    assert s.state == "booting" and s.boot_started == T0 + 2 + 2 * BOOTING_WINDOW


def test_a_disk_boot_is_up_only_while_connected():
    events = [ev(0, "dhcp"), ev(1, "disk", action="boot", snapshot="os-A@3"), ev(2, "kernel", status=200),
              ev(3, "initrd", status=200)]
    assert summarize(events, connected=True, now=T0 + 4).state == "up"
    assert summarize(events, connected=False, now=T0 + 4).state == "booting"
    assert summarize(events, connected=False, now=T0 + 4 + BOOTING_WINDOW).state == "off"
    assert summarize(events, now=T0 + 4).snapshot == "os-A@3"


def test_a_pc_switched_off_and_on_within_minutes_starts_a_new_boot():
    """issue 18 (the PC page's timeline, the tile's step): the firmware's DHCP for a boot file after the
    OS came up is a new boot; the OS's own DHCP (no boot file) is not."""
    from bootd.hoststate import latest_boot
    first = [ev(0, "dhcp", file="undionly.kpxe"), ev(1, "loader", path="undionly.kpxe"),
             ev(2, "dhcp", file="http://s/boot/x.ipxe"), ev(3, "script", path="/boot/x.ipxe"),
             ev(4, "kernel", status=200), ev(5, "initrd", status=200), ev(8, "dhcp")]
    assert latest_boot(first) == first  # the OS's DHCP belongs to the boot
    second = [ev(40, "dhcp", file="undionly.kpxe"), ev(41, "loader", path="undionly.kpxe")]
    assert latest_boot(first + second) == second
    s = summarize(first + second, now=T0 + 42)
    assert (s.state, s.step, s.boot_started) == ("booting", "loader ipxe", T0 + 40)
    assert s.last_boot_duration == 5.0  # the first boot's


def test_a_screen_that_did_not_come_up_is_failed_though_the_disk_is_connected():
    """issue 19: the client root reports its screen (POST /clients/<mac>/status -> a "client" event or a
    failed step "client"). Its OS runs and its disk is connected, yet the PC is of no use: failed, with
    why; its next report that the units started makes it up again. The boot's duration stays known."""
    booted = [ev(0, "dhcp"), ev(1, "disk", action="boot", snapshot="clientroot@2"), ev(2, "kernel", status=200),
              ev(3, "initrd", status=200)]
    reason = "the PC's screen did not come up: bootd-client.service failed (journalctl -u bootd-client)"
    broken = booted + [ev(40, "failed", step="client", reason=reason)]
    s = summarize(broken, connected=True, now=T0 + 41)
    assert (s.state, s.last_error, s.last_boot_duration) == ("failed", reason, 3.0)
    fixed = broken + [ev(50, "client", state="started", units=["qemuinstance1.service"])]
    assert summarize(fixed, connected=True, now=T0 + 51).state == "up"
    assert summarize(booted + [ev(40, "client", state="started")], connected=True, now=T0 + 41).state == "up"
