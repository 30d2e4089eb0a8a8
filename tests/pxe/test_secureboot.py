"""Secure Boot rooms without a PC: the config check, the loader a PC gets, the signed files in the boot
root, and what a Secure Boot boot leaves on the timeline. The boots themselves, on OVMF with Microsoft's
keys enrolled, are tests/e2e/test_secureboot_qemu.py (opt-in, `make test-secureboot`)."""
from __future__ import annotations

import filecmp
import struct
from pathlib import Path

import pytest
import yaml

from bootd.authenticode import is_signed, signature_size
from bootd.bootnames import is_optional, program_of
from bootd.bootplan import host_settings
from bootd.config import ConfigError, LoaderConfig, parse_config
from bootd.dhcp.codec import DISCOVER
from bootd.hoststate import loader_chain, summarize
from pxe.loaders import SIGNED_GRUB, SIGNED_SHIM, install_loaders

SHIM_SIGNED = Path(SIGNED_SHIM)
SHIM_UNSIGNED = Path("/usr/lib/shim/shimx64.efi")  # shim-unsigned: the same program, no signature
IPXE_EFI = Path("/usr/lib/ipxe/ipxe.efi")
needs_shim = pytest.mark.skipif(not (SHIM_SIGNED.is_file() and Path(SIGNED_GRUB).is_file()),
                                reason="shim-signed / grub-efi-amd64-signed not installed (deps/runtime-packages.txt)")


def unsigned_copy(signed: bytes) -> bytes:
    """`signed` with its Authenticode certificate table removed, as sbattach --remove leaves it."""
    pe = struct.unpack_from("<I", signed, 0x3C)[0]
    opt = pe + 24
    dirs = opt + (112 if struct.unpack_from("<H", signed, opt)[0] == 0x20B else 96)
    offset, size = struct.unpack_from("<II", signed, dirs + 8 * 4)
    out = bytearray(signed[:offset] + signed[offset + size:])
    struct.pack_into("<II", out, dirs + 8 * 4, 0, 0)
    return bytes(out)


def config_text(boot_root: Path, group: dict, hosts: list[dict] | None = None, **top) -> str:
    cfg = {"interfaces": [{"name": "br0", "address": "10.77.0.1/24"}],
           "dhcp": {"mode": "full", "pools": [{"interface": "br0", "start": "10.77.0.100", "end": "10.77.0.109"}]},
           "tftp": {"root": str(boot_root)},
           "images": [{"name": "deb", "kernel": "vmlinuz", "initrd": "initrd.img"},
                      {"name": "own", "kernel": "own/vmlinuz", "initrd": "initrd.img"}],
           "groups": [{"name": "lab", "images": ["deb"], **group}, {"name": "old", "images": ["deb", "own"]}],
           "hosts": hosts or [{"mac": "52:54:00:00:5b:01", "name": "pc01", "group": "lab"}], **top}
    return yaml.safe_dump(cfg, sort_keys=False)


@pytest.fixture
def boot_root(tmp_path):
    root = tmp_path / "boot"
    (root / "own").mkdir(parents=True)
    return root


# -- the config check --------------------------------------------------------------------------------
def test_secureboot_room_boots_grub_and_its_pcs_know_it(boot_root):
    cfg = parse_config(config_text(boot_root, {"secureboot": True}))
    s = host_settings(cfg, "52:54:00:00:5b:01")
    assert s.secureboot is True and s.boot == "grub"
    # a PC of a plain room switched to Secure Boot on its own
    cfg = parse_config(config_text(boot_root, {}, hosts=[{"mac": "52:54:00:00:5b:02", "name": "pc02",
                                                          "group": "old", "secureboot": True}]))
    s = host_settings(cfg, "52:54:00:00:5b:02")
    assert s.secureboot is True and s.boot == "grub"


@pytest.mark.parametrize("where", ["group", "host"])
@pytest.mark.parametrize("boot,name", [("ipxe", "iPXE"), ("pxelinux", "pxelinux")])
def test_unsigned_loaders_are_refused_for_secureboot(boot_root, where, boot, name):
    if where == "group":
        text = config_text(boot_root, {"secureboot": True, "boot": boot})
        path = "groups[0]"
    else:
        text = config_text(boot_root, {}, hosts=[{"mac": "52:54:00:00:5b:02", "name": "pc02", "group": "old",
                                                   "secureboot": True, "boot": boot}])
        path = "hosts[0]"
    with pytest.raises(ConfigError) as e:
        parse_config(text, "bootd.yaml")
    [problem] = e.value.problems
    assert problem.file == "bootd.yaml" and problem.line is not None and problem.path == path, problem
    assert f"{name} is not signed for Secure Boot" in problem.message and "boot: grub" in problem.message


