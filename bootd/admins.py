"""Admin accounts, password checks with a failure lock-out, and one-time action nonces (issue 17).

Used by the PXE admin menu (bootd/http/admin_menu.py) and meant for a later web dashboard: nothing here
knows about HTTP or iPXE. Accounts live in the state store (hashes only: argon2id via argon2-cffi).
Failure counts and nonces are kept in memory: a restart forgets them, which only drops locks that
would have expired and nonces nobody can redeem any more. Every time comes from an explicit clock, so
tests step it instead of sleeping.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHash, VerificationError, VerifyMismatchError

from bootd.state import StateStore

Clock = Callable[[], float]

NAME_RE = re.compile(r"^[a-z][a-z0-9._-]{0,31}$")  # safe in a URL user part, a log line, an iPXE echo
MIN_PASSWORD = 8
MAX_PASSWORD = 256  # argon2 takes anything; this bounds the work a request can ask for


class AdminError(ValueError):
    """A refused account change, with the reason for the admin."""


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise AdminError(f"bad admin name {name!r}: 1-32 of a-z 0-9 . _ -, starting with a letter")
    return name


ROLES = ("admin", "viewer")  # admin: every action; viewer: reads the dashboard, changes nothing


def check_role(role: str) -> str:
    if role not in ROLES:
        raise AdminError(f"bad role {role!r}: one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise AdminError(f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in password):
        raise AdminError("password must not contain control characters (it is typed at a PC's prompt)")
    return password


class Accounts:
    """Admin accounts in the state store. `hasher` is argon2id with the library's defaults unless a test
    passes a cheaper one."""

    def __init__(self, store: StateStore, hasher: Optional[PasswordHasher] = None):
        self.store = store
        self.hasher = hasher or PasswordHasher()  # argon2id (argon2-cffi's default type)
        # a hash to verify against when the name is unknown, so an unknown name costs as much as a known one
        self._decoy = self.hasher.hash(secrets.token_hex(16))

    def list(self) -> list[dict[str, object]]:
        return self.store.admin_accounts()

    def add(self, name: str, password: str, by: str, role: str = "admin") -> None:
        check_name(name)
        check_role(role)
        if not self.store.add_admin_account(name, self.hasher.hash(check_password(password)), by, role=role):
            raise AdminError(f"admin {name} exists (bootctl admin passwd changes the password)")

    def set_role(self, name: str, role: str) -> None:
        if not self.store.set_admin_role(name, check_role(role)):
            raise AdminError(f"no admin named {name!r}")

    def role(self, name: str) -> Optional[str]:
        """The account's role now (None: no such account): read at every dashboard request, so a
        removed account or a lowered role takes effect at the next click, not at the next login."""
        return self.store.admin_role(name) if NAME_RE.match(name) else None

    def passwd(self, name: str, password: str) -> None:
        if not self.store.set_admin_password_hash(name, self.hasher.hash(check_password(password))):
            raise AdminError(f"no admin named {name!r}")

    def remove(self, name: str) -> None:
        if not self.store.remove_admin_account(name):
            raise AdminError(f"no admin named {name!r}")

    def stored_hash(self, name: str) -> Optional[str]:
        """The account's hash (None: no such account). Read in the caller's thread: the store's
        connection belongs to the event loop; `check` may then run in a worker thread."""
        return self.store.admin_password_hash(name) if NAME_RE.match(name) else None

    def check(self, stored: Optional[str], password: str) -> bool:
        """True when `password` matches `stored`. No account or an over-long password still costs one
        argon2 verification (the decoy hash), so timing tells no names apart. Touches no store."""
        candidate = password if len(password) <= MAX_PASSWORD else ""
        try:
            ok = self.hasher.verify(stored or self._decoy, candidate)
        except (VerifyMismatchError, VerificationError, InvalidHash):
            ok = False
        return ok and stored is not None

    def rehash_if_needed(self, name: str, stored: str, password: str) -> None:
        """After a good login: store a hash with the hasher's current parameters if `stored` is weaker."""
        if self.hasher.check_needs_rehash(stored):
            self.store.set_admin_password_hash(name, self.hasher.hash(password))

    def verify(self, name: str, password: str) -> bool:
        stored = self.stored_hash(name)
        ok = self.check(stored, password)
        if ok and stored is not None:
            self.rehash_if_needed(name, stored, password)
        return ok


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0
    last: float = 0.0


@dataclass(frozen=True)
class LockoutPolicy:
    free_failures: int = 5  # failures before the first lock-out
    first_lockout: float = 30.0  # seconds; doubles with each further failure
    max_lockout: float = 3600.0
    forget_after: float = 86400.0  # a key with no failure for this long starts over


