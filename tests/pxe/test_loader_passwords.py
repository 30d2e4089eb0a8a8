"""pxelinux and GRUB rooms (issue 17): the entries students do not see are offered as boot-once entries
behind the bootloader's own password (pxelinux MENU PASSWD with a SHA-512 crypt hash; GRUB superuser
with password_pbkdf2, student entries --unrestricted). Without a hash configured they are not there."""
from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from golden import check_golden

from bootd.admins import grub_pbkdf2, sha512_crypt
from bootd.config import ConfigError, parse_config
from bootd.daemon import Context
from bootd.state import open_state
from pxe.booter import Booter, render
from pxe.tokens import fallback_token
from snapshots.store import SnapshotStore

GOLDEN = Path(__file__).parent / "golden"
PC01, PC02 = "52:54:00:00:00:01", "52:54:00:00:00:02"
PASSWORD = "lab-admin-pw"
SHA512 = sha512_crypt(PASSWORD, "bootdgoldensalt0")
PBKDF2 = grub_pbkdf2(PASSWORD, bytes(range(64)), 1000)

CONFIG = f"""
interfaces:
  - {{name: br0, address: 10.77.0.1/24}}
menu: {{title: "Lab 6", timeout: 7, cmdline: "console=ttyS0", admin_pxelinux_passwd: "{SHA512}",
        admin_grub_pbkdf2: "{PBKDF2}"}}
images:
  - {{name: debian, title: "Debian 12", kernel: vmlinuz, initrd: initrd.img}}
groups:
  - {{name: bios, images: [debian], boot: pxelinux}}
  - {{name: uefi, images: [debian], boot: grub}}
hosts:
  - {{mac: "{PC01}", name: pc01, group: bios}}
  - {{mac: "{PC02}", name: pc02, group: uefi}}
"""


def test_sha512_crypt_is_what_crypt_and_openssl_compute():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    h = sha512_crypt(PASSWORD)
    assert h.startswith("$6$") and crypt.crypt(PASSWORD, h) == h and crypt.crypt("wrong", h) != h
    assert SHA512 == subprocess.run(["openssl", "passwd", "-6", "-salt", "bootdgoldensalt0", PASSWORD],
                                    capture_output=True, text=True, check=True).stdout.strip()


def test_grub_pbkdf2_format():
    _, _, algo, iterations, salt, digest = PBKDF2.split(".")
    assert algo == "sha512" and iterations == "1000" and len(bytes.fromhex(salt)) == 64
    assert bytes.fromhex(digest) == hashlib.pbkdf2_hmac("sha512", PASSWORD.encode(), bytes(range(64)), 1000)
    assert grub_pbkdf2(PASSWORD) != grub_pbkdf2(PASSWORD)  # a fresh salt each time


@pytest.mark.skipif(shutil.which("grub-mkpasswd-pbkdf2") is None, reason="needs grub-mkpasswd-pbkdf2 (grub-common)")
def test_grub_pbkdf2_matches_grub_mkpasswd_pbkdf2():
    out = subprocess.run(["grub-mkpasswd-pbkdf2", "-c", "1000"], input=f"{PASSWORD}\n{PASSWORD}\n",
                         capture_output=True, text=True, check=True).stdout
    theirs = re.search(r"grub\.pbkdf2\.sha512\.\S+", out).group(0)
    salt = bytes.fromhex(theirs.split(".")[4])
    assert grub_pbkdf2(PASSWORD, salt, 1000) == theirs


def test_config_refuses_a_plain_password_for_the_loaders():
    with pytest.raises(ConfigError, match="SHA-512 crypt"):
        parse_config(CONFIG.replace(SHA512, "plaintext"))
    with pytest.raises(ConfigError, match="grub-mkpasswd-pbkdf2"):
        parse_config(CONFIG.replace(PBKDF2, "plaintext"))


@pytest.fixture
def ctx(tmp_path):
    state = open_state(tmp_path / "state.db")
    store = SnapshotStore(state, tmp_path / "snapshots", min_free_bytes=0)
    store.create_image("debian", "1M", "t")
    store.promote("debian@v1", "*", "t")
    d = store.draft("debian", "t")
    store.seal(d.id, "v2", "t")
    store.promote("debian@v2", "*", "t")
    yield Context(config=parse_config(CONFIG), config_path="test", store=state, snapshots=store)
    state.close()


def text_of(ctx, mac, flavour):
    menu = asyncio.run(Booter(ctx).menu_for(mac, "10.77.0.1"))
    return render(menu, flavour).replace(fallback_token(ctx.store, mac), "@TOKEN@")


def test_golden_pxelinux_admin_entries_ask_the_password(ctx):
    text = text_of(ctx, PC01, "pxelinux")
    check_golden(GOLDEN / "loader-admin-pc01.pxelinux", text)
    student, _, admin = text.partition("MENU SEPARATOR\n\nLABEL debian-prev")
    assert "MENU PASSWD" not in student and f"MENU PASSWD {SHA512}" in admin
    assert "MENU LABEL Admin: Debian 12 (previous: v1)" in admin and PASSWORD not in text


def test_golden_grub_admin_entries_need_the_superuser(ctx):
    text = text_of(ctx, PC02, "grub")
    check_golden(GOLDEN / "loader-admin-pc02.grub", text)
    assert "set superusers='admin'" in text and f"password_pbkdf2 admin {PBKDF2}" in text
    assert "menuentry 'Debian 12 (v2)' --id debian --unrestricted {" in text
    assert "menuentry 'Admin: Debian 12 (previous: v1)' --id debian-prev {" in text
    assert PASSWORD not in text


def test_without_a_hash_nothing_hidden_is_offered(ctx):
    ctx.set_config(parse_config(CONFIG.replace(f'admin_pxelinux_passwd: "{SHA512}",', "")
                                .replace(f'admin_grub_pbkdf2: "{PBKDF2}"', "")))
    for mac, flavour in ((PC01, "pxelinux"), (PC02, "grub")):
        text = text_of(ctx, mac, flavour)
        assert "previous" not in text and "Admin" not in text and "superusers" not in text
