"""bootctl admin add|passwd|remove|list against a running bootd (issue 17): hashes only in the state
file, no password in the log, refusals with reasons."""
from __future__ import annotations

import json

import pytest
from support import state_rows

from bootd.cli.api_client import ApiError

PASSWORD = "s3cret-Admin-pw"


def test_bootctl_admin_add_passwd_list_remove(bootd_daemon):
    d = bootd_daemon({"dhcp": {"mode": "off"}, "tftp": {"enabled": False}})
    r = d.bootctl("admin", "add", "alice", "--password-stdin", input=PASSWORD + "\n", check=True)
    assert "admin alice added" in r.stdout
    r = d.bootctl("admin", "add", "alice", "--password-stdin", input="another-password\n")
    assert r.returncode == 1 and "exists" in r.stderr
    r = d.bootctl("admin", "add", "bob", "--password-stdin", input="short\n")
    assert r.returncode == 1 and "8 to" in r.stderr
    r = d.bootctl("admin", "add", "bob")  # no terminal and no --password-stdin
    assert r.returncode == 2 and "--password-stdin" in r.stderr
    listing = json.loads(d.bootctl("--json", "admin", "list", check=True).stdout)["admins"]
    assert [a["name"] for a in listing] == ["alice"] and "password_hash" not in listing[0]
    assert "alice" in d.bootctl("admin", "list", check=True).stdout
    def stored_hash() -> str:
        return state_rows(d.storage / "state.db", "SELECT password_hash FROM admin_accounts WHERE name='alice'")[0][0]
    first = stored_hash()
    assert first.startswith("$argon2id$")
    d.bootctl("admin", "passwd", "alice", "--password-stdin", input="a-new-password\n", check=True)
    assert stored_hash() != first
    r = d.bootctl("admin", "passwd", "carol", "--password-stdin", input="a-new-password\n")
    assert r.returncode == 1 and "no admin" in r.stderr
    kept = d.bootctl("admin", "remove", "alice")  # destructive: lists what goes, needs --yes
    assert kept.returncode == 1 and "admin account alice" in kept.stderr and "add --yes" in kept.stderr, kept
    d.bootctl("admin", "remove", "alice", "--yes", check=True)
    assert "no admin accounts" in d.bootctl("admin", "list", check=True).stdout
    r = d.bootctl("admin", "remove", "alice")
    assert r.returncode == 1 and "no admin" in r.stderr
    d.stop()
    log = d.log()
    assert PASSWORD not in log and "a-new-password" not in log


def test_bootctl_admin_roles_for_the_dashboard(bootd_daemon):
    """issue 18: `--role viewer` makes a read-only dashboard account; `admin set` changes the role."""
    d = bootd_daemon({"dhcp": {"mode": "off"}, "tftp": {"enabled": False}})
    d.bootctl("admin", "add", "alice", "--password-stdin", input=PASSWORD + "\n", check=True)
    r = d.bootctl("admin", "add", "victor", "--role", "viewer", "--password-stdin", input=PASSWORD + "\n", check=True)
    assert "victor added (viewer)" in r.stdout
    table = d.bootctl("admin", "list", check=True).stdout.splitlines()
    assert table[0].split()[:2] == ["NAME", "ROLE"]
    assert [line.split()[:2] for line in table[1:]] == [["alice", "admin"], ["victor", "viewer"]]
    r = d.bootctl("admin", "add", "eve", "--role", "root", "--password-stdin", input=PASSWORD + "\n")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    d.bootctl("admin", "set", "victor", "--role", "admin", check=True)
    listing = json.loads(d.bootctl("--json", "admin", "list", check=True).stdout)["admins"]
    roles = {a["name"]: a["role"] for a in listing}
    assert roles == {"alice": "admin", "victor": "admin"}
    r = d.bootctl("admin", "set", "nobody", "--role", "viewer")
    assert r.returncode == 1 and "no admin" in r.stderr
    with pytest.raises(ApiError) as bad:
        d.api.request("PATCH", "/api/v1/admins/alice", body={"role": "god"})
    assert bad.value.status == 400 and "bad role" in str(bad.value)
