"""One boot decision (bootd/bootplan.py): the menu, the NBD disk manager, the snapshot store's resolvers,
the client configs and DHCP's loader choice all say what the host's boot plan says.

Everything here is real: the snapshot store with qcow2 files, a DiskManager driving qemu-storage-daemon
on a loopback port (tests/nbd/nbdtest.py), the Booter, the client-config resolver and the DHCP policy.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bootd.config import parse_config
from bootd.daemon import Context
from bootd.state import open_state
from pxe.booter import Booter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nbd"))
from nbdtest import Harness  # noqa: E402  (tests/nbd is no package: `nbd` is libnbd's module)
from pgserver import fresh_state_url  # noqa: E402

import snapshots.store as snapstore  # noqa: E402

PC = "52:54:00:00:0b:01"
NBD_WORD = re.compile(r"bootd\.nbd=\S+/([A-Za-z0-9_-]+)")

# A room whose default image is `b`, and a PC that lists the room's images itself (`images: [a, b]`)
# without a default of its own. Its menu's default is the room's `b`; the disk manager used to take the
# first image of the host's own list, `a`.
DISAGREEMENT = f"""
interfaces:
  - {{name: br0, address: 127.0.0.1/8}}
menu: {{student_entries: [current, previous, images]}}
nbd: {{port: 10809}}
images:
  - {{name: a, kernel: vmlinuz, initrd: initrd.img}}
  - {{name: b, kernel: vmlinuz, initrd: initrd.img}}
groups:
  - name: room1
    images: [a, b]
    default_image: b
    clients:
      instances:
        - {{name: main, network: none}}
        - {{name: other, image: a, network: none}}
hosts:
  - {{mac: "{PC}", name: pc01, group: room1, images: [a, b]}}