def test_an_unsigned_kernel_is_refused_with_file_line_and_field(boot_root):
    signed = SHIM_SIGNED.read_bytes() if SHIM_SIGNED.is_file() else None
    if signed is None:
        pytest.skip("needs a signed EFI program (shim-signed)")
    (boot_root / "vmlinuz").write_bytes(signed)  # a signed PE: what the check looks at
    (boot_root / "own" / "vmlinuz").write_bytes(unsigned_copy(signed))
    assert is_signed(boot_root / "own" / "vmlinuz") is False
    parse_config(config_text(boot_root, {"secureboot": True}))  # deb's kernel is signed: accepted
    parse_config(config_text(boot_root, {"secureboot": False, "images": ["deb", "own"]}))  # no Secure Boot
    text = config_text(boot_root, {"secureboot": True, "images": ["deb", "own"]})
    with pytest.raises(ConfigError) as e:
        parse_config(text, "bootd.yaml")
    [problem] = e.value.problems
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.strip() == "secureboot: true")
    assert (problem.file, problem.line, problem.path) == ("bootd.yaml", line, "groups[0].secureboot")
    assert "image own: its kernel own/vmlinuz is not signed" in problem.message
    assert "shim refuses it" in problem.message
    # a file that is no EFI program at all (an initrd named as the kernel)
    (boot_root / "own" / "vmlinuz").write_bytes(b"\x1f\x8b" + bytes(5000))
    with pytest.raises(ConfigError, match="not an EFI program"):
        parse_config(text)
    # one PC of a plain room with Secure Boot on: its images are checked too
    hosts = [{"mac": "52:54:00:00:5b:02", "name": "pc02", "group": "old", "secureboot": True}]
    with pytest.raises(ConfigError, match=r"hosts\[0\]\.secureboot: image own"):
        parse_config(config_text(boot_root, {}, hosts=hosts))


def test_the_real_debian_kernel_passes(boot_root):
    kernel = Path(__file__).resolve().parents[2] / ".cache" / "assets" / "vmlinuz"
    if not kernel.is_file():
        pytest.skip("client assets not built (scripts/build-assets.sh)")
    assert is_signed(kernel) is True
    (boot_root / "vmlinuz").write_bytes(kernel.read_bytes())
    parse_config(config_text(boot_root, {"secureboot": True}))


def test_shim_next_to_the_unsigned_grub_is_refused(boot_root):
    text = config_text(boot_root, {"secureboot": True}, dhcp={"mode": "off", "loaders": {"shim_x64": "shimx64.efi"}})
    with pytest.raises(ConfigError, match=r"dhcp\.loaders\.shim_x64: shimx64\.efi: shim loads grubx64\.efi"):
        parse_config(text)


def test_signature_reader_on_real_and_broken_files():
    if not (SHIM_SIGNED.is_file() and SHIM_UNSIGNED.is_file()):
        pytest.skip("shim-signed not installed")
    signed = SHIM_SIGNED.read_bytes()
    assert signature_size(signed[:4096]) > 1000
    assert signature_size(SHIM_UNSIGNED.read_bytes()) == 0
    assert signature_size(unsigned_copy(signed)) == 0
    if IPXE_EFI.is_file():
        assert is_signed(IPXE_EFI) is False  # Debian's iPXE is not signed: why Secure Boot rooms never get it
    for junk in (b"", b"MZ", b"MZ" + bytes(100), signed[:0x3C] + b"\xff\xff\xff\x7f", b"\x7fELF" + bytes(200)):
        assert signature_size(junk) is None


# -- what a PC gets ----------------------------------------------------------------------------------
def _policy(store, boot_root, group, secureboot_http=False, **top):
    from bootd.dhcp.leases import LeaseTable
    from bootd.dhcp.policy import DhcpPolicy
    cfg = parse_config(config_text(boot_root, group, **top))
    return DhcpPolicy(cfg, LeaseTable(store), {}, secureboot_http=secureboot_http)


def _discover(policy, arch, http=False, event=None):
    from bootd.dhcp.codec import DhcpMessage, decode, encode
    vendor = f"{'HTTPClient' if http else 'PXEClient'}:Arch:{arch:05d}:UNDI:003001".encode()
    msg = DhcpMessage(xid=7, chaddr=bytes.fromhex("52540000" "5b01"),
                      options={53: bytes([DISCOVER]), 60: vendor, 93: struct.pack(">H", arch), 55: bytes([66, 67])})
    out = policy.handle(decode(encode(msg)), policy.interfaces["br0"], 67, 1_800_000_000.0)
    if event is not None:
        event.update(kind=out.event_kind, detail=out.event)
    return decode(encode(out.reply))


