"""Snapshots carry their boot files (issue 15): a `kind: native` image's kernel and initramfs are read
from the snapshot's own /boot (libguestfs) at import and seal, served per snapshot, and the menu entry
of each snapshot boots its own, with the stock `root=/dev/nbd0 nbdroot=` words. Promote switches the
kernel, rollback brings the old one back, a restart keeps them, delete removes them. An image without a
kernel, or with several and no choice, is refused at import with nothing half-imported.

The images here are small ext4 file systems made with `mke2fs -d` whose /boot holds stand-in kernels
(their bytes name them); the real Debian system booting its own kernel is tests/e2e/test_real_os.py.
Each read of an image starts one libguestfs appliance (15-30 s under TCG).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support import have  # noqa: E402

from bootd.config import ConfigError, parse_config  # noqa: E402
from snapshots.bootfiles import (  # noqa: E402
    BootListing,
    KernelFound,
    NativeBoot,
    choose_kernel,
    kvm_usable,
    list_kernels,
)
from snapshots.errors import SnapshotError  # noqa: E402
from snapshots.store import SnapshotStore  # noqa: E402

R1, R2 = "6.1.0-1-amd64", "6.1.0-2-amd64"


def _need_guestfs() -> None:
    try:
        import guestfs  # noqa: F401
    except ImportError:
        pytest.fail("python3-guestfs is a dependency of native images (deps/runtime-packages.txt): not installed")
    if not have("mke2fs"):
        pytest.fail("mke2fs missing")


def make_os(path: Path, kernels: dict[str, bytes], initrds: tuple[str, ...] | None = None, marker: str = "A",
            link: str | None = None) -> Path:
    """A raw ext4 disk whose /boot has `kernels` (release -> bytes), an initramfs for each release in
    `initrds` (default: all), /marker, and /vmlinuz -> boot/vmlinuz-`link` like Debian's."""
    root = path.with_suffix(".d")
    (root / "boot").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "fstab").write_text("/dev/nbd0 / ext4 defaults 0 1\n")
    for release, data in kernels.items():
        (root / "boot" / f"vmlinuz-{release}").write_bytes(data)
    for release in kernels if initrds is None else initrds:
        (root / "boot" / f"initrd.img-{release}").write_bytes(b"initrd of " + release.encode())
    (root / "marker").write_text(marker)
    if link:
        (root / "vmlinuz").symlink_to(f"boot/vmlinuz-{link}")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(root), str(path), "32M"], check=True,
                   capture_output=True)
    return path


# ------------------------------------------------------------------------------------ choosing, no I/O
def _listing(releases: list[str], link: str | None = None, no_initrd: tuple[str, ...] = ()) -> BootListing:
    names = [f"vmlinuz-{r}" for r in releases] + [f"initrd.img-{r}" for r in releases if r not in no_initrd]
    return list_kernels(names + ["config-x", "System.map-x"], "/boot", f"boot/vmlinuz-{link}" if link else None)


def test_the_kernel_is_the_one_there_is_or_the_one_named():
    assert choose_kernel(_listing([R1]), None, "t") == KernelFound(R1, f"/boot/vmlinuz-{R1}",
                                                                   f"/boot/initrd.img-{R1}")
    assert choose_kernel(_listing([R1, R2]), R1, "t").release == R1
    # latest: the image's /vmlinuz link when it names one of them, else the highest release
    assert choose_kernel(_listing([R1, R2], link=R1), "latest", "t").release == R1
    assert choose_kernel(_listing(["6.1.0-9-amd64", "6.1.0-10-amd64"]), "latest", "t").release == "6.1.0-10-amd64"
    # other distributions' initramfs names
    fedora = list_kernels(["vmlinuz-6.5.6-300.fc39.x86_64", "initramfs-6.5.6-300.fc39.x86_64.img"], "", None)
    assert choose_kernel(fedora, None, "t").initrd == "/initramfs-6.5.6-300.fc39.x86_64.img"


def test_no_kernel_several_kernels_and_no_initramfs_say_what_to_do():
    with pytest.raises(SnapshotError, match=r"no kernel in the image's /boot .*install one .*kind: client"):
        choose_kernel(_listing([]), None, "import of x.img")
    with pytest.raises(SnapshotError) as e:
        choose_kernel(_listing([R1, R2], link=R2), None, "import of x.img")
    msg = str(e.value)
    assert f"2 kernels ({R1}, {R2})" in msg and "--kernel RELEASE" in msg and f"/vmlinuz link: {R2}" in msg
    assert "kernel_release:" in msg
    with pytest.raises(SnapshotError, match=rf"no kernel 5.10.0-9-amd64 .*it has: {R1}, {R2}"):
        choose_kernel(_listing([R1, R2]), "5.10.0-9-amd64", "t")
    with pytest.raises(SnapshotError, match=rf"kernel {R2} has no initramfs .*update-initramfs -c -k {R2}"):
        choose_kernel(_listing([R1, R2], no_initrd=(R2,)), R2, "t")