"""


def nbd_name(cmdline: str) -> str | None:
    m = NBD_WORD.search(cmdline)
    return m.group(1) if m else None


@pytest.fixture
def lab(tmp_path):
    """A running DiskManager over a real snapshot store, wired like the daemon wires it."""
    from nbdexport.service import DiskService

    state = open_state(tmp_path / "state.db")
    hs = Harness(tmp_path)
    hs.store = state
    store = snapstore.SnapshotStore(state, tmp_path / "snapshots")
    ctx = Context(config=parse_config(DISAGREEMENT), config_path="test", store=state)
    ctx.snapshots = store
    ctx.booter = Booter(ctx)  # as the menus service sets it
    svc = DiskService()
    svc.ctx = ctx
    hs.snapshots = store
    hs.resolve = svc._resolve  # what the daemon gives the manager as resolve_snapshot
    try:
        hs.start()
        ctx.disks = hs.m
        yield ctx, hs, store, svc
    finally:
        hs.stop()


def test_host_image_list_over_group_default_gets_one_answer(lab):
    ctx, hs, store, svc = lab
    snaps = {name: store.create_image(name, "1M", "t") for name in ("a", "b")}
    for name in ("a", "b"):
        store.promote(f"{name}@v1", "room1", "t")

    # the menu: default entry `b`, its command line carries the boot's main disk
    menu = hs.run(ctx.booter.menu_for(PC, "127.0.0.1"))
    default = menu.item(menu.default)
    assert default.image == "b" and default.snapshot_id == snaps["b"].id
    main = hs.m.export_for(PC)
    assert main.snapshot_id == snaps["b"].id and nbd_name(default.cmdline) == main.name

    # the snapshot store's resolvers, for the menu default's image
    assert store.resolve_for_host(PC, "room1", default.image).id == default.snapshot_id
    assert store.boot_choice(PC, "room1", default.image)[0].id == default.snapshot_id

    # the client configs: the instance without an image boots the main disk, `other` the menu's `a`
    from bootd.clientconfig.resolve import render_for
    rendered = hs.run(render_for(ctx, PC))
    main_disk, other_disk = (d.uri.rsplit("/", 1)[1] for d in rendered.disks)
    assert main_disk == main.name
    assert other_disk == nbd_name(menu.item("a").cmdline) == hs.m.export_for(PC, snaps["a"].id).name

    # the disk manager choosing by itself (`bootctl disk boot pc01` names no snapshot)
    assert svc._resolve(PC).id == default.snapshot_id
    again = hs.run(hs.m.prepare_boot(PC))
    assert again.snapshot_id == default.snapshot_id, (again.snapshot_name, "menu default", default.version)


# -- the property: random configs and snapshot states, every consumer agrees with the plan ------------
IMAGES = ("a", "b", "c")
MACS = ("52:54:00:00:0c:01", "52:54:00:00:0c:02", "52:54:00:00:0c:03")
UNKNOWN = "52:54:00:00:0c:99"
GROUPS = ("g1", "g2")


@st.composite
def lab_configs(draw):
    images = draw(st.lists(st.sampled_from(IMAGES), min_size=1, max_size=3, unique=True))
    groups = []
    for name in draw(st.lists(st.sampled_from(GROUPS), max_size=2, unique=True)):
        imgs = draw(st.lists(st.sampled_from(images), max_size=3, unique=True))
        group = {"name": name, "images": imgs, "boot": draw(st.sampled_from(["ipxe", "pxelinux", "grub"])),
                 "persistent": draw(st.booleans()),
                 "clients": {"instances": [{"name": "main", "network": "none"}] + [
                     {"name": f"i{i}", "image": img, "network": "none"}
                     for i, img in enumerate(draw(st.lists(st.sampled_from(images), max_size=2)))]}}
        if imgs and draw(st.booleans()):
            group["default_image"] = draw(st.sampled_from(imgs))
        groups.append(group)
    hosts = []
    for i, mac in enumerate(MACS):
        host = {"mac": mac, "name": f"pc{i}"}
        if groups and draw(st.booleans()):
            host["group"] = draw(st.sampled_from([g["name"] for g in groups]))
        if draw(st.booleans()):
            host["images"] = draw(st.lists(st.sampled_from(images), max_size=3, unique=True))
        if draw(st.booleans()):
            host["default_image"] = draw(st.sampled_from(images))
        if draw(st.booleans()):
            host["boot"] = draw(st.sampled_from(["ipxe", "pxelinux", "grub"]))
        if draw(st.booleans()):
            host["persistent"] = draw(st.booleans())
        hosts.append(host)
    dhcp = {}
    if groups and draw(st.booleans()):  # unknown PCs boot this group
        dhcp["default_group"] = draw(st.sampled_from([g["name"] for g in groups]))
    return {"interfaces": [{"name": "br0", "address": "127.0.0.1/8"}], "dhcp": dhcp,
            "menu": {"previous_snapshot_entry": draw(st.booleans()), "local_disk_entry": draw(st.booleans())},
            "images": [{"name": n, "kernel": "vmlinuz", "initrd": "initrd.img"} for n in images],
            "groups": groups, "hosts": hosts}


@st.composite
def snapshot_ops(draw, images: list[str], groups: list[str]):
    """Admin actions on the store: mostly promotions (two to one target make a rollback stack, so a
    "previous" entry), some rollbacks, pins, tests and maintenance drafts, of images the config has."""
    image, version = st.sampled_from(images), st.integers(1, 3)
    target = st.sampled_from([None, *groups, "elsewhere"])
    host = st.sampled_from(MACS + (UNKNOWN,))
    return draw(st.lists(st.one_of(
        st.tuples(st.just("promote"), image, version, target),
        st.tuples(st.just("promote"), image, version, target),
        st.tuples(st.just("rollback"), image, target),
        st.tuples(st.just("pin"), image, version, host),
        st.tuples(st.just("test"), image, version, host),
        st.tuples(st.just("maintenance"), image, version, st.sampled_from(MACS)),
    ), max_size=10))


def make_state(store, images: list[str], versions: int, ops) -> None:
    """Images with `versions` sealed snapshots each, then promotes, rollbacks, pins, tests and
    maintenance drafts as drawn (refused ones, like a rollback with nothing to go back to, are skipped)."""
    from snapshots.errors import SnapshotError
    for name in images:
        store.create_image(name, "1M", "t")
        for _ in range(versions - 1):
            store.seal(store.draft(f"{name}@latest", "t").id, "next", "t")
    for op in ops:
        kind, image = op[0], op[1]
        try:
            if kind == "promote":
                store.promote(f"{image}@v{min(op[2], versions)}", op[3], "t")
            elif kind == "rollback":
                store.rollback(image, op[2], "t")
            elif kind in ("pin", "test"):
                getattr(store, kind)(f"{image}@v{min(op[2], versions)}", op[3], "t")
            else:
                store.draft(f"{image}@v{min(op[2], versions)}", "t", host=op[3])
        except SnapshotError:
            pass


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=lab_configs(), versions=st.integers(1, 3), data=st.data())
def test_every_consumer_agrees_with_the_plan(config, versions, data):
    from bootd.clientconfig.render import RenderError
    from bootd.clientconfig.resolve import disk_for
    from bootd.dhcp.leases import LeaseTable
    from bootd.dhcp.policy import DhcpPolicy
    from nbdexport.errors import DiskError
    from nbdexport.service import DiskService

    cfg = parse_config(yaml.safe_dump(config))
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        tmp_path = Path(tmp)
        if (url := fresh_state_url()) is not None:  # each example its own database, as its own directory
            mp.setenv("BOOTD_STATE_URL", url)
        state = open_state(tmp_path / "state.db")
        hs = Harness(tmp_path)
        hs.store = state
        try:
            store = snapstore.SnapshotStore(state, tmp_path / "snapshots")
            images = [i["name"] for i in config["images"]]
            make_state(store, images, versions,
                       data.draw(snapshot_ops(images, [g["name"] for g in config["groups"]]), label="ops"))
            ctx = Context(config=cfg, config_path="test", store=state)
            ctx.snapshots = store
            svc = DiskService()
            svc.ctx = ctx
            hs.snapshots, hs.resolve = store, svc._resolve
            hs.start()
            ctx.disks = hs.m
            dhcp = DhcpPolicy(cfg, LeaseTable(state))
            for mac in MACS + (UNKNOWN,):
                plan = ctx.planner.plan_for(mac)
                host = plan.settings
                event("main disk" if plan.disk.snapshot_id is not None else "no main disk")
                event(f"{len(plan.disk.extra)} extra disks; previous entries: {any(e.previous for e in plan.entries)}")
                for e in plan.entries:
                    if not e.previous:
                        event(f"entry: {store.boot_choice(mac, host.group, e.image)[1].split()[0]}")
                # the settings: DHCP's loader choice and the disk manager's persistence
                assert dhcp.boot_choice(mac) == host.boot
                assert svc._persistent(mac) == host.persistent
                # independent of the plan's code: the default image is the host's, else its group's, if
                # the host boots it, else its first image
                hc = cfg.host_by_mac(mac)
                group = cfg.group(hc.group if hc else cfg.dhcp.default_group)  # unknown: dhcp.default_group
                wanted = (hc and hc.default_image) or (group and group.default_image)
                assert host.default_image == (wanted if wanted in host.images else
                                              (host.images[0] if host.images else None))
                # the snapshot store's resolvers: each entry's snapshot
                for e in plan.entries:
                    if not e.previous:
                        snap = store.resolve_for_host(mac, host.group, e.image)
                        assert (snap.id if snap else None) == e.snapshot_id
                        assert store.boot_choice(mac, host.group, e.image)[0] == snap
                # the disk manager's own choice
                snap = svc._resolve(mac)
                assert (snap.id if snap else None) == plan.disk.snapshot_id
                if plan.default is not None:
                    assert plan.entry(plan.default).snapshot_id == plan.disk.snapshot_id
                # the menu: same entries, same snapshots, same default; the main disk under the default
                menu = hs.run(Booter(ctx).menu_for(mac, "127.0.0.1"))
                linux = [i for i in menu.items if i.kind == "linux"]
                assert [(i.key, i.image, i.snapshot_id, i.previous) for i in linux] == \
                       [(e.key, e.image, e.snapshot_id, e.previous) for e in plan.entries]
                assert menu.default == (plan.default or "local")
                main = hs.m.export_for(mac)
                if plan.disk.snapshot_id is None or not plan.entries:
                    assert main is None
                    assert all(nbd_name(i.cmdline) is None for i in linux)
                else:
                    assert main.snapshot_id == plan.disk.snapshot_id
                    assert nbd_name(menu.item(menu.default).cmdline) == main.name
                    for i in linux:  # every entry with a snapshot has that snapshot's disk
                        if i.snapshot_id is not None:
                            exp = hs.m.export_for(mac, i.snapshot_id)
                            assert exp is not None and exp.snapshot_id == i.snapshot_id
                            assert nbd_name(i.cmdline) in (exp.name, main.name)
                # the client configs: each instance's disk is its image's menu entry's (else the default's)
                clients = group.clients if group and hc else None
                for inst in (clients.instances if clients else []):
                    item = next((i for i in linux if i.image == inst.image and not i.previous), None) \
                        if inst.image else None
                    hidden = next((e for e in plan.hidden if e.image == inst.image and not e.previous
                                   and e.snapshot_id is not None), None) if inst.image else None
                    if item is None and hidden is not None and hidden.snapshot_id != plan.disk.snapshot_id:
                        # an image the students do not see: the instance still boots its own snapshot,
                        # an export added to the boot in progress (none without one: the menu had no disk)
                        if hs.m.export_for(mac) is None:
                            with pytest.raises((RenderError, DiskError)):
                                hs.run(disk_for(ctx, mac, inst))
                        else:
                            uri = hs.run(disk_for(ctx, mac, inst)).uri
                            assert uri.rsplit("/", 1)[1] == hs.m.export_for(mac, hidden.snapshot_id).name
                        continue
                    if item is None or item.snapshot_id is None:
                        item = menu.item(menu.default)
                    word = nbd_name(item.cmdline) if item.kind == "linux" else None
                    if word is None:
                        with pytest.raises((RenderError, DiskError)):
                            hs.run(disk_for(ctx, mac, inst))
                    else:
                        assert hs.run(disk_for(ctx, mac, inst)).uri.rsplit("/", 1)[1] == word
        finally:
            hs.stop()
