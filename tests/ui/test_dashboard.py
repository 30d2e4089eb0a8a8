"""The web dashboard in a real browser (issue 18): Debian's chromium driven by Playwright from an admin's
desk in the lab network, against a real bootd serving HTTPS on `ui.listen`.

Lab PCs (client namespaces) fetch their menu, kernel and initrd over HTTP while the Rooms page is open:
their tiles go booting -> up live (server-sent events, no reload). Promote and rollback are clicked in the
Images page and change what a PC's menu boots; the audit names the dashboard user. A viewer sees no
action and its forged POST is a 403; a POST without the CSRF token is a 403; the lock-out locks. Every
page is screenshotted at 1280x800 and 390 px wide (test-artifacts/dashboard/), has no console error, and
axe-core finds no serious or critical violation.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from browser import ConsoleWatch, axe, have_chromium, launch, save_json, shot  # noqa: E402
from netns import Lab  # noqa: E402
from support import BootdProcess, have, small_lab_files  # noqa: E402

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0 or not have("curl") or not have_chromium()
                                 or shutil.which("qemu-storage-daemon") is None,
                                 reason="needs root, curl, chromium and qemu-storage-daemon")]

PASSWORD = "Tr0ub4dor&3-lab"
VIEWER_PASSWORD = "only-looking-99"
LOCK = 2.0  # menu.admin_lockout: the first lock-out, seconds
PAGES = ["rooms", "images", "audit", "server"]


class Env:
    lab: Lab
    bootd: BootdProcess

    @property
    def ui(self) -> str:
        return f"https://{self.lab.server_ip}:8443"

    def curl(self, client, url: str, *args: str) -> tuple[int, str]:
        r = client.ns.run(["curl", "-sk", "--max-time", "20", "-o", "/dev/stdout", "-w", "\n%{http_code}", *args, url],
                          check=False, text=True)
        body, _, status = r.stdout.rpartition("\n")
        return int(status or 0), body

    def boot(self, pc) -> None:
        """What a PC does: its iPXE fetches the menu (a fresh disk), kernel and initrd over HTTP, then its
        Linux opens the NBD disk and keeps it open (libnbd from the PC's namespace, until the next boot)."""
        base = f"http://{self.lab.server_ip}:8080"
        old = self.disk_holders.pop(pc.mac, None)
        if old is not None:  # the PC reboots: its old disk connection goes
            old.kill()
            old.wait()
        for path in (f"/boot/{pc.mac}.ipxe", "/boot/files/vmlinuz", "/boot/files/initrd.img"):
            status, body = self.curl(pc, base + path)
            assert status == 200, (path, status, body[:300])
            time.sleep(0.7)  # a PC takes a moment between steps; the page shows each
        uri = next(d["uri"] for d in self.bootd.api.get(f"/api/v1/disks/{pc.mac}")["disks"] if d["main"])
        hold = f"import nbd, time; h = nbd.NBD(); h.connect_uri({uri!r}); h.pread(4096, 0); time.sleep(600)"
        self.disk_holders[pc.mac] = pc.ns.popen([sys.executable, "-c", hold], stdout=subprocess.DEVNULL)

    def default_of(self, pc) -> str:
        """The snapshot version the PC's menu boots by default now ("v1", "v2")."""
        status, body = self.curl(pc, f"http://{self.lab.server_ip}:8080/boot/{pc.mac}.ipxe")
        assert status == 200, body
        default = re.search(r"choose --default (\S+)", body).group(1)
        title = re.search(rf"^item {re.escape(default)} (.*)$", body, re.M).group(1)
        return re.search(r"\((v\d+)", title).group(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env()
    e.lab = Lab()
    e.disk_holders = {}
    try:
        e.desk = e.lab.add_client(address="10.77.0.50")  # the admin's browser
        e.hall = e.lab.add_client(address="10.77.0.51")  # someone guessing passwords
        e.pc01 = e.lab.add_client(address="10.77.0.21")
        e.pc02 = e.lab.add_client(address="10.77.0.22")
        wd = tmp_path_factory.mktemp("bootd-ui")
        e.tmp = wd
        disk = small_lab_files(wd, 300_000, 200_000)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        f"/CN={e.lab.server_ip}", "-addext", f"subjectAltName=IP:{e.lab.server_ip}",
                        "-keyout", str(wd / "ui.key"), "-out", str(wd / "ui.crt")], check=True, capture_output=True)
        config = {
            "interfaces": [{"name": "br0", "address": f"{e.lab.server_ip}/24"}],
            "http": {"port": 8080},
            "tftp": {"enabled": False},
            "dhcp": {"mode": "off"},
            "ui": {"listen": f"{e.lab.server_ip}:8443", "tls_cert": str(wd / "ui.crt"), "tls_key": str(wd / "ui.key")},
            "storage": {"directory": str(wd / "storage"), "min_free_mb": 1},
            "menu": {"title": "Lab", "timeout": 5, "admin_failure_delay": 0.2, "admin_lockout_after": 3,
                     "admin_lockout": LOCK},
            "images": [{"name": "deb", "title": "Debian", "disk": str(disk)}],
            "groups": [{"name": "room1", "images": ["deb"], "default_image": "deb"}],
            "hosts": [{"mac": e.pc01.mac, "name": "pc01", "group": "room1", "ip": "10.77.0.21"},
                      {"mac": e.pc02.mac, "name": "pc02", "group": "room1", "ip": "10.77.0.22"}],
        }
        e.bootd = BootdProcess(wd, config, ns=e.lab.server)
        e.bootd.start()
        deadline = time.monotonic() + 60
        while not e.bootd.api.get("/api/v1/images")["images"] and time.monotonic() < deadline:
            time.sleep(0.2)
        draft = e.bootd.api.post("/api/v1/snapshots/deb@v1/draft", {"actor": "t"})
        e.bootd.api.post(f"/api/v1/snapshots/{draft['id']}/seal", {"actor": "t", "note": "office suite"})
        e.bootd.bootctl("admin", "add", "alice", "--password-stdin", input=PASSWORD + "\n", check=True)
        e.bootd.bootctl("admin", "add", "victor", "--role", "viewer", "--password-stdin",
                        input=VIEWER_PASSWORD + "\n", check=True)
        from playwright.sync_api import sync_playwright
        e.pw = sync_playwright().start()
        e.browser = launch(e.pw, e.desk.ns.name, wd)
        yield e
    finally:
        if getattr(e, "browser", None) is not None:
            e.browser.close()
        if getattr(e, "pw", None) is not None:
            e.pw.stop()
        if getattr(e, "bootd", None) is not None:
            e.bootd.close()
        e.lab.close()


