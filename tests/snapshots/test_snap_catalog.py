"""The menu seam reads the store on every call: a promote, rollback, test or pin changes the next menu."""
from __future__ import annotations

from bootd.config import Config
from pxe.catalog import boot_host
from snapshots.catalog import SnapshotCatalog

PC1, PC2, PC3 = "52:54:00:00:02:01", "52:54:00:00:02:02", "52:54:00:00:02:03"


def cfg() -> Config:
    return Config.model_validate({
        "images": [{"name": "deb", "title": "Debian 12", "kernel": "deb/vmlinuz", "initrd": "deb/initrd.img",
                    "cmdline": "quiet"},
                   {"name": "tools", "kernel": "t/vmlinuz", "initrd": "t/initrd"}],
        "groups": [{"name": "lab1", "images": ["deb", "tools"], "default_image": "deb"}],
        "hosts": [{"mac": PC1, "name": "pc1", "group": "lab1"}, {"mac": PC2, "name": "pc2", "group": "lab1"}],
    })


def menu(store, config, mac):
    return [(e.key, e.title, e.version, e.default, e.previous)
            for e in SnapshotCatalog(store, config).entries_for(boot_host(config, mac))]


def test_catalog_follows_every_change(store, raw_disk):
    config = cfg()
    # nothing in the store yet: config entries without a disk
    assert menu(store, config, PC1) == [("deb", "Debian 12", None, True, False),
                                        ("tools", "tools", None, False, False)]
    store.import_image("deb", str(raw_disk), "t")
    for note in ("v2", "v3"):
        d = store.draft("deb", "t")
        store.seal(d.id, note, "t")
    store.promote("deb@v1", None, "t")
    assert menu(store, config, PC1)[0] == ("deb", "Debian 12 (v1)", "deb@v1", True, False)
    store.promote("deb@v2", "lab1", "t")
    assert menu(store, config, PC1)[:2] == [("deb", "Debian 12 (v2)", "deb@v2", True, False),
                                            ("deb-prev", "Debian 12 (previous: v1)", "deb@v1", False, True)]
    # an unknown PC (no group) follows the all-groups current and sees every config image
    assert menu(store, config, PC3)[0] == ("deb", "Debian 12 (v1)", "deb@v1", True, False)
    store.promote("deb@v3", "lab1", "t")
    assert menu(store, config, PC2)[:2] == [("deb", "Debian 12 (v3)", "deb@v3", True, False),
                                            ("deb-prev", "Debian 12 (previous: v2)", "deb@v2", False, True)]
    store.rollback("deb", "lab1", "t")
    assert menu(store, config, PC2)[:2] == [("deb", "Debian 12 (v2)", "deb@v2", True, False),
                                            ("deb-prev", "Debian 12 (previous: v1)", "deb@v1", False, True)]
    store.test("deb@v3", PC1, "t")
    assert menu(store, config, PC1)[:2] == [("deb", "Debian 12 (v3, test)", "deb@v3", True, False),
                                            ("deb-prev", "Debian 12 (previous: v2)", "deb@v2", False, True)]
    store.pin("deb@v1", PC1, "t")
    assert menu(store, config, PC1)[0] == ("deb", "Debian 12 (v1, pinned)", "deb@v1", True, False)
    assert menu(store, config, PC2)[0][2] == "deb@v2"
    entry = SnapshotCatalog(store, config).entries_for(boot_host(config, PC1))[0]
    assert (entry.kernel, entry.initrd, entry.cmdline) == ("deb/vmlinuz", "deb/initrd.img", "quiet")
    assert entry.snapshot_id == store.resolve("deb@v1").id
    d = store.draft("deb@v3", "t", host=PC2)
    assert menu(store, config, PC2)[0] == ("deb", f"Debian 12 (draft-{d.id}, maintenance (writable))",
                                           d.name, True, False)
    store.seal(d.id, "done", "t")       # sealing ends the maintenance boot
    assert menu(store, config, PC2)[0][2] == "deb@v2"
