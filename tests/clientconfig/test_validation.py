"""Hostile values in the clients config are refused with a position, or quoted so that a shell and
systemd see exactly the value (never a second command)."""
from __future__ import annotations

import shlex
import subprocess

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bootd.clientconfig.model import ClientsConfig, InstanceConfig, merge_clients, parse_extra_arg
from bootd.clientconfig.render import DiskRef, HostRef, render_host, sh_join, systemd_quote
from bootd.config import ConfigError, parse_config

from .helpers import TWO_INSTANCE_YAML, upstart_exec

HOSTILE = [
    ("name", "win10; reboot"),
    ("name", "$(touch /tmp/pwned)"),
    ("image", "win`id`"),
    ("image", "a b"),
    ("description", 'Windows "10"'),
    ("description", "it's"),
    ("description", "x $(reboot)"),
    ("description", "line\nbreak"),
    ("description", "a,b"),
    ("description", "next\x85line"),
    ("overlay_dir", "/var/tmp; rm -rf /"),
    ("overlay_dir", "/var/../etc"),
    ("overlay_dir", "relative/dir"),
    ("disk_uri", "nbd://10.0.0.1:10809/x,file=/etc/shadow"),
    ("disk_uri", "file:///etc/shadow"),
    ("disk_uri", "nbd://10.0.0.1:10809/a b"),
    ("guest_mac", "52:54:00:00:00:01,id=x"),
    ("cpu_model", "max,+vmx"),
    ("extra_args", ["-drive file=/etc/shadow"]),
    ("extra_args", ["-device usb-tablet,id=x"]),
    ("extra_args", ["-device usb-tablet -drive file=/etc/shadow"]),
    ("extra_args", ["-serial file:/tmp/../etc/passwd"]),
    ("extra_args", ["-serial file:/tmp/a;reboot"]),
    ("extra_args", ["-k en-us; reboot"]),
    ("extra_args", ["-usb extra"]),
    ("extra_args", ["-monitor stdio"]),
    ("memory", "4G; reboot"),
]


def config_with(field: str, value) -> str:
    data = yaml.safe_load(TWO_INSTANCE_YAML)
    data["groups"][0]["clients"]["instances"][0][field] = value
    return yaml.safe_dump(data, sort_keys=False)


@pytest.mark.parametrize("field,value", HOSTILE, ids=[f"{f}={v!r}" for f, v in HOSTILE])
def test_hostile_value_is_refused_with_its_position(field, value):
    with pytest.raises(ConfigError) as err:
        parse_config(config_with(field, value), "bootd.yaml")
    problems = err.value.problems
    assert len(problems) >= 1
    p = problems[0]
    assert p.path.startswith("groups[0].clients.instances[0]." + field), str(p)
    assert p.line is not None and p.file == "bootd.yaml"


def test_the_same_config_without_the_hostile_value_loads():
    """Control for the test above: the base config is valid, so the refusals come from the values."""
    cfg = parse_config(TWO_INSTANCE_YAML)
    assert len(cfg.group("room1").clients.instances) == 2


def test_vetted_extra_args_are_accepted_and_reach_the_command():
    inst = InstanceConfig(extra_args=["-usb", ["-device", "usb-tablet"], "-vga std", "-k de-ch",
                                      "-serial file:/var/log/bootd/guest.log", "-no-reboot"])
    files = render_host(HostRef("52:54:00:00:00:09"), ClientsConfig(instances=[inst]),
                        [DiskRef("nbd://10.0.0.1/x")])
    argv = shlex.split(upstart_exec(files["qemuinstance1.conf"])[1])
    tail = argv[argv.index("-parallel") + 2:]
    assert tail == ["-usb", "-device", "usb-tablet", "-vga", "std", "-k", "de-ch",
                    "-serial", "file:/var/log/bootd/guest.log", "-no-reboot"]
    assert "none" != argv[argv.index("-serial") + 1]  # our -serial replaces the default "-serial none"
    with pytest.raises(ValueError, match="not in the vetted list"):
        parse_extra_arg("-drive file=x")


def test_descriptions_with_spaces_and_parentheses_are_quoted():
    desc = "Lab PC (room 2) - Windows 10 / Office: ok"
    inst = InstanceConfig(description=desc)
    files = render_host(HostRef("52:54:00:00:00:09", "pc9"), ClientsConfig(instances=[inst]),
                        [DiskRef("nbd://10.0.0.1/x")])
    line = next(ln for ln in files["qemuinstance1.conf"].splitlines() if ln.startswith("description "))
    assert shlex.split(line) == ["description", f"bootd QEMU instance 1 ({desc}) for pc9"]
    assert f"Description=bootd QEMU instance 1 ({desc}) for pc9\n" in files["qemuinstance1.service"]


def test_host_name_that_is_not_a_token_is_replaced_by_the_mac():
    files = render_host(HostRef("52:54:00:00:00:09", 'evil"; reboot'), ClientsConfig(instances=[InstanceConfig()]),
                        [DiskRef("nbd://10.0.0.1/x")])
    assert "reboot" not in "".join(files.values())
    assert "for 52:54:00:00:00:09" in files["qemuinstance1.conf"]