def login(env, name: str, password: str, width: int = 1280, height: int = 800):
    ctx = env.browser.new_context(ignore_https_errors=True, viewport={"width": width, "height": height})
    page = ctx.new_page()
    page.console_watch = ConsoleWatch(page)
    page.goto(f"{env.ui}/ui/rooms")
    assert page.url.startswith(f"{env.ui}/ui/login?next=")  # not logged in: the login page, then back
    page.fill("#name", name)
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{env.ui}/ui/rooms")
    return page


def csrf_of(page) -> str:
    return page.get_attribute('meta[name="csrf-token"]', "content")


def fetch(page, method: str, url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """A request made by the page's own JavaScript (a forged one, when the test says so): the browser
    sends its cookies, as it would for an attacker's script. (Playwright's page.request would run in the
    test's process, outside the lab's network namespace.)"""
    return tuple(page.evaluate("""async ([method, url, body, headers]) => {
        const r = await fetch(url, {method, headers: {"Content-Type": "application/json", ...headers},
                                    body: body === null ? undefined : JSON.stringify(body)});
        let data = {}; try { data = await r.json(); } catch (e) {}
        return [r.status, data]; }""", [method, url, body, headers or {}]))


def test_tiles_go_booting_then_up_live_while_pcs_boot(env):
    page = login(env, "alice", PASSWORD)
    tile = f'.tile[data-mac="{env.pc01.mac}"]'
    assert page.get_attribute(tile, "data-state") == "off"
    page.wait_for_selector("#live-state:has-text('connected')")
    page.evaluate("window.__no_reload = true")  # gone if the page reloads: the tiles must change in place
    env.boot(env.pc01)
    page.wait_for_selector(f'{tile}[data-state="up"]', timeout=15000)
    assert page.evaluate("window.__no_reload") is True
    text = page.inner_text(tile)
    assert "pc01" in text and "deb@v1" in text, text
    assert page.inner_text('section[data-room="room1"] [data-count="up"]') == "1 up"
    shot(page, "rooms-1280x800")
    page.click(tile)
    page.wait_for_url(re.compile(r".*/ui/pc/.*"))
    assert page.locator("figure.timeline rect.bar").count() >= 3  # menu, kernel, initrd at least
    labels = page.inner_text("figure.timeline")
    assert "kernel vmlinuz" in labels and "initrd initrd.img" in labels and "293.0 KiB" in labels, labels
    shot(page, "pc-1280x800")
    assert not page.console_watch.errors, page.console_watch.errors
    page.context.close()


def test_the_stream_shows_the_booting_step(env):
    """The SSE stream itself (read with curl from the desk): a full picture, then pc02 booting at its step."""
    page = login(env, "alice", PASSWORD)
    cookie = next(c["value"] for c in page.context.cookies() if c["name"] == "bootd_session")
    page.context.close()
    out = env.tmp / "events.txt"
    proc = env.desk.ns.popen(["curl", "-skN", "--max-time", "8", "-H", f"Cookie: bootd_session={cookie}",
                              f"{env.ui}/ui/events"], stdout=open(out, "w"), stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    status, _ = env.curl(env.pc02, f"http://{env.lab.server_ip}:8080/boot/{env.pc02.mac}.ipxe")
    assert status == 200
    proc.wait(timeout=15)
    events = [json.loads(line[6:]) for line in out.read_text().splitlines() if line.startswith("data: ")]
    assert len(events) >= 2, out.read_text()
    assert {t["mac"] for t in events[0]} >= {env.pc01.mac, env.pc02.mac}  # the full picture first
    later = [t for batch in events[1:] for t in batch if t["mac"] == env.pc02.mac]
    assert later and later[-1]["state"] == "booting" and later[-1]["step"] == "script", later
    assert later[-1]["snapshot"] == "deb@v1"


def test_promote_and_rollback_from_the_images_page(env):
    page = login(env, "alice", PASSWORD)
    page.on("dialog", lambda d: d.accept())
    page.goto(f"{env.ui}/ui/images")
    row = page.locator('tr[data-snapshot="deb@v2"]')
    assert "office suite" in row.inner_text()
    shot(page, "images-1280x800")
    row.locator("form[data-api$='/promote'] select").select_option("room1")
    row.locator("form[data-api$='/promote'] button").click()
    page.wait_for_selector("#status:has-text('done')")
    assert env.default_of(env.pc01) == "v2"
    page.wait_for_load_state("load")
    time.sleep(1)  # the page reloads itself after "done"
    assert "boots in room1" in page.locator('tr[data-snapshot="deb@v2"]').inner_text()

    # the PC boots again and its tile shows v2
    page.goto(f"{env.ui}/ui/rooms")
    page.wait_for_selector("#live-state:has-text('connected')")
    env.boot(env.pc01)
    page.wait_for_selector(f'.tile[data-mac="{env.pc01.mac}"]:has-text("deb@v2")', timeout=15000)

    page.goto(f"{env.ui}/ui/images")
    page.locator("form[data-api='/api/v1/images/deb/rollback'] select").select_option("room1")
    page.locator("form[data-api='/api/v1/images/deb/rollback'] button").click()
    page.wait_for_selector("#status:has-text('done')")
    assert env.default_of(env.pc01) == "v1"
    page.goto(f"{env.ui}/ui/rooms")
    page.wait_for_selector("#live-state:has-text('connected')")
    env.boot(env.pc01)
    page.wait_for_selector(f'.tile[data-mac="{env.pc01.mac}"]:has-text("deb@v1")', timeout=15000)

    # a refusal shows the API's reason in the page: promoting to a room that does not exist
    page.goto(f"{env.ui}/ui/images")
    page.evaluate("""() => {
        const s = document.querySelector('tr[data-snapshot="deb@v2"] form[data-api$="/promote"] select');
        s.add(new Option('no-such-room')); s.value = 'no-such-room'; }""")
    page.locator('tr[data-snapshot="deb@v2"] form[data-api$="/promote"] button').click()
    page.wait_for_selector("#status.bad")
    assert "no-such-room" in page.inner_text("#status"), page.inner_text("#status")
    assert page.console_watch.errors == [  # chromium logs the refused fetch itself; nothing else went wrong
        "console: Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    page.console_watch.errors.clear()

    # the audit names the dashboard user, and filters
    page.goto(f"{env.ui}/ui/audit?action=promote")
    text = page.inner_text("table.audit")
    assert "alice (dashboard, via 10.77.0.50)" in text and "promote" in text and "rollback" not in text, text
    page.goto(f"{env.ui}/ui/audit?actor=alice")
    text = page.inner_text("table.audit")
    assert "rollback" in text and "promote" in text and "seal" not in text, text  # seal was by "t"
    shot(page, "audit-1280x800")
    assert not page.console_watch.errors, page.console_watch.errors
    page.context.close()


def test_draft_seal_flatten_and_delete_from_the_images_page(env):
    """An image's update in the page: draft on v2, seal with a note (v3), flatten v3 with its progress bar,
    then delete it, the page first showing what goes."""
    page = login(env, "alice", PASSWORD)
    messages: list[str] = []
    page.on("dialog", lambda d: (messages.append(d.message), d.accept()))
    page.goto(f"{env.ui}/ui/images")
    page.locator("tr[data-snapshot='deb@v2'] form[data-api$='/draft'] button").click()
    page.wait_for_selector("tr.snap-draft")
    draft = page.locator("tr.snap-draft")
    assert "draft" in draft.inner_text()
    draft.locator("input[name=note]").fill("from the page")
    draft.locator("form[data-api$='/seal'] button").click()
    page.wait_for_selector("tr[data-snapshot='deb@v3']")
    v3 = page.locator("tr[data-snapshot='deb@v3']")
    assert "from the page" in v3.inner_text() and "alice (dashboard, via 10.77.0.50)" in v3.inner_text()
    assert v3.locator("td").nth(4).inner_text() == "3"  # chain depth: v1 <- v2 <- v3
    v3.locator("form[data-api$='/flatten'] button").click()
    page.wait_for_selector("#status progress, #status:has-text('done')")
    page.wait_for_selector("tr[data-snapshot='deb@v3'] >> text=from the page")
    page.wait_for_function("""() => { const r = document.querySelector("tr[data-snapshot='deb@v3']");
                                      return r && r.querySelectorAll('td')[4].textContent.trim() === '1'; }""",
                           timeout=60_000)
    assert any("Flatten deb@v3" in m for m in messages), messages
    page.locator("tr[data-snapshot='deb@v3'] form[data-method='DELETE'] button").click()
    page.wait_for_selector("tr[data-snapshot='deb@v3']", state="detached")
    assert any(m.startswith("This will remove:") and "deb@v3" in m for m in messages), messages
    assert not page.console_watch.errors, page.console_watch.errors
    page.context.close()


def test_pc_page_actions_test_and_end_test(env):
    page = login(env, "alice", PASSWORD)
    page.on("dialog", lambda d: d.accept())
    page.goto(f"{env.ui}/ui/pc/pc02")
    page.select_option("#test-snap", "deb@v2")
    page.click("form[data-api$='/test'] button")
    page.wait_for_selector("#status:has-text('done')")
    assert env.default_of(env.pc02) == "v2" and env.default_of(env.pc01) == "v1"
    page.wait_for_selector("form[data-api='/api/v1/images/deb/end-test'] button")
    page.click("form[data-api='/api/v1/images/deb/end-test'] button")
    page.wait_for_selector("#status:has-text('done')")
    assert env.default_of(env.pc02) == "v1"
    # the disk reset shows what it would remove first (dry run), then resets
    page.goto(f"{env.ui}/ui/pc/pc02")
    messages = []
    page.remove_listener("dialog", page.listeners("dialog")[0]) if hasattr(page, "listeners") else None
    page.on("dialog", lambda d: (messages.append(d.message), d.accept()))
    page.click("form[data-api$='/reset'] button")
    page.wait_for_selector("#status:has-text('done')")
    assert any("This will remove" in m for m in messages), messages
    assert not page.console_watch.errors, page.console_watch.errors
    page.context.close()


def test_viewer_sees_no_actions_and_its_forged_post_is_refused(env):
    page = login(env, "victor", VIEWER_PASSWORD)
    for name in PAGES + ["pc/pc01"]:
        page.goto(f"{env.ui}/ui/{name}")
        assert page.locator("form.act").count() == 0, name
        assert "victor (viewer)" in page.inner_text("header")
    token = csrf_of(page)
    status, data = fetch(page, "POST", "/api/v1/snapshots/deb@v2/promote", {"group": "room1"}, {"X-CSRF-Token": token})
    assert status == 403 and "viewer" in data["error"], (status, data)
    assert env.default_of(env.pc01) == "v1"  # nothing changed
    assert fetch(page, "GET", "/api/v1/hosts")[0] == 200  # reading is allowed
    page.context.close()


def test_changes_without_the_csrf_token_are_refused(env):
    page = login(env, "alice", PASSWORD)
    url = "/api/v1/snapshots/deb@v2/promote"
    status, data = fetch(page, "POST", url, {"group": "room1"})
    assert status == 403 and "CSRF" in data["error"], (status, data)
    assert fetch(page, "POST", url, {"group": "room1"}, {"X-CSRF-Token": "forged"})[0] == 403
    # another site's page cannot make the browser send the cookie (SameSite=Strict) nor pass the Origin check
    cookie = next(c["value"] for c in page.context.cookies() if c["name"] == "bootd_session")
    status, body = env.curl(env.desk, f"{env.ui}{url}", "-X", "POST", "-H", f"Cookie: bootd_session={cookie}",
                            "-H", f"X-CSRF-Token: {csrf_of(page)}", "-H", "Origin: https://evil.example",
                            "-H", "Content-Type: application/json", "-d", '{"group": "room1"}')
    assert status == 403 and "cross-origin" in body, body
    assert env.default_of(env.pc01) == "v1"
    # the logout form carries the token; afterwards the cookie is worthless
    page.click("header button[type=submit]")
    page.wait_for_url(re.compile(r".*/ui/login$"))
    status, body = env.curl(env.desk, f"{env.ui}/api/v1/hosts", "-H", f"Cookie: bootd_session={cookie}")
    assert status == 401, body
    page.context.close()


def test_the_lockout_locks_and_the_session_cookie_is_strict(env):
    from playwright.sync_api import sync_playwright  # noqa: F401  (the module's Playwright serves both browsers)
    hall = launch(env.pw, env.hall.ns.name, env.tmp)
    try:
        ctx = hall.new_context(ignore_https_errors=True)
        page = ctx.new_page()
        for i in range(3):
            page.goto(f"{env.ui}/ui/login")
            page.fill("#name", "alice")
            page.fill("#password", f"guess-{i}-wrong")
            page.click("button[type=submit]")
            page.wait_for_selector("p.error")
        assert "locked" in page.inner_text("p.error"), page.inner_text("p.error")
        page.goto(f"{env.ui}/ui/login")  # locked: even the right password is not checked
        page.fill("#name", "alice")
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("p.error")
        assert "locked" in page.inner_text("p.error")
        shot(page, "login-locked")
        time.sleep(LOCK + 0.5)
        page.goto(f"{env.ui}/ui/login")
        page.fill("#name", "alice")
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{env.ui}/ui/rooms")
        cookie = next(c for c in ctx.cookies() if c["name"] == "bootd_session")
        assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict", cookie
        assert PASSWORD not in env.bootd.log()
    finally:
        hall.close()


def test_every_page_at_desk_and_phone_size_without_console_errors_or_serious_axe_findings(env):
    report = {}
    for width, height, tag in ((1280, 800, "1280x800"), (390, 844, "390px")):
        page = login(env, "alice", PASSWORD, width, height)
        for name in PAGES + ["pc/pc01"]:
            page.goto(f"{env.ui}/ui/{name}")
            page.wait_for_load_state("load")
            slug = name.replace("/", "-")
            shot(page, f"{slug}-{tag}")
            overflow = page.evaluate("document.documentElement.scrollWidth")
            assert overflow <= width + 1, f"{name} at {tag}: {overflow} px wide"
            if tag == "1280x800":
                found = axe(page)
                report[name] = found
                serious = [v for v in found if v["impact"] in ("serious", "critical")]
                assert not serious, (name, serious)
        assert not page.console_watch.errors, (tag, page.console_watch.errors)
        page.context.close()
    save_json("axe.json", report)


def test_removing_an_account_ends_its_logins(env):
    page = login(env, "victor", VIEWER_PASSWORD)
    env.bootd.bootctl("admin", "remove", "victor", "--yes", check=True)
    page.goto(f"{env.ui}/ui/images")
    assert "/ui/login" in page.url
    assert fetch(page, "GET", "/api/v1/hosts")[0] == 401
    page.context.close()
    env.bootd.bootctl("admin", "add", "victor", "--role", "viewer", "--password-stdin",
                      input=VIEWER_PASSWORD + "\n", check=True)


def test_surfaces_stay_apart_and_the_api_is_described(env):
    pc = env.pc01
    status, body = env.curl(pc, f"{env.ui}/api/v1/status")
    assert status == 401 and "log in" in body  # the dashboard's API needs its login
    status, _ = env.curl(pc, f"{env.ui}/boot/files/vmlinuz")
    assert status == 404  # boot files are not on the dashboard's listener
    status, _ = env.curl(pc, f"{env.ui}/metrics")
    assert status == 404
    status, _ = env.curl(pc, f"http://{env.lab.server_ip}:8080/ui/login")
    assert status == 404  # nor is the dashboard on the boot port
    status, _ = env.curl(pc, f"http://{env.lab.server_ip}:8443/ui/login")
    assert status == 0 or status >= 400  # plain HTTP on the TLS port is no page
    doc = env.bootd.api.get("/api/v1/openapi.json")
    from openapi_spec_validator import validate
    validate(doc)
    for path in ("/api/v1/hosts", "/api/v1/audit", "/api/v1/metrics/history", "/api/v1/snapshots/{ref}/promote",
                 "/api/v1/admins/{name}", "/api/v1/openapi.json"):
        assert path in doc["paths"], path
    assert doc["paths"]["/api/v1/admins/{name}"]["patch"]["summary"]
    audit = env.bootd.api.get("/api/v1/audit?action=promote&actor=dashboard")["audit"]
    assert audit and all(r["action"] == "promote" and "dashboard" in r["actor"] for r in audit)
