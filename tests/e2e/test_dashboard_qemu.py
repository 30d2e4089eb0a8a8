"""Issue 18's done-when with a real lab PC: an admin at the teacher's desk (chromium driven by Playwright,
in a namespace on the lab network) logs in to the dashboard and watches a QEMU PC (SeaBIOS + iPXE, TCG)
boot live on the Rooms page: its tile goes booting (with the current step) -> up with snapshot demo@v1,
without a page reload. The admin promotes v2 for the room in the Images page; the PC boots again and the
tile shows demo@v2 (the PC's disk says marker B); the admin rolls back in the page; the next boot is v1
again (marker A). Screenshots in test-artifacts/dashboard/ (rooms-booting, rooms-up).

The test client OS stays running with its NBD disk attached (bootd.stay=1), as a real OS does; each
"reboot" is a power-off of the QEMU process and a new start. Opt-in, ~2 min: BOOTD_DASHBOARD_TEST=1 or
`make test-dashboard`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import lab_config, running_bootd_lab

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ui"))
from browser import ConsoleWatch, have_chromium, launch, shot  # noqa: E402

pytestmark = [
    pytest.mark.qemu, pytest.mark.netns,
    pytest.mark.skipif(os.environ.get("BOOTD_DASHBOARD_TEST") != "1" or not have_chromium(),
                       reason="a QEMU PC boots three times under TCG (~2 min): BOOTD_DASHBOARD_TEST=1 or "
                              "make test-dashboard (needs chromium)"),
]

PC = "52:54:00:77:0d:01"
PASSWORD = "teacher-desk-2026"

# Every data-state the tile had, in order, recorded by the page itself (a MutationObserver on the tile)
WATCH_TILE = """mac => {
    window.__states = [document.querySelector(`.tile[data-mac="${mac}"]`).dataset.state];
    window.__steps = [];
    new MutationObserver(() => {
        const t = document.querySelector(`.tile[data-mac="${mac}"]`);
        if (window.__states[window.__states.length - 1] !== t.dataset.state) window.__states.push(t.dataset.state);
        const step = t.querySelector('.t-state').textContent;
        if (window.__steps[window.__steps.length - 1] !== step) window.__steps.push(step);
    }).observe(document.querySelector(`.tile[data-mac="${mac}"]`), {attributes: true, subtree: true,
                                                                      childList: true, characterData: true});
}"""


def boot_and_watch(bl, page, ui: str, name: str, expect_snapshot: str, expect_marker: str, shots: bool = False):
    """Power the PC on with the Rooms page open; return the tile's states and steps as the page saw them."""
    page.goto(f"{ui}/ui/rooms")
    page.wait_for_selector("#live-state:has-text('connected')")
    page.evaluate(WATCH_TILE, PC)
    page.evaluate("window.__no_reload = true")
    pc = bl.pc(name, mac=PC).start()
    tile = f'.tile[data-mac="{PC}"]'
    page.wait_for_selector(f'{tile}[data-state="booting"]', timeout=120_000)
    if shots:
        page.wait_for_selector(f'{tile}:has-text("kernel"), {tile}:has-text("initrd"), {tile}:has-text("disk")',
                               timeout=120_000)
        shot(page, "rooms-booting")
    assert pc.serial.wait_for(r"BOOTD-UP", 180, alive=pc.running), pc.serial.text()[-3000:]
    text = pc.serial.text() + pc.serial.partial
    assert f"BOOTD-MARKER: {expect_marker}" in text, text[-2000:]
    page.wait_for_selector(f'{tile}[data-state="up"]:has-text("{expect_snapshot}")', timeout=30_000)
    if shots:
        shot(page, "rooms-up")
    assert page.evaluate("window.__no_reload") is True  # live: no reload of the page
    states, steps = page.evaluate("[window.__states, window.__steps]")
    pc.kill()  # the PC is switched off
    return states, steps


@pytest.mark.timeout(900)
def test_watch_a_pc_boot_live_promote_and_roll_back_from_the_dashboard(assets, pc_logs, tmp_path):
    hosts = [{"mac": PC, "name": "pc-desk-view", "group": "lab"}]

    def config(lab):
        cfg = lab_config(lab, images={"demo": assets.image_a}, hosts=hosts)
        cfg["images"][0]["cmdline"] = "quiet bootd.stay=1"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        f"/CN={lab.server_ip}", "-addext", f"subjectAltName=IP:{lab.server_ip}",
                        "-keyout", str(tmp_path / "ui.key"), "-out", str(tmp_path / "ui.crt")],
                       check=True, capture_output=True)
        cfg["ui"] = {"listen": f"{lab.server_ip}:8443", "tls_cert": str(tmp_path / "ui.crt"),
                     "tls_key": str(tmp_path / "ui.key")}
        return cfg

    with running_bootd_lab(pc_logs, config, assets) as bl:
        bl.new_snapshot_from("demo", "demo@v1", assets.image_b, "marker B")
        bl.daemon.bootctl("admin", "add", "alice", "--password-stdin", input=PASSWORD + "\n", check=True)
        desk = bl.lab.add_client(address="10.77.0.60")
        ui = f"https://{bl.lab.server_ip}:8443"
        from playwright.sync_api import sync_playwright
        with sync_playwright() as pw:
            browser = launch(pw, desk.ns.name, tmp_path)
            try:
                page = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800}).new_page()
                console = ConsoleWatch(page)
                page.on("dialog", lambda d: d.accept())
                page.goto(f"{ui}/ui/login")
                page.fill("#name", "alice")
                page.fill("#password", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_url(f"{ui}/ui/rooms")

                states, steps = boot_and_watch(bl, page, ui, "pc-1", "demo@v1", "A", shots=True)
                assert states[0] in ("off", "booting") and states[-1] == "up" and "booting" in states, states
                # the steps on the way (the feed sends what changed each half second: DHCP and the iPXE script
                # of the ROM usually land in one tick)
                booting = [s for s in steps if s.startswith("booting · ")]
                assert len(booting) >= 2 and steps[-1] == "up", steps
                assert any(s.split(" · ")[1] in ("kernel", "initrd", "disk") for s in booting), steps

                page.goto(f"{ui}/ui/images")
                row = page.locator('tr[data-snapshot="demo@v2"]')
                row.locator("form[data-api$='/promote'] select").select_option("lab")
                row.locator("form[data-api$='/promote'] button").click()
                page.wait_for_selector("#status:has-text('done')")
                states, _ = boot_and_watch(bl, page, ui, "pc-2", "demo@v2", "B")
                assert states[-1] == "up", states

                page.goto(f"{ui}/ui/images")
                page.locator("form[data-api='/api/v1/images/demo/rollback'] select").select_option("lab")
                page.locator("form[data-api='/api/v1/images/demo/rollback'] button").click()
                page.wait_for_selector("#status:has-text('done')")
                boot_and_watch(bl, page, ui, "pc-3", "demo@v1", "A")

                page.goto(f"{ui}/ui/pc/{PC}")
                assert page.locator("figure.timeline rect.bar").count() >= 5  # dhcp, loader, script, kernel, initrd...
                shot(page, "pc-after-boot")
                page.goto(f"{ui}/ui/audit?actor=alice")
                audit = page.inner_text("table.audit")
                assert "promote" in audit and "rollback" in audit and "dashboard, via 10.77.0.60" in audit, audit
                assert not console.errors, console.errors
            finally:
                browser.close()
