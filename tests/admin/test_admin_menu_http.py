"""The admin menu at the PC over HTTP (issue 17), fetched by real curl from lab PCs: the student menu
shows only the room's current snapshot; the admin menu needs an admin's credentials (bare 401 without,
late 401 and a growing lock-out with wrong ones, no password in the log or boot events); its action
links (one-time, bound to the PC) promote and roll back the room, which changes what a second PC's
menu boots; the audit names the admin and the PC."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from netns import Lab  # noqa: E402
from support import BootdProcess, have, small_lab_files, state_rows  # noqa: E402

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0 or not have("curl") or shutil.which("qemu-storage-daemon") is None,
                                 reason="needs root, curl and qemu-storage-daemon")]

PASSWORD = "Tr0ub4dor&3-lab"
WRONG = "not-the-password-42"
DELAY = 0.5  # menu.admin_failure_delay
LOCK = 1.0  # menu.admin_lockout: the first lock-out, seconds


class Env:
    lab: Lab
    bootd: BootdProcess
    pc01: object
    pc02: object

    @property
    def base(self) -> str:
        return f"http://{self.lab.server_ip}:8080"

    def curl(self, client, url: str, *args: str, user: str | None = None) -> tuple[int, str, dict[str, str]]:
        """(status, body, headers) of a GET from `client`; `user` as curl's -u NAME:PASSWORD."""
        argv = ["curl", "-sS", "--max-time", "30", "-D", "/dev/stderr", *args]
        if user is not None:
            argv += ["-u", user]
        r = client.ns.run([*argv, url], check=False, text=True)
        lines = [line.strip() for line in r.stderr.splitlines() if line.strip()]
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]) if v}
        return status, r.stdout, headers


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env()
    e.lab = Lab()
    try:
        e.pc01 = e.lab.add_client(address="10.77.0.21")
        e.pc02 = e.lab.add_client(address="10.77.0.22")
        e.pc03 = e.lab.add_client(address="10.77.0.23")  # in no host list: an unknown PC
        wd = tmp_path_factory.mktemp("bootd-admin")
        disk = small_lab_files(wd)
        config = {
            "interfaces": [{"name": "br0", "address": f"{e.lab.server_ip}/24"}],
            "http": {"port": 8080},
            "tftp": {"enabled": False},
            "dhcp": {"mode": "off"},
            "storage": {"directory": str(wd / "storage"), "min_free_mb": 1},
            "menu": {"title": "Lab", "timeout": 5, "admin_failure_delay": DELAY, "admin_lockout": LOCK},
            "images": [{"name": "deb", "title": "Debian", "disk": str(disk)},
                       {"name": "win", "title": "Windows", "disk": str(disk)}],
            "groups": [{"name": "room1", "images": ["deb", "win"], "default_image": "deb"}],
            "hosts": [{"mac": e.pc01.mac, "name": "pc01", "group": "room1"},
                      {"mac": e.pc02.mac, "name": "pc02", "group": "room1"}],
        }
        e.bootd = BootdProcess(wd, config, ns=e.lab.server)
        e.bootd.start()
        deadline = time.monotonic() + 60
        while len(e.bootd.api.get("/api/v1/images")["images"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        draft = e.bootd.api.post("/api/v1/snapshots/deb@v1/draft", {"actor": "t"})
        e.bootd.api.post(f"/api/v1/snapshots/{draft['id']}/seal", {"actor": "t", "note": "office suite"})
        e.bootd.bootctl("admin", "add", "alice", "--password-stdin", input=PASSWORD + "\n", check=True)
        e.bootd.bootctl("admin", "add", "victor", "--role", "viewer", "--password-stdin", input=PASSWORD + "\n",
                        check=True)
        yield e
    finally:
        if getattr(e, "bootd", None) is not None:
            e.bootd.close()
        e.lab.close()


def student_menu(env, pc) -> str:
    status, body, _ = env.curl(pc, f"{env.base}/boot/{pc.mac}.ipxe")
    assert status == 200, body
    return body


def admin_url(env, pc) -> str:
    return f"{env.base}/boot/admin/{pc.mac}.ipxe"


def admin_menu(env, pc) -> str:
    status, body, _ = env.curl(pc, admin_url(env, pc), user=f"alice:{PASSWORD}")
    assert status == 200, body
    return body


def action_url(menu: str, title: str) -> str:
    """The action link of the menu item titled `title` (after its confirmation menu, if any), as curl
    takes it: the ${username}/${password} user part that iPXE fills in is dropped."""
    key = re.search(rf"^item (a\d+) {re.escape(title)}$", menu, re.M)
    assert key, f"no item {title!r} in:\n{menu}"
    body = re.search(rf"^:{key.group(1)}\n(.*?)(?=^:|\Z)", menu, re.M | re.S).group(1)
    url = re.search(r"chain --replace (\S+) \|\| goto failed", body).group(1)
    assert url.startswith("http://${username:uristring}:${password:uristring}@")
    if "?note=" in url:  # the seal link: iPXE appends the note typed at `read note`
        assert url.endswith("?note=${note:uristring}") and "read note" in body
        url = url.split("?", 1)[0]
    return "http://" + url.split("@", 1)[1]


def default_title(menu: str) -> str:
    default = re.search(r"choose --default (\S+)", menu).group(1)
    return re.search(rf"^item {re.escape(default)} (.*)$", menu, re.M).group(1)


def test_student_menu_shows_only_the_current_snapshot_and_the_admin_entry(env):
    menu = student_menu(env, env.pc02)
    items = re.findall(r"^item (\S+) (.*)$", menu, re.M)
    assert [k for k, _ in items if k != "--gap"] == ["deb", "local", "bootd-admin"], menu
    assert default_title(menu) == "Debian (v1)"
    assert "Windows" not in menu and "v2" not in menu and "previous" not in menu
    assert PASSWORD not in menu


def test_admin_menu_without_credentials_is_a_bare_401(env):
    status, body, headers = env.curl(env.pc01, admin_url(env, env.pc01))
    assert status == 401 and body == ""
    assert headers["www-authenticate"].startswith("Basic")
    # another PC cannot even ask for this PC's admin menu
    status, _, _ = env.curl(env.pc02, admin_url(env, env.pc01), user=f"alice:{PASSWORD}")
    assert status == 403


def test_a_viewer_account_cannot_open_the_admin_menu(env):
    """issue 18: viewers only read the dashboard; the menu at the PC is all actions."""
    status, body, _ = env.curl(env.pc01, admin_url(env, env.pc01), user=f"victor:{PASSWORD}")
    assert status == 401 and body == ""
    assert "victor is a viewer account" in env.bootd.log()


def test_wrong_passwords_are_delayed_and_the_lockout_grows(env):
    pc = env.pc02
    for _ in range(4):
        status, body, _ = env.curl(pc, admin_url(env, pc), "-w", "%{time_total}", user=f"alice:{WRONG}")
        assert status == 401 and float(body) >= DELAY * 0.9  # answered late; the body is curl's timing only
    status, _, _ = env.curl(pc, admin_url(env, pc), user=f"alice:{WRONG}")  # the fifth: locked for LOCK s
    assert status == 401
    status, _, _ = env.curl(pc, admin_url(env, pc), user=f"alice:{PASSWORD}")  # locked: not even checked
    assert status == 401
    time.sleep(LOCK + 0.2)
    status, _, _ = env.curl(pc, admin_url(env, pc), user=f"alice:{WRONG}")  # the sixth: locked for 2 LOCK
    assert status == 401
    log = env.bootd.log()
    locks = [float(x) for x in re.findall(r"refused: wrong password for account alice \(\d+ failures from this PC, "
                                          r"locked for (\d+) s\)", log)]
    assert locks[-2:] == [round(LOCK), round(2 * LOCK)], log[-3000:]
    assert "locked for" in log and f"{pc.mac}" in log
    time.sleep(2 * LOCK + 0.2)
    assert admin_menu(env, pc)  # the right password works once the lock is over, and clears the count
    assert WRONG not in log and PASSWORD not in log


def test_promote_and_rollback_from_the_menu_change_the_second_pcs_boot(env):
    menu = admin_menu(env, env.pc01)
    assert PASSWORD not in menu and "alice" in menu
    assert re.search(r"^item a\d+ Boot once: deb v2 \[sealed\] \d+\w ago: office suite$", menu, re.M), menu
    assert re.search(r"^item a\d+ Boot once: deb v1 \[boots now, room current\]", menu, re.M), menu
    promote = action_url(menu, "Promote deb v2 for room room1")
    body = re.search(r"^:(a\d+)\nmenu Make deb v2 what all of room1 boots\?\n", menu, re.M)
    assert body, "a room-wide change asks for confirmation first"
    status, result, _ = env.curl(env.pc01, promote, user=f"alice:{PASSWORD}")
    assert status == 200 and "echo bootd: room room1 now boots deb@v2" in result, result
    assert f"/boot/admin/{env.pc01.mac}.ipxe" in result and "prompt" in result
    assert default_title(student_menu(env, env.pc02)) == "Debian (v2)"

    # the same link again does nothing
    status, again, _ = env.curl(env.pc01, promote, user=f"alice:{PASSWORD}")
    assert status == 200 and "used up or expired: nothing done" in again

    # a link made for pc01, replayed by pc02 under its own MAC: nothing done
    menu = admin_menu(env, env.pc01)
    rollback = action_url(menu, "Roll room room1 back one step (deb)")
    foreign = rollback.replace(f"/boot/admin/{env.pc01.mac}/", f"/boot/admin/{env.pc02.mac}/")
    status, replay, _ = env.curl(env.pc02, foreign, user=f"alice:{PASSWORD}")
    assert status == 200 and "nothing done" in replay
    assert default_title(student_menu(env, env.pc02)) == "Debian (v2)"
    # ... and without credentials the link is a bare 401
    status, body, _ = env.curl(env.pc01, rollback)
    assert status == 401 and body == ""

    status, result, _ = env.curl(env.pc01, rollback, user=f"alice:{PASSWORD}")
    assert status == 200 and "echo bootd: room room1 rolled back: now deb@v1" in result, result
    assert default_title(student_menu(env, env.pc02)) == "Debian (v1)"

    history = json.dumps(env.bootd.api.get("/api/v1/images/deb/history"))
    assert "alice at pc01" in history and "promote" in history and "rollback" in history


def test_refusals_come_back_as_one_line_and_links_survive_a_reload(env):
    menu = admin_menu(env, env.pc01)
    rollback = action_url(menu, "Roll room room1 back one step (deb)")
    # a reload with a new HTTP timeout builds a new HTTP app: the link shown before is still open
    config = dict(env.bootd.config_dict, http={**env.bootd.config_dict["http"], "idle_timeout": 31})
    env.bootd.write_config(config)
    env.bootd.bootctl("reload", check=True)
    status, result, _ = env.curl(env.pc01, rollback, user=f"alice:{PASSWORD}")
    assert status == 200 and re.search(r"^echo bootd: refused: nothing to roll back", result, re.M), result


def do(env, pc, title: str, query: str = "") -> str:
    """Pick `title` in a fresh admin menu of `pc` (confirmed, if it asks): the result script."""
    status, result, _ = env.curl(pc, action_url(admin_menu(env, pc), title) + query, user=f"alice:{PASSWORD}")
    assert status == 200, result
    return result


def test_pin_unpin_maintenance_and_seal_with_a_typed_note(env):
    pc = env.pc02
    assert "echo bootd: this PC now boots deb@v2" in do(env, pc, "Pin this PC to deb v2")
    assert default_title(student_menu(env, pc)) == "Debian (v2, pinned)"
    assert default_title(student_menu(env, env.pc01)) == "Debian (v1)"  # the room is unchanged
    assert "follows room room1 again" in do(env, pc, "Unpin this PC (deb)")
    assert default_title(student_menu(env, pc)) == "Debian (v1)"

    result = do(env, pc, "Start maintenance: new writable draft of deb@v1")
    draft = re.search(r"this PC boots deb@(draft-\d+) \(writable\)", result).group(1)
    assert default_title(student_menu(env, pc)) == f"Debian ({draft}, maintenance (writable))"
    seal = f"Seal deb {draft} with a note typed here"
    assert "refused: a sealed snapshot needs a note" in do(env, pc, seal, "?note=")
    result = do(env, pc, seal, "?note=installed%20gimp%202.10")
    version = re.search(r"echo bootd: sealed deb@(v\d+): installed gimp 2\.10", result).group(1)
    snaps = {s["name"]: s for s in env.bootd.api.get("/api/v1/snapshots?image=deb")["snapshots"]}
    assert snaps[f"deb@{version}"]["note"] == "installed gimp 2.10"
    assert "alice at pc02" in snaps[f"deb@{version}"]["sealed_by"]
    assert default_title(student_menu(env, pc)) == "Debian (v1)"  # maintenance ended with the seal


def test_boot_once_boots_the_chosen_snapshot_and_changes_nothing(env):
    pc = env.pc02
    v2 = next(s for s in env.bootd.api.get("/api/v1/snapshots?image=deb")["snapshots"] if s["name"] == "deb@v2")
    menu = admin_menu(env, pc)
    title = re.search(r"^item a\d+ (Boot once: deb v2 .*)$", menu, re.M).group(1)
    status, script, _ = env.curl(pc, action_url(menu, title), user=f"alice:{PASSWORD}")
    assert status == 200 and f"bootd.snapshot={v2['id']}" in script and "choose" not in script
    export = re.search(r"bootd\.nbd=\S+/(\S+)", script).group(1)
    disk = next(d for d in env.bootd.api.get(f"/api/v1/disks/{pc.mac}")["disks"] if d["export"] == export)
    assert disk["snapshot"] == "deb@v2"
    assert default_title(student_menu(env, pc)) == "Debian (v1)"  # the next boot is the usual one


def test_an_unknown_pc_is_adopted_into_a_room_from_its_menu(env):
    pc = env.pc03
    student_menu(env, pc)  # bootd has seen it boot
    assert "echo bootd: adopted as pc-" in do(env, pc, "Adopt this PC into room room1")
    hosts = env.bootd.api.get("/api/v1/host-registry")["hosts"]
    assert any(h["mac"] == pc.mac and h["group"] == "room1" and h["source"] == "registered" for h in hosts)
    assert "Adopt" not in admin_menu(env, pc)


def test_no_password_in_the_log_or_the_boot_events(env):
    rows = state_rows(env.bootd.storage / "state.db", "SELECT kind, detail FROM boot_events")
    details = [json.loads(d) for kind, d in rows if kind == "admin"]
    assert any(d.get("admin") == "alice" and d.get("action") == "promote" for d in details)
    assert any(d.get("outcome") == "login refused" for d in details)
    events = json.dumps(rows)
    for secret in (PASSWORD, WRONG):
        assert secret not in events and secret not in env.bootd.log()