def test_config_says_which_kind_an_image_is():
    base = "images:\n  - name: deb\n"
    cfg = parse_config(base + "    kind: native\n    kernel_release: latest\n")
    assert cfg.images[0].kind == "native" and cfg.images[0].kernel_release == "latest"
    assert parse_config(base).images[0].kind == "client"
    with pytest.raises(ConfigError, match="kernel_release is for kind: native"):
        parse_config(base + "    kernel_release: 6.1.0-1-amd64\n")
    with pytest.raises(ConfigError, match="boots the kernel in its snapshot's /boot"):
        parse_config(base + "    kind: native\n    kernel: vmlinuz-6.1\n")
    with pytest.raises(ConfigError, match="kind"):
        parse_config(base + "    kind: windows\n")


# ------------------------------------------------------------------------------------ import refusals
def test_an_image_without_a_usable_kernel_is_refused_whole(state, tmp_path):
    """No kernel, or two and no choice: a clear error, and no image, layer file or boot file is left."""
    _need_guestfs()
    boot = tmp_path / "boot"
    store = SnapshotStore(state, tmp_path / "snapshots", boot_root=boot)
    store.boot_kind = lambda image: None if image == "plain" else NativeBoot(None)
    bare = make_os(tmp_path / "bare.raw", {})
    with pytest.raises(SnapshotError, match=r"import of bare.raw: no kernel in the image's /boot"):
        store.import_image("bare", str(bare), "tester")
    two = make_os(tmp_path / "two.raw", {R1: b"kernel one", R2: b"kernel two"})
    with pytest.raises(SnapshotError, match=rf"import of two.raw: the image's /boot has 2 kernels \({R1}, {R2}\)"):
        store.import_image("two", str(two), "tester")
    assert store.images() == []
    assert [p for p in (tmp_path / "snapshots").rglob("*") if p.is_file()] == []
    assert [p for p in boot.rglob("*") if p.is_file()] == [] and store.fsck().clean
    # --kernel on an image that boots the config's kernel is refused before anything is read
    with pytest.raises(SnapshotError, match="kind: client"):
        store.import_image("plain", str(two), "tester", kernel=R1)


# ------------------------------------------------------------------------------------ the admin's day
def _ipxe_entries(text: str) -> dict[str, tuple[str, str]]:
    """entry label -> (kernel URL, its command line) of an iPXE menu script."""
    out = {}
    for block in re.split(r"^:", text, flags=re.M)[1:]:
        label, _, body = block.partition("\n")
        m = re.search(r"^kernel (\S+)(.*)$", body, re.M)
        if m:
            out[label.strip()] = (m.group(1), m.group(2))
    return out


