"""Issue 17's done-when on real firmware: a QEMU PC (SeaBIOS + iPXE ROM) shows students only the room's
current snapshot; an admin logs in at the PC by keystrokes over QMP (a wrong password first: refused),
promotes v2 for the room from the admin menu, and the next boot of a second PC of the room is v2; the
admin rolls the room back from the menu and the second PC boots v1; the audit names the admin and the
PC; bootd's log has no password."""
from __future__ import annotations

import time

import pytest
from harness import lab_config, running_bootd_lab

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

ADMIN_PC, OTHER_PC = "52:54:00:77:0a:01", "52:54:00:77:0a:02"
PASSWORD = "labadmin2026"  # letters and digits: each one QEMU key code
WRONG = "guess1234"


def type_text(pc, text: str) -> None:
    pc.send_keys(*list(text), gap=0.15)


def login(pc, name: str, password: str) -> None:
    """From the student menu: the last item (Admin), then iPXE's login form."""
    pc.send_keys("end", "ret")
    assert pc.serial.wait_for(r"Password", 30, alive=pc.running), pc.serial.text()[-2000:]
    time.sleep(0.5)
    type_text(pc, name)
    pc.send_keys("ret")
    type_text(pc, password)
    pc.send_keys("ret")


def pick(pc, downs: int, confirm: bool) -> None:
    """In the admin menu: the first item, `downs` items further (gaps are skipped), then yes if asked."""
    time.sleep(1.0)
    pc.send_keys("home", *["down"] * downs, "ret")
    if confirm:
        time.sleep(1.0)
        pc.send_keys("down", "ret")


def boot_other(bl, name: str):
    pc = bl.pc(name, mac=OTHER_PC).start()
    assert pc.serial.wait_for(r"bootd lab: pc-other", 120, alive=pc.running), pc.serial.text()[-2000:]
    time.sleep(1.0)
    pc.send_keys("ret")  # the default, without waiting for the timeout
    return pc.wait(timeout=180)


@pytest.mark.timeout(900)
def test_admin_promotes_and_rolls_back_the_room_at_the_pc(assets, pc_logs):
    hosts = [{"mac": ADMIN_PC, "name": "pc-admin", "group": "lab"},
             {"mac": OTHER_PC, "name": "pc-other", "group": "lab"}]
    menu = {"timeout": 120, "title": "bootd lab", "admin_failure_delay": 1}  # students see the default view
    with running_bootd_lab(pc_logs, lambda lab: lab_config(lab, images={"demo": assets.image_a}, hosts=hosts,
                                                           menu=menu), assets) as bl:
        bl.new_snapshot_from("demo", "demo@v1", assets.image_b, "marker B")
        bl.daemon.bootctl("admin", "add", "alice", "--password-stdin", input=PASSWORD + "\n", check=True)

        pc = bl.pc("pc-admin", mac=ADMIN_PC).start()
        assert pc.serial.wait_for(r"Admin \(login\)", 120, alive=pc.running), pc.serial.text()[-2000:]
        student = pc.serial.text() + pc.serial.partial
        assert "demo test OS (v1)" in student and "(v2" not in student and "previous" not in student

        login(pc, "alice", WRONG)
        assert pc.serial.wait_for(r"login refused", 60, alive=pc.running), pc.serial.text()[-2000:]
        time.sleep(0.5)
        pc.send_keys("ret")  # "Press any key": back to the student menu
        time.sleep(2.0)
        login(pc, "alice", PASSWORD)
        assert pc.serial.wait_for(r"bootd admin alice: pc-admin", 60, alive=pc.running), pc.serial.text()[-3000:]

        # a1 boot once v2, a2 boot once v1, a3 pin v2, a4 pin v1, a5 promote v2 (confirmed), a6 rollback
        pick(pc, 4, confirm=True)
        assert pc.serial.wait_for(r"room lab now boots demo@v2", 60, alive=pc.running), pc.serial.text()[-3000:]
        r = boot_other(bl, "pc-other-1")
        assert r.ok and r.marker == "B" and "demo test OS (v2)" in r.log, r.describe()

        time.sleep(0.5)
        pc.send_keys("ret")  # back to the admin menu, now: ..., a5 promote v1, a6 rollback
        pick(pc, 5, confirm=True)
        assert pc.serial.wait_for(r"rolled back: now demo@v1", 60, alive=pc.running), pc.serial.text()[-3000:]
        r = boot_other(bl, "pc-other-2")
        assert r.ok and r.marker == "A" and "demo test OS (v1)" in r.log, r.describe()

        history = str(bl.daemon.api.get("/api/v1/images/demo/history"))
        assert "alice at pc-admin" in history
        log = bl.daemon.log()
        assert "wrong password for account alice" in log and PASSWORD not in log and WRONG not in log