def test_disk_ref_refuses_unvetted_uris():
    for bad in ["nbd://h/x,format=qcow2", "nbd://h/$(id)", "http://h/x", "nbd://h:99999/x"]:
        with pytest.raises(ValueError):
            DiskRef(bad)


def test_merge_keeps_group_values_and_takes_host_overrides():
    group = ClientsConfig.model_validate({"instances": [{"name": "a", "memory": 512}], "viewer": {"view_only": True}})
    host = ClientsConfig.model_validate({"viewer": {"fullscreen": False}})
    m = merge_clients(group, host)
    assert m.viewer.view_only is True and m.viewer.fullscreen is False
    assert m.instances[0].memory == 512
    m2 = merge_clients(group, ClientsConfig.model_validate({"instances": [{"name": "b"}]}))
    assert [i.name for i in m2.instances] == ["b"]
    assert merge_clients(None, None) is None


def test_conflicting_instances_are_refused():
    with pytest.raises(ValueError, match="virtual terminal 7"):
        ClientsConfig.model_validate({"instances": [{"vt": 7}, {"vt": 7, "name": "b"}]})
    with pytest.raises(ValueError, match="cannot show protocol"):
        ClientsConfig.model_validate({"instances": [{"display": "spice"}], "viewer": {"program": "xtigervncviewer"}})
    with pytest.raises(ValueError, match="used twice"):
        ClientsConfig.model_validate({"instances": [{"name": "x"}, {"name": "x"}]})


SHELL_HOSTILE = ["x; touch {p}", "$(touch {p})", "`touch {p}`", "a'b", 'a"b', "\\", "*", "~", "a b  c",
                 "&& touch {p}", "|touch {p}", "\n touch {p}", "", "-e", "%s %n"]


def test_shell_quoting_survives_a_real_shell(tmp_path):
    pwned = tmp_path / "pwned"
    argv = [s.format(p=pwned) for s in SHELL_HOSTILE]
    out = subprocess.run(["/bin/sh", "-c", "printf '%s\\0' " + sh_join(argv)], capture_output=True, timeout=10)
    assert out.returncode == 0
    assert out.stdout.split(b"\0")[:-1] == [a.encode() for a in argv]
    assert not pwned.exists()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                        max_size=20), min_size=1, max_size=5))
def test_shell_quoting_round_trips(argv):
    assert shlex.split(sh_join(argv)) == argv


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_description_is_refused_or_rendered_verbatim(text):
    try:
        inst = InstanceConfig(description=text)
    except ValueError:
        return
    files = render_host(HostRef("52:54:00:00:00:09", "pc9"), ClientsConfig(instances=[inst]),
                        [DiskRef("nbd://10.0.0.1/x")])
    line = next(ln for ln in files["xserver1.conf"].splitlines() if ln.startswith("description "))
    assert shlex.split(line) == ["description", f"bootd X server 1 ({text}) for pc9"]
    assert "\n" not in text and "%" not in text and "$" not in text


def test_systemd_quote_escapes_specifiers_and_quotes():
    assert systemd_quote("plain-value,x=1") == "plain-value,x=1"
    assert systemd_quote("a b") == '"a b"'
    assert systemd_quote("50%") == '"50%%"'
    assert systemd_quote('a"b$c') == '"a\\"b$$c"'


def test_spice_and_rdp_instances_get_matching_viewers():
    clients = ClientsConfig.model_validate({"instances": [{"name": "s", "display": "spice"},
                                                          {"name": "r", "display": "rdp"}]})
    with pytest.raises(ValueError, match="does not match"):
        ClientsConfig.model_validate({"instances": [{"display": "spice"}], "viewer": {"protocol": "vnc"}})
    files = render_host(HostRef("52:54:00:00:00:09"), clients,
                        [DiskRef("nbd://10.0.0.1/a"), DiskRef("nbd://10.0.0.1/b")])
    q1 = shlex.split(upstart_exec(files["qemuinstance1.conf"])[1])
    assert q1[q1.index("-spice") + 1] == "addr=127.0.0.1,port=5931,disable-ticketing=on"
    assert shlex.split(upstart_exec(files["viewer1.conf"])[1]) == [
        "/usr/bin/remote-viewer", "--full-screen", "spice://127.0.0.1:5931"]
    q2 = shlex.split(upstart_exec(files["qemuinstance2.conf"])[1])
    assert q2[q2.index("-nic") + 1] == "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:3391-:3389"
    assert shlex.split(upstart_exec(files["viewer2.conf"])[1]) == [
        "/usr/bin/xfreerdp", "/f", "/cert:ignore", "/v:127.0.0.1:3391"]
    with pytest.raises(ValueError, match="user networking"):
        ClientsConfig.model_validate({"instances": [{"display": "rdp", "network": "none"}]})
