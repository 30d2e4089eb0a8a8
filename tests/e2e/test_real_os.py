"""A real OS booted by stock tools (issue 15): a Debian 12 system (debootstrap, linux-image-amd64,
nbd-client's stock initramfs hook, systemd; scripts/build-real-os.sh) imported with `bootctl image
import` as a `kind: native` image. The lab PC (iPXE in QEMU) boots the kernel and initramfs bootd read
from the snapshot's own /boot, Debian's initramfs mounts the root over NBD from `root=/dev/nbd0
nbdroot=...`, and systemd reaches multi-user.target, where a unit prints
`BOOTD-REALOS-MARKER kernel=<uname -r> ... marker=<A|B> fresh=<yes|no>` and powers off.

Then the admin's update: a draft gets the updated system (a newer kernel from bookworm-backports
installed beside the old one, /etc/bootd-marker B), seal (`--kernel latest`), promote -> the PC boots the
new kernel; rollback -> the old one; every boot starts from a fresh disk.

Minutes of TCG: opt-in (BOOTD_REALOS_TEST=1, or `make demo-real`); times in the README.
"""
from __future__ import annotations

import os
import re
import subprocess
import time

import pytest
from harness import asset_script, lab_config, running_bootd_lab

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.environ.get("BOOTD_REALOS_TEST") != "1",
                       reason="long (a Debian system built and booted under TCG): BOOTD_REALOS_TEST=1 or "
                              "make demo-real"),
]

MARK = re.compile(r"BOOTD-REALOS-MARKER kernel=(\S+) initrd=\S* marker=(\S+) fresh=(\S+)")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_real_os() -> dict[str, str]:
    """The two disk images (v1, and v1 updated) and their kernel releases, built or taken from the cache."""
    return asset_script("build-real-os.sh", "image", "update", "kernel", "update_kernel")


def boot_and_report(bl, pc, label: str) -> tuple[str, str, bool]:
    t0 = time.monotonic()
    r = pc.boot(timeout=900)
    m = MARK.search(r.log)
    if m is None:
        pytest.fail(f"{label}: no marker line (exit {r.exit_code}, {r.elapsed}s); last serial lines:\n"
                    + "\n".join(r.log.splitlines()[-60:]))
    kernel, marker, fresh = m.group(1), m.group(2), m.group(3) == "yes"
    say(f"{label}: kernel {kernel}, marker {marker}, fresh disk {fresh}, {time.monotonic() - t0:.0f} s to the marker")
    return kernel, marker, fresh


def test_real_debian_boots_its_own_kernel_and_promote_rollback_switch_it(assets, pc_logs):
    real = build_real_os()
    say(f"images: {real['image']} (kernel {real['kernel']}), update {real['update']} "
        f"(kernel {real['update_kernel']})")

    def config(lab) -> dict:
        cfg = lab_config(lab, groups=[{"name": "lab", "images": ["deb12"], "default_image": "deb12"}])
        cfg["images"] = [{"name": "deb12", "title": "Debian 12", "kind": "native"}]
        return cfg

    with running_bootd_lab(pc_logs, config, assets) as bl:
        t = time.monotonic()
        r = bl.bootctl("image", "import", "deb12", real["image"])
        say(f"bootctl image import: {r.stdout.strip()} ({time.monotonic() - t:.0f} s)")
        assert f"boots its own kernel {real['kernel']}" in r.stdout
        bl.bootctl("snapshot", "promote", "deb12@v1")

        pc = bl.pc("realpc", memory=1024)
        assert boot_and_report(bl, pc, "boot 1 (v1)") == (real["kernel"], "A", True)
        assert boot_and_report(bl, pc, "boot 2 (v1 again)") == (real["kernel"], "A", True)  # a fresh disk

        # the update, in a draft: its content is the updated system; seal picks the newest kernel
        t = time.monotonic()
        draft = bl.bootctl_json("snapshot", "draft", "deb12@v1")
        subprocess.run(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "qcow2", real["update"], draft["path"]],
                       check=True, capture_output=True)
        refused = bl.bootctl("snapshot", "seal", draft["name"], "-n", "backports kernel", check=False)
        assert refused.returncode == 1 and "2 kernels" in refused.stderr, refused.stderr
        v2 = bl.bootctl_json("snapshot", "seal", draft["name"], "-n", "backports kernel", "--kernel", "latest")
        say(f"sealed {v2['name']} with kernel {v2['kernel_release']} ({time.monotonic() - t:.0f} s)")
        assert v2["kernel_release"] == real["update_kernel"]

        bl.bootctl("snapshot", "promote", v2["name"])
        assert boot_and_report(bl, pc, "boot 3 (v2 promoted)") == (real["update_kernel"], "B", True)

        bl.bootctl("snapshot", "rollback", "deb12")
        assert boot_and_report(bl, pc, "boot 4 (rolled back)") == (real["kernel"], "A", True)