MAINT_PC = "52:54:00:77:0a:03"


def admin_session(bl, name: str):
    """Switch on the maintenance PC and log in as alice at its student menu: the admin menu is shown."""
    pc = bl.pc(name, mac=MAINT_PC).start()
    assert pc.serial.wait_for(r"Admin \(login\)", 120, alive=pc.running), pc.serial.text()[-2000:]
    time.sleep(1.0)
    login(pc, "alice", PASSWORD)
    assert pc.serial.wait_for(r"bootd admin alice: pc-maint", 60, alive=pc.running), pc.serial.text()[-3000:]
    return pc


@pytest.mark.timeout(900)
def test_maintenance_started_and_sealed_at_the_pc(assets, pc_logs):
    hosts = [{"mac": MAINT_PC, "name": "pc-maint", "group": "lab"}]
    menu = {"timeout": 120, "title": "bootd lab"}
    with running_bootd_lab(pc_logs, lambda lab: lab_config(lab, images={"demo": assets.image_a}, hosts=hosts,
                                                           menu=menu), assets) as bl:
        bl.daemon.bootctl("admin", "add", "alice", "--password-stdin", input=PASSWORD + "\n", check=True)
        pc = admin_session(bl, "pc-maint-1")
        # a1 boot once v1, a2 pin v1, a3 roll back, a4 start maintenance
        pick(pc, 3, confirm=False)
        m = pc.serial.wait_for(r"this PC boots demo@(draft-\d+) \(writable\)", 60, alive=pc.running)
        assert m, pc.serial.text()[-3000:]
        draft = m.group(1)
        time.sleep(0.5)
        pc.send_keys("ret")  # the prompt: back to the admin menu
        time.sleep(2.0)
        pc.send_keys("ret")  # its default: back to the student menu, whose default is now the draft
        assert pc.serial.wait_for(rf"demo test OS \({draft}, maintenance", 60, alive=pc.running), \
            pc.serial.text()[-3000:]
        time.sleep(1.0)
        pc.send_keys("ret")
        r = pc.wait(timeout=240)
        assert r.ok and r.marker == "A" and r.fresh is True, r.describe()  # it wrote its file on the draft

        pc = admin_session(bl, "pc-maint-2")
        # a1 boot once the draft, a2 boot once v1, a3 pin v1, a4 roll back, a5 seal the draft
        pick(pc, 4, confirm=False)
        assert pc.serial.wait_for(r"Note for the sealed snapshot", 30, alive=pc.running), pc.serial.text()[-3000:]
        time.sleep(0.5)
        type_text(pc, "installed")
        pc.send_keys("ret")
        assert pc.serial.wait_for(r"sealed demo@v2: installed", 60, alive=pc.running), pc.serial.text()[-3000:]
        pc.kill()
        snaps = {s["name"]: s for s in bl.daemon.api.get("/api/v1/snapshots?image=demo")["snapshots"]}
        assert snaps["demo@v2"]["note"] == "installed" and "alice at pc-maint" in snaps["demo@v2"]["sealed_by"]

        # the sealed snapshot has the file the draft's boot wrote: a boot of it is not fresh
        bl.bootctl("snapshot", "promote", "demo@v2", "--group", "lab")
        pc = bl.pc("pc-maint-3", mac=MAINT_PC).start()
        assert pc.serial.wait_for(r"demo test OS \(v2\)", 120, alive=pc.running), pc.serial.text()[-2000:]
        time.sleep(1.0)
        pc.send_keys("ret")
        r = pc.wait(timeout=240)
        assert r.ok and r.marker == "A" and r.fresh is False, r.describe()
