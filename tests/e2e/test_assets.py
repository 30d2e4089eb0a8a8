"""The client assets (scripts/build-assets.sh) boot: Debian kernel + busybox initramfs under QEMU get an
address, attach their NBD disk from the kernel command line and report its marker and freshness.

Peers only (dnsmasq for DHCP, qemu-nbd for the disk), so a failure here is the assets', not bootd's.
"""
from __future__ import annotations

import subprocess

import pytest
from harness import LabPC, ensure_assets, start_dnsmasq, start_qemu_nbd


@pytest.fixture(scope="module")
def assets():
    return ensure_assets()


def _debugfs_cat(image, path: str, tmp_path) -> str:
    raw = tmp_path / (image.stem + ".raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True)
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True, text=True, check=True)
    return r.stdout


def test_images_carry_different_markers(assets, tmp_path):
    assert _debugfs_cat(assets.image_a, "/marker", tmp_path).strip() == "A"
    assert _debugfs_cat(assets.image_b, "/marker", tmp_path).strip() == "B"


def test_initrd_has_modules_and_nbd_client(assets):
    listing = subprocess.run(f"zcat {assets.initrd} | cpio -t --quiet", shell=True, capture_output=True,
                             text=True, check=True).stdout.split()
    for need in ("init", "sbin/nbd-client", "lib64/ld-linux-x86-64.so.2", "bin/busybox"):
        assert need in listing, need
    kos = {p.rsplit("/", 1)[-1] for p in listing if p.endswith(".ko")}
    for mod in ("e1000.ko", "virtio_net.ko", "nbd.ko", "ext4.ko", "crc32c_generic.ko", "jbd2.ko"):
        assert mod in kos, mod
    assert f"lib/modules/{assets.kernel_version}/modules.dep" in listing


@pytest.mark.qemu
@pytest.mark.netns
def test_kernel_and_initrd_boot_to_marker(assets, lab, tmp_path, pc_logs):
    """Two boots of one PC against one qemu-nbd: marker A, fresh=yes, then fresh=no (the file it wrote).
    First with an e1000 NIC (QEMU's default), then virtio-net: both drivers come up from the initrd."""
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(assets.image_a), "-F", "qcow2",
                    str(disk)], check=True)
    start_dnsmasq(lab, tmp_path / "dnsmasq")
    start_qemu_nbd(lab, disk, export="osA")
    pc = LabPC(lab, "pc1", pc_logs, firmware="direct", nic="e1000", kernel=assets.kernel, initrd=assets.initrd,
               append=f"console=ttyS0 quiet bootd.server={lab.server_ip} "
                      f"bootd.nbd={lab.server_ip}:10809/osA bootd.config=http://{lab.server_ip}:8080/x")
    first = pc.boot(timeout=120)
    assert first.ok and first.marker == "A" and first.fresh is True, first.describe()
    assert first.ip and first.ip.startswith("10.77.0."), first.describe()
    assert first.config_url == f"http://{lab.server_ip}:8080/x"
    pc.nic = "virtio-net-pci"  # the other NIC driver in the initrd
    second = pc.boot(timeout=120)
    assert second.ok and second.marker == "A" and second.fresh is False, second.describe()