class FailureLimiter:
    """Failure counts per key ('pc:MAC', 'account:NAME'). After `free_failures` failures each further
    one locks the key for first_lockout * 2**(n - free_failures - 1) seconds (capped): the lock-out
    grows. A success clears the keys it names."""

    def __init__(self, clock: Clock = time.time, policy: LockoutPolicy = LockoutPolicy()):
        self.clock = clock
        self.policy = policy
        self._keys: dict[str, _Failures] = {}

    def locked_for(self, keys: list[str]) -> float:
        """Seconds until every key in `keys` is free again (0: none is locked)."""
        now = self.clock()
        return max([self._keys[k].locked_until - now for k in keys if k in self._keys] + [0.0])

    def failed(self, keys: list[str]) -> float:
        """Count a failure on each key; the lock-out it starts (seconds, 0 if none)."""
        now = self.clock()
        self._forget(now)
        longest = 0.0
        for key in keys:
            f = self._keys.setdefault(key, _Failures())
            f.count += 1
            f.last = now
            over = f.count - self.policy.free_failures
            if over >= 0:
                lock = min(self.policy.max_lockout, self.policy.first_lockout * 2 ** over)
                f.locked_until = now + lock
                longest = max(longest, lock)
        return longest

    def failures(self, key: str) -> int:
        return self._keys[key].count if key in self._keys else 0

    def succeeded(self, keys: list[str]) -> None:
        for key in keys:
            self._keys.pop(key, None)

    def _forget(self, now: float) -> None:
        for key in [k for k, f in self._keys.items()
                    if f.locked_until < now and now - f.last > self.policy.forget_after]:
            del self._keys[key]


@dataclass(frozen=True)
class LoginResult:
    ok: bool
    locked_for: float = 0.0  # seconds the PC or account stays locked (a refusal while locked checks nothing)
    failures: int = 0  # the PC's failures so far (for the log line; never the password)


class AdminGate:
    """Password checks for one process, with the per-PC and per-account lock-out."""

    def __init__(self, accounts: Accounts, clock: Clock = time.time, policy: LockoutPolicy = LockoutPolicy()):
        self.accounts = accounts
        self.limiter = FailureLimiter(clock, policy)

    @staticmethod
    def _keys(name: str, pc: str) -> list[str]:
        return [f"pc:{pc}", f"account:{name[:64]}"]

    def locked_for(self, name: str, pc: str) -> float:
        """Seconds the PC or the account stays locked; while locked no password is checked at all."""
        return self.limiter.locked_for(self._keys(name, pc))

    def record(self, name: str, pc: str, ok: bool) -> LoginResult:
        """Count a checked password: a success clears both keys, a failure counts on both."""
        keys = self._keys(name, pc)
        if ok:
            self.limiter.succeeded(keys)
            return LoginResult(True)
        lock = self.limiter.failed(keys)
        return LoginResult(False, lock, self.limiter.failures(keys[0]))

    def login(self, name: str, password: str, pc: str) -> LoginResult:
        """The whole check in the caller's thread (the HTTP handler splits it to verify in a worker)."""
        locked = self.locked_for(name, pc)
        if locked > 0:
            return LoginResult(False, locked, self.limiter.failures(f"pc:{pc}"))
        return self.record(name, pc, self.accounts.verify(name, password))


@dataclass(frozen=True)
class Grant:
    """What a nonce was issued for: an admin's action on one PC."""
    admin: str
    pc: str
    action: str
    args: tuple[tuple[str, str], ...]
    expires: float

    def arg(self, key: str) -> str:
        return dict(self.args).get(key, "")


@dataclass
class NonceBook:
    """One-time tokens for action URLs, each bound to (admin, PC, action, args, expiry). Redeeming
    checks the binding; a nonce works once, and a request from another PC or admin does nothing."""

    clock: Clock = time.time
    ttl: float = 600.0
    max_open: int = 10000  # oldest dropped beyond this: a menu fetched in a loop cannot grow memory
    _open: dict[str, Grant] = field(default_factory=dict)

    def issue(self, admin: str, pc: str, action: str, args: Optional[dict[str, str]] = None) -> str:
        now = self.clock()
        for nonce in [n for n, g in self._open.items() if g.expires <= now]:
            del self._open[nonce]
        while len(self._open) >= self.max_open:
            del self._open[next(iter(self._open))]
        nonce = secrets.token_urlsafe(18)
        self._open[nonce] = Grant(admin, pc, action, tuple(sorted((args or {}).items())), now + self.ttl)
        return nonce

    def redeem(self, nonce: str, admin: str, pc: str) -> Optional[Grant]:
        """The grant if `nonce` is open, unexpired and was issued to this admin on this PC; it is then
        used up. None otherwise (and a nonce presented by another PC or admin stays as it was)."""
        grant = self._open.get(nonce)
        if grant is None or grant.admin != admin or grant.pc != pc:
            return None
        del self._open[nonce]
        return grant if grant.expires > self.clock() else None


# -- bootloader password hashes (pxelinux MENU PASSWD, GRUB password_pbkdf2) ----------------------------
_CRYPT_SALT = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def sha512_crypt(password: str, salt: Optional[str] = None) -> str:
    """A SHA-512 crypt hash ($6$SALT$HASH) for pxelinux's MENU PASSWD: the same as `openssl passwd -6`.
    Python 3.11's crypt module is deprecated (gone in 3.13), hence openssl, which Debian always has."""
    salt = salt or "".join(secrets.choice(_CRYPT_SALT) for _ in range(16))
    out = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"], input=password + "\n",
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def grub_pbkdf2(password: str, salt: Optional[bytes] = None, iterations: int = 10000) -> str:
    """grub-mkpasswd-pbkdf2's format: grub.pbkdf2.sha512.ITERATIONS.SALT.HASH (hex, 64-byte salt and hash)."""
    salt = salt if salt is not None else secrets.token_bytes(64)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"grub.pbkdf2.sha512.{iterations}.{salt.hex().upper()}.{digest.hex().upper()}"