@pytest.fixture
def store(tmp_path):
    from bootd.state import open_state
    s = open_state(tmp_path / "state.db")
    yield s
    s.close()


@pytest.mark.parametrize("group,pxe,http", [
    ({"secureboot": True}, "secureboot/shimx64.efi", "http://10.77.0.1:8080/boot/files/secureboot/shimx64.efi"),
    ({"boot": "grub"}, "grubx64.efi", "http://10.77.0.1:8080/boot/files/grubx64.efi"),
    ({}, "ipxe.efi", "http://10.77.0.1:8080/boot/files/ipxe.efi"),
])
def test_uefi_pcs_get_the_rooms_chain_over_pxe_and_http_boot(store, boot_root, group, pxe, http):
    policy = _policy(store, boot_root, group, secureboot_http=True)  # as if the signed GRUB spoke HTTP
    r = _discover(policy, 7)
    assert r.file == pxe.encode() and 60 not in r.options
    r = _discover(policy, 16, http=True)
    assert r.file == http.encode() and r.options[60] == b"HTTPClient"  # echoed, as UEFI HTTP boot requires
    # a BIOS PC in the same room has no Secure Boot: it gets the room's BIOS loader
    assert _discover(policy, 0).file == b"undionly.kpxe"
    # on port 80 the URL names no port
    policy = _policy(store, boot_root, group, secureboot_http=True, http={"port": 80})
    assert _discover(policy, 16, http=True).file == http.replace(":8080", "").encode()


def test_http_boot_of_a_secure_boot_pc_is_a_failed_step_with_the_reason(store, boot_root):
    """Debian 12's signed GRUB has no HTTP client (and cannot load modules under Secure Boot): over UEFI
    HTTP boot it would load and stop at its prompt. The PC gets an address and no boot file, and its
    timeline says why; its PXE boot is unchanged."""
    policy = _policy(store, boot_root, {"secureboot": True})
    ev: dict = {}
    r = _discover(policy, 16, http=True, event=ev)
    assert r.file == b"" and 60 not in r.options and r.yiaddr == "10.77.0.100"
    assert ev["kind"] == "failed" and ev["detail"]["step"] == "dhcp"
    assert "the signed GRUB beside shim has no HTTP client" in ev["detail"]["reason"]
    assert _discover(policy, 7, event=ev).file == b"secureboot/shimx64.efi" and ev["kind"] == "dhcp"
    # the unsigned GRUB of a plain grub room has HTTP built in: its HTTP boot goes ahead
    policy = _policy(store, boot_root, {"boot": "grub"})
    assert _discover(policy, 16, http=True, event=ev).file == b"http://10.77.0.1:8080/boot/files/grubx64.efi"


def test_proxy_mode_http_boot_gets_the_url_and_option_60(store, boot_root):
    """Next to another DHCP server (dhcp.mode proxy) a UEFI HTTP boot client gets its URL from bootd,
    with option 60 HTTPClient echoed (UEFI 2.x, 24.7: the client ignores offers without it)."""
    policy = _policy(store, boot_root, {"boot": "grub"}, dhcp={"mode": "proxy"})
    r = _discover(policy, 16, http=True)
    assert r.options[60] == b"HTTPClient" and r.yiaddr == "0.0.0.0"
    assert r.file == b"http://10.77.0.1:8080/boot/files/grubx64.efi"


@needs_shim
def test_which_grub_speaks_http(tmp_path):
    from bootd.authenticode import grub_has_http
    root = tmp_path / "boot"
    install_loaders(root, LoaderConfig())
    assert grub_has_http(root / "grubx64.efi")  # bootd's own GRUB (grub-mkimage with the http module)
    assert not grub_has_http(root / "secureboot" / "grubx64.efi")  # Debian 12's signed one: TFTP only
    assert not grub_has_http(root / "missing.efi")