@pytest.mark.netns
def test_each_snapshot_boots_its_own_kernel_through_promote_rollback_restart_and_delete(lab, bootd_daemon,
                                                                                       tmp_path):
    _need_guestfs()
    pc = lab.add_client(address="10.77.0.31")
    disk_a = make_os(tmp_path / "a.raw", {R1: b"kernel one"}, marker="A")
    config = {
        "interfaces": [{"name": "br0", "address": f"{lab.server_ip}/24"}],
        "dhcp": {"mode": "off"},
        "images": [{"name": "deb", "kind": "native", "disk": str(disk_a)}],
        "groups": [{"name": "room1", "images": ["deb"], "default_image": "deb",
                    "student_entries": ["current", "previous"]}],
        "hosts": [{"mac": pc.mac, "name": "pc01", "group": "room1"}],
    }
    d = bootd_daemon(config, ns=lab.server)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        snaps = d.api.get("/api/v1/snapshots")["snapshots"]
        if snaps and snaps[0]["state"] == "sealed":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"deb was not imported: {d.api.get('/api/v1/snapshot-jobs')}\n{d.log()[-3000:]}")
    v1 = snaps[0]
    assert v1["kernel_release"] == R1

    base = f"http://{lab.server_ip}:8080"

    def fetch(url: str) -> bytes:
        return subprocess.run(["ip", "netns", "exec", pc.ns.name, "curl", "-sSf", url], capture_output=True,
                              check=True, timeout=30).stdout

    def menu() -> dict[str, tuple[str, str]]:
        text = fetch(f"{base}/boot/{pc.mac}.ipxe").decode()
        entries = _ipxe_entries(text)
        return entries

    def booted_kernel(entry: str = "deb") -> tuple[bytes, str]:
        url, cmdline = menu()[entry]
        return fetch(url if url.startswith("http") else f"{base}/boot/{url}"), cmdline

    kernel, cmdline = booted_kernel()
    assert kernel == b"kernel one"
    assert f"/snapshots/deb/{v1['id']}/vmlinuz" in menu()["deb"][0]
    token = re.search(r"bootd\.nbd=(\S+)", cmdline).group(1)
    assert f"root=/dev/nbd0 nbdroot={token} ip=dhcp" in cmdline  # Debian's nbd-client hook mounts this export
    # TFTP serves the same file (loaders that fetch over TFTP)
    tftp = subprocess.run(["ip", "netns", "exec", pc.ns.name, "curl", "-sSf",
                           f"tftp://{lab.server_ip}/snapshots/deb/{v1['id']}/vmlinuz"], capture_output=True,
                          timeout=30)
    assert tftp.stdout == b"kernel one", tftp.stderr

    # an update installs a second kernel (Debian keeps the old one and points /vmlinuz at the new)
    draft = d.bootctl("snapshot", "draft", "deb@v1", "--json", check=True)
    draft_snap = json.loads(draft.stdout)
    disk_b = make_os(tmp_path / "b.raw", {R1: b"kernel one", R2: b"kernel two"}, marker="B", link=R2)
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(disk_b), draft_snap["path"]],
                   check=True, capture_output=True)
    r = d.bootctl("snapshot", "seal", draft_snap["name"], "-n", "kernel update")
    assert r.returncode != 0 and f"2 kernels ({R1}, {R2})" in r.stderr and "--kernel" in r.stderr, r.stderr
    assert d.api.get(f"/api/v1/snapshots/{draft_snap['id']}")["state"] == "draft"  # still a draft, nothing lost
    r = d.bootctl("snapshot", "seal", draft_snap["name"], "-n", "kernel update", "--kernel", "latest", check=True)
    assert f"boots kernel {R2}" in r.stdout
    v2 = d.api.get(f"/api/v1/snapshots/{draft_snap['id']}")
    assert v2["name"] == "deb@v2" and v2["kernel_release"] == R2

    d.bootctl("snapshot", "promote", "deb@v2", "--group", "room1", check=True)
    kernel, cmdline = booted_kernel()
    assert kernel == b"kernel two" and "bootd.snapshot=%d" % v2["id"] in cmdline
    prev = [k for k in menu() if k != "deb" and k.startswith("deb")]
    assert prev and booted_kernel(prev[0])[0] == b"kernel one"  # the previous entry boots the previous kernel

    d.bootctl("snapshot", "rollback", "deb", "--group", "room1", check=True)
    assert booted_kernel()[0] == b"kernel one"

    d.stop()
    d.start()
    assert booted_kernel()[0] == b"kernel one"  # a restart changes nothing (its fsck keeps the kernels)

    # the old kernel of v2 goes with v2
    v2_dir = d.storage / "boot" / "snapshots" / "deb" / str(v2["id"])
    assert (v2_dir / "vmlinuz").read_bytes() == b"kernel two"
    d.bootctl("snapshot", "delete", "deb@v2", "--yes", check=True)
    assert not v2_dir.exists()
    assert booted_kernel()[0] == b"kernel one"


def test_the_appliance_tries_kvm_only_where_the_cpu_can_virtualise(tmp_path):
    """A /dev/kvm without vmx/svm in the CPU's flags (a paravirtualised host such as this one) boots
    nothing: the appliance's kernel spins there instead of failing, so it is never tried (TCG at once)."""
    cpu = tmp_path / "cpuinfo"
    cpu.write_text("processor\t: 0\nflags\t\t: fpu vme de pse sse2 hypervisor\n")
    assert not kvm_usable(str(cpu), "/dev/null")
    cpu.write_text("processor\t: 0\nflags\t\t: fpu vme de pse vmx sse2\n")
    assert kvm_usable(str(cpu), "/dev/null")
    assert not kvm_usable(str(cpu), str(tmp_path / "no-such-device"))
