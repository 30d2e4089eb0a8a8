"""Admin accounts (issue 17): argon2id hashes in the state store, the failure lock-out, one-time nonces."""
from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from bootd.admins import Accounts, AdminError, AdminGate, FailureLimiter, LockoutPolicy, NonceBook
from bootd.state import open_state

PC1, PC2 = "52:54:00:00:00:01", "52:54:00:00:00:02"


class Clock:
    """A clock the test steps."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def cheap_hasher() -> PasswordHasher:
    return PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)


@pytest.fixture
def store(tmp_path):
    s = open_state(tmp_path / "state.db")
    yield s
    s.close()


def test_accounts_store_an_argon2id_hash_never_the_password(store):
    acc = Accounts(store, cheap_hasher())
    acc.add("alice", "correct horse", by="root")
    stored = store.admin_password_hash("alice")
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert acc.verify("alice", "correct horse")
    assert not acc.verify("alice", "correct horsE")
    assert not acc.verify("bob", "correct horse")  # unknown name: the decoy hash, still False
    assert [a["name"] for a in acc.list()] == ["alice"] and "password_hash" not in acc.list()[0]


def test_passwd_remove_and_refusals(store):
    acc = Accounts(store, cheap_hasher())
    acc.add("alice", "first password", by="root")
    with pytest.raises(AdminError, match="exists"):
        acc.add("alice", "other password", by="root")
    with pytest.raises(AdminError, match="8 to"):
        acc.add("bob", "short", by="root")
    with pytest.raises(AdminError, match="bad admin name"):
        acc.add("Bob Smith", "long enough", by="root")
    with pytest.raises(AdminError, match="control"):
        acc.add("bob", "long\nenough", by="root")
    acc.passwd("alice", "second password")
    assert acc.verify("alice", "second password") and not acc.verify("alice", "first password")
    with pytest.raises(AdminError, match="no admin"):
        acc.passwd("carol", "whatever123")
    acc.remove("alice")
    assert not acc.verify("alice", "second password") and acc.list() == []
    with pytest.raises(AdminError, match="no admin"):
        acc.remove("alice")


def test_rehash_with_stronger_parameters_on_login(store):
    Accounts(store, cheap_hasher()).add("alice", "correct horse", by="root")
    stronger = PasswordHasher(time_cost=2, memory_cost=8192, parallelism=1)
    assert Accounts(store, stronger).verify("alice", "correct horse")
    assert "t=2" in store.admin_password_hash("alice")


def test_lockout_after_five_failures_grows_and_expires():
    clock = Clock()
    lim = FailureLimiter(clock, LockoutPolicy(free_failures=5, first_lockout=30, max_lockout=200))
    keys = ["pc:" + PC1]
    assert [lim.failed(keys) for _ in range(4)] == [0, 0, 0, 0]
    assert lim.locked_for(keys) == 0
    assert lim.failed(keys) == 30  # the fifth failure locks
    assert lim.locked_for(keys) == 30
    clock.now += 31
    assert lim.locked_for(keys) == 0
    assert lim.failed(keys) == 60  # each further failure doubles it
    clock.now += 61
    assert lim.failed(keys) == 120
    clock.now += 121
    assert lim.failed(keys) == 200  # capped
    lim.succeeded(keys)
    assert lim.failures(keys[0]) == 0 and lim.locked_for(keys) == 0


def test_gate_locks_per_pc_and_per_account(store):
    clock = Clock()
    acc = Accounts(store, cheap_hasher())
    acc.add("alice", "correct horse", by="root")
    gate = AdminGate(acc, clock, LockoutPolicy(free_failures=5, first_lockout=30))
    for _ in range(4):
        assert not gate.login("alice", "wrong guess", PC1).ok
    r = gate.login("alice", "wrong guess", PC1)
    assert not r.ok and r.locked_for == 30 and r.failures == 5
    # locked: even the right password is not checked, from this PC or (the account is locked) another
    assert gate.login("alice", "correct horse", PC1).locked_for > 0
    assert not gate.login("alice", "correct horse", PC2).ok
    # another account from another PC is not locked
    acc.add("bob", "bobs password", by="root")
    assert gate.login("bob", "bobs password", PC2).ok
    # the PC is locked for every account
    assert not gate.login("bob", "bobs password", PC1).ok
    clock.now += 31
    assert gate.login("alice", "correct horse", PC1).ok
    assert gate.limiter.failures("pc:" + PC1) == 0


def test_nonce_is_one_time_and_bound_to_pc_and_admin():
    clock = Clock()
    book = NonceBook(clock=clock, ttl=60)
    n = book.issue("alice", PC1, "promote", {"image": "lab", "version": "2"})
    assert book.redeem(n, "alice", PC2) is None  # replay from another PC does nothing
    assert book.redeem(n, "bob", PC1) is None  # nor by another admin
    g = book.redeem(n, "alice", PC1)
    assert g is not None and g.action == "promote" and g.arg("version") == "2" and g.arg("image") == "lab"
    assert book.redeem(n, "alice", PC1) is None  # used up
    assert book.redeem("forged-" + n, "alice", PC1) is None


def test_nonce_expires():
    clock = Clock()
    book = NonceBook(clock=clock, ttl=60)
    n = book.issue("alice", PC1, "rollback", {"group": "room1"})
    clock.now += 61
    assert book.redeem(n, "alice", PC1) is None