# -- the signed files in the boot root ----------------------------------------------------------------
@needs_shim
def test_signed_shim_and_grub_are_stocked_side_by_side(tmp_path):
    root = tmp_path / "boot"
    got = install_loaders(root, LoaderConfig())
    assert "secureboot/shimx64.efi" in got and "secureboot/grubx64.efi" in got and "secureboot/mmx64.efi" in got
    assert filecmp.cmp(root / "secureboot" / "shimx64.efi", SIGNED_SHIM, shallow=False)
    assert filecmp.cmp(root / "secureboot" / "grubx64.efi", SIGNED_GRUB, shallow=False)
    assert filecmp.cmp(root / "secureboot" / "mmx64.efi", "/usr/lib/shim/mmx64.efi.signed", shallow=False)
    assert is_signed(root / "secureboot" / "grubx64.efi") and not is_signed(root / "grubx64.efi")
    (root / "secureboot" / "shimx64.efi").write_bytes(b"admin's own shim")
    assert install_loaders(root, LoaderConfig()) == []
    assert (root / "secureboot" / "shimx64.efi").read_bytes() == b"admin's own shim"


@needs_shim
def test_a_secure_boot_room_without_its_signed_loaders_is_a_warning(boot_root):
    from bootd.bootchecks import missing_secureboot_loaders
    cfg = parse_config(config_text(boot_root, {"secureboot": True}))
    warnings = missing_secureboot_loaders(cfg)
    assert len(warnings) == 2 and "group lab (secureboot: true): secureboot/shimx64.efi is missing" in warnings[0]
    assert "apt install shim-signed" in warnings[0] and "apt install grub-efi-amd64-signed" in warnings[1]
    install_loaders(boot_root, cfg.dhcp.loaders)
    assert missing_secureboot_loaders(cfg) == []
    (boot_root.parent / "empty").mkdir()
    assert missing_secureboot_loaders(parse_config(config_text(boot_root.parent / "empty", {}))) == []  # no such room


def test_grub_rooms_in_proxy_mode_are_a_warning_naming_next_server(boot_root):
    from bootd.bootchecks import proxy_grub_rooms
    cfg = parse_config(config_text(boot_root, {"secureboot": True}, dhcp={"mode": "proxy"}))
    [warning] = proxy_grub_rooms(cfg)
    assert warning.startswith("group lab: PCs booting GRUB in proxy mode") and "10.77.0.1 as next-server" in warning
    assert "dhcp-boot=,,10.77.0.1" in warning
    assert proxy_grub_rooms(parse_config(config_text(boot_root, {"secureboot": True}))) == []  # full mode
    assert proxy_grub_rooms(parse_config(config_text(boot_root, {}, dhcp={"mode": "proxy"}))) == []  # iPXE rooms


# -- the timeline ------------------------------------------------------------------------------------
def test_probes_are_not_failures_and_programs_have_names():
    for name in ("secureboot/revocations_sku.efi", "secureboot/revocations_sbat.efi",
                 "secureboot/shim_certificate_0.efi", "grub/x86_64-efi/command.lst", "grub/x86_64-efi/grub.cfg",
                 "grub/fonts/unicode.pf2", "/grub/locale/de.mo"):
        assert is_optional(name), name
    for name in ("secureboot/grubx64.efi", "grub/grub.cfg", "vmlinuz", "grub/x86_64-efi/normal.mod"):
        assert not is_optional(name), name
    assert [program_of(p) for p in ("secureboot/shimx64.efi", "secureboot/grubx64.efi", "ipxe.efi",
                                    "undionly.kpxe", "pxelinux.0", "other.efi")] == \
        ["shim", "grub", "ipxe", "ipxe", "pxelinux", "loader"]


def test_loader_chain_of_a_secure_boot():
    def ev(ts, kind, path, proto="tftp", **d):
        return {"ts": ts, "kind": kind, "detail": {"path": path, "protocol": proto, **d}, "nbytes": 1,
                "duration": 0.1}
    events = [{"ts": 100.0, "kind": "dhcp", "detail": {"type": "DISCOVER"}},
              ev(101, "loader", "secureboot/shimx64.efi", outcome="aborted"),  # OVMF's size probe
              ev(101.1, "loader", "secureboot/shimx64.efi", outcome="complete"),
              ev(102, "loader", "secureboot/grubx64.efi", outcome="complete"),
              ev(103, "menu", "grub/grub.cfg", outcome="complete"),
              ev(104, "kernel", "vmlinuz", outcome="complete"),
              ev(105, "initrd", "initrd.img", outcome="complete")]
    chain = loader_chain(events)
    assert [(c["step"], c["path"], c["proto"]) for c in chain] == [
        ("shim", "secureboot/shimx64.efi", "tftp"), ("grub", "secureboot/grubx64.efi", "tftp"),
        ("menu", "grub/grub.cfg", "tftp"), ("kernel", "vmlinuz", "tftp"), ("initrd", "initrd.img", "tftp")]
    s = summarize(events, now=106.0)
    assert s.chain == chain and s.as_dict()["chain"] == chain and s.last_error is None
