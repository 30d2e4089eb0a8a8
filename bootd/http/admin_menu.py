"""Admin accounts over the API (bootctl admin) and the admin menu a PC's iPXE fetches (issue 17).

GET    /api/v1/admins                     the accounts (names and dates; never hashes)
POST   /api/v1/admins                     add {name, password, role? (admin|viewer), actor?}
PATCH  /api/v1/admins/{name}              change the role {role}
PUT    /api/v1/admins/{name}/password     change {password}
DELETE /api/v1/admins/{name}              remove

GET    /boot/admin/{mac}.ipxe             the admin menu for that PC (HTTP Basic: an admin account)
GET    /boot/admin/{mac}/do/{nonce}       run one action of that menu (same credentials; ?note= for seal)

The student menu's "Admin" entry runs iPXE `login` and fetches the admin menu with
http://${username}:${password}@... (HTTP Basic; Debian's iPXE ROM has no HTTPS). Without valid
credentials the answer is a bare 401; a wrong password is answered late and counts toward the PC's
and the account's lock-out (bootd/admins.py). Each action item is a URL with a one-time nonce bound to
the admin, the PC (MAC and address), the action and its arguments; it runs through the snapshot store
and host registry like the API (same refusals), audited as "ADMIN at PC (admin menu)", and answers a
small script that shows the one-line result and returns to the admin menu. Credentials are never
logged, recorded in boot events or put in a menu (the menu refers to iPXE's own settings).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from aiohttp import web

from bootd.admins import Accounts, AdminError, AdminGate, Grant, LockoutPolicy, NonceBook
from bootd.hostregistry import HostNotFound, HostRegistryError, Registry
from bootd.http.app import json_error, read_json
from bootd.http.boot import local_ip
from bootd.macaddr import parse_mac
from bootd.peers import may_act_for, refuse
from pxe.booter import Booter
from pxe.ipxe import _text, render_ipxe, with_credentials
from pxe.menu import clean_text
from snapshots.errors import SnapshotError
from snapshots.model import ALL_GROUPS

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.admin")


class AdminSide:
    """The one set of accounts, lock-out counts and open nonces of this process."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.accounts = Accounts(ctx.store)
        self.gate = AdminGate(self.accounts)
        self.nonces = NonceBook()


ADMIN_KEY: web.AppKey[AdminSide] = web.AppKey("bootd_admin_side", AdminSide)
_SIDES: dict[int, AdminSide] = {}  # id(ctx) -> its AdminSide


def side_for(ctx: Context) -> AdminSide:
    """One AdminSide per daemon, kept across reloads (a reload builds a new app): lock-outs and the
    action links in menus already shown survive a `bootctl reload`."""
    side = _SIDES.get(id(ctx))
    if side is None or side.ctx is not ctx:
        side = _SIDES[id(ctx)] = AdminSide(ctx)
    return side
routes = web.RouteTableDef()


def _side(request: web.Request) -> AdminSide:
    return request.app[ADMIN_KEY]


def _password(body: dict[str, Any]) -> str:
    value = body.get("password")
    if not isinstance(value, str):
        raise json_error(400, "password (a string) is required")
    return value


def _actor(request: web.Request, body: dict[str, Any]) -> str:
    from bootd.http.snapshot_api import actor_of
    return actor_of(request, body)


@routes.get("/api/v1/admins")
async def list_admins(request: web.Request) -> web.Response:
    return web.json_response({"admins": _side(request).accounts.list()})


@routes.post("/api/v1/admins")
async def add_admin(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = body.get("name")
    if not isinstance(name, str):
        raise json_error(400, "name (a string) is required")
    accounts = _side(request).accounts
    try:
        accounts.add(name, _password(body), by=_actor(request, body), role=str(body.get("role") or "admin"))
    except AdminError as e:
        raise json_error(409 if "exists" in str(e) else 400, str(e)) from None
    log.info("admin account %s added by %s", name, _actor(request, body))
    return web.json_response({"name": name}, status=201)


@routes.put("/api/v1/admins/{name}/password")
async def change_password(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = request.match_info["name"]
    try:
        _side(request).accounts.passwd(name, _password(body))
    except AdminError as e:
        raise json_error(404 if "no admin" in str(e) else 400, str(e)) from None
    log.info("admin account %s: password changed by %s", name, _actor(request, body))
    return web.json_response({"name": name})


@routes.patch("/api/v1/admins/{name}")
async def change_role(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = request.match_info["name"]
    role = body.get("role")
    if not isinstance(role, str):
        raise json_error(400, "role (admin or viewer) is required")
    try:
        _side(request).accounts.set_role(name, role)
    except AdminError as e:
        raise json_error(404 if "no admin" in str(e) else 400, str(e)) from None
    log.info("admin account %s: role %s set by %s", name, role, _actor(request, body))
    return web.json_response({"name": name, "role": role})


@routes.delete("/api/v1/admins/{name}")
async def remove_admin(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        _side(request).accounts.remove(name)
    except AdminError as e:
        raise json_error(404, str(e)) from None
    log.info("admin account %s removed by %s", name, _actor(request, dict(request.query)))
    return web.json_response({"name": name, "removed": True})


# -- the admin menu at the PC --------------------------------------------------------------------------
ROOM_WIDE = ("promote", "rollback")  # actions that change what a whole room boots: confirmed in a second menu


def _unauthorized() -> web.Response:
    """401 and nothing else; the challenge makes iPXE send the credentials it was given."""
    return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="bootd admin"',
                                             "Cache-Control": "no-store"})


def _basic(request: web.Request) -> Optional[tuple[str, str]]:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    name, sep, password = decoded.partition(":")
    return (name, password) if sep else None


def _pc_name(ctx: Context, mac: str) -> str:
    host = ctx.config.host_by_mac(mac)
    return f"{host.name} ({mac})" if host is not None else mac


async def _admin_for(request: web.Request, mac: str) -> Optional[str]:
    """The admin whose valid credentials came with the request, else None (the caller answers 401).
    A refusal waits menu.admin_failure_delay and counts toward the lock-out; the log names the PC and, for an
    existing account, its name; never a password."""
    ctx: Context = request.app["ctx"]
    side = _side(request)
    creds = _basic(request)
    if creds is None:
        return None
    menu = ctx.config.menu
    side.gate.limiter.policy = LockoutPolicy(free_failures=menu.admin_lockout_after, first_lockout=menu.admin_lockout)
    name, password = creds
    pc = _pc_name(ctx, mac)
    locked = side.gate.locked_for(name, mac)
    if locked > 0:
        ctx.metrics.inc("admin", "login_refused", reason="locked")
        log.warning("admin login at %s from %s refused: locked for %.0f s more", pc, request.remote, locked,
                    extra={"mac": mac})
        await asyncio.sleep(menu.admin_failure_delay)
        return None
    stored = side.accounts.stored_hash(name)
    ok = await asyncio.to_thread(side.accounts.check, stored, password)
    result = side.gate.record(name, mac, ok)
    if ok and stored is not None:
        side.accounts.rehash_if_needed(name, stored, password)
        if side.accounts.role(name) == "admin":
            return name
        log.warning("admin login at %s from %s refused: %s is a viewer account (read-only, dashboard only)", pc,
                    request.remote, name, extra={"mac": mac})
        ctx.store.record_event(mac, "admin", {"outcome": "viewer refused", "client": request.remote})
        return None
    who = f"account {name}" if stored is not None else "an unknown account name"
    ctx.metrics.inc("admin", "login_refused", reason="password")
    log.warning("admin login at %s from %s refused: wrong password for %s (%d failures from this PC%s)", pc,
                request.remote, who, result.failures,
                f", locked for {result.locked_for:.0f} s" if result.locked_for else "", extra={"mac": mac})
    ctx.store.record_event(mac, "admin", {"outcome": "login refused", "failures": result.failures,
                                          "locked_for": result.locked_for, "client": request.remote})
    await asyncio.sleep(menu.admin_failure_delay)
    return None


def _pc_of(request: web.Request) -> str:
    """The MAC in the path, if the request comes from that PC (403/404 otherwise, before any password)."""
    ctx: Context = request.app["ctx"]
    mac = parse_mac(request.match_info["mac"])
    if mac is None:
        raise web.HTTPNotFound(text="not a MAC address\n")
    if not may_act_for(ctx, request.remote, mac, request.get("site", "boot")):
        refuse(ctx, "http", request.remote, mac, "the admin menu")
        raise web.HTTPForbidden(text="this menu belongs to another host\n")
    return mac


def _binding(mac: str, request: web.Request) -> str:
    """What a nonce is bound to: the PC's MAC and the address it asked from."""
    return f"{mac} {request.remote}"


def _script(lines: list[str]) -> web.Response:
    return web.Response(text="#!ipxe\n" + "\n".join(lines) + "\n", content_type="text/plain",
                        headers={"Cache-Control": "no-store"})


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class MenuAction:
    title: str
    action: str
    args: dict[str, str]
    confirm: str = ""  # room-wide: the question of the confirmation menu
    asks_note: bool = False


def _actions(ctx: Context, mac: str, now: float) -> list[tuple[str, list[MenuAction]]]:
    """The admin menu's sections for this PC: what it may boot once, pin, promote, roll back, maintain, adopt."""
    plan = ctx.planner.plan_for(mac)
    host = plan.settings
    room = host.group
    store = ctx.snapshots
    boot: list[MenuAction] = []
    pc: list[MenuAction] = []
    roomwide: list[MenuAction] = []
    upkeep: list[MenuAction] = []
    if store is not None:
        for image in host.images:
            try:
                snaps = [s for s in store.snapshots(image) if s.state in ("sealed", "draft")]
            except SnapshotError:
                continue
            boots, why = store.boot_choice(mac, room, image)
            current = store.assigned(image, "current", room) if room else None
            current = current or store.assigned(image, "current", ALL_GROUPS)
            for snap in sorted(snaps, key=lambda s: s.id, reverse=True):
                label = f"v{snap.version}" if snap.version is not None else f"draft-{snap.id}"
                marks = [m for m, on in (("boots now", boots is not None and boots.id == snap.id),
                                         ("room current", current is not None and current.id == snap.id)) if on]
                when = snap.sealed_at or snap.created_at
                note = clean_text(snap.note)[:40] or "-"
                text = f"{image} {label} [{', '.join(marks) or snap.state}] {_age(now - when)} ago: {note}"
                boot.append(MenuAction(f"Boot once: {text}", "boot", {"snapshot": str(snap.id)}))
                if snap.state == "sealed":
                    pc.append(MenuAction(f"Pin this PC to {image} {label}", "pin", {"snapshot": str(snap.id)}))
                    if room and not (current is not None and current.id == snap.id):
                        roomwide.append(MenuAction(f"Promote {image} {label} for room {room}", "promote",
                                                   {"snapshot": str(snap.id)},
                                                   confirm=f"Make {image} {label} what all of {room} boots?"))
                else:
                    upkeep.append(MenuAction(f"Seal {image} {label} with a note typed here", "seal",
                                             {"snapshot": str(snap.id)}, asks_note=True))
            if why == "pinned":
                pc.append(MenuAction(f"Unpin this PC ({image})", "unpin", {"image": image}))
            if room and current is not None:
                roomwide.append(MenuAction(f"Roll room {room} back one step ({image})", "rollback", {"image": image},
                                           confirm=f"Roll all of {room} back from {current.name}?"))
            if boots is not None and why != "maintenance":
                upkeep.append(MenuAction(f"Start maintenance: new writable draft of {boots.name}", "maintenance",
                                         {"snapshot": str(boots.id)}))
    adopt: list[MenuAction] = []
    if ctx.config.host_by_mac(mac) is None:
        adopt = [MenuAction(f"Adopt this PC into room {g.name}", "adopt", {"group": g.name}) for g in ctx.config.groups]
    return [("Boot once", boot), ("This PC", pc), (f"Room {room}" if room else "Room", roomwide),
            ("Maintenance", upkeep), ("Unknown PC", adopt)]


def render_admin_menu(ctx: Context, mac: str, admin: str, base: str, link: Callable[[MenuAction], str],
                      now: float) -> list[str]:
    """The admin menu's iPXE lines (without #!ipxe) for this PC. `link(action)` gives each action's URL
    path (a fresh nonce each); the ages are as of `now`. Credentials appear only as iPXE's settings."""
    menu_url = with_credentials(f"{base}/boot/admin/{mac}.ipxe")
    head = [f"# bootd admin menu for {clean_text(_pc_name(ctx, mac))}; rendered per request", ":start",
            f"menu bootd admin {_text(admin)}: {_text(_pc_name(ctx, mac))}"]
    bodies: list[str] = []
    n = 0
    for section, actions in _actions(ctx, mac, now):
        if not actions:
            continue
        head.append(f"item --gap -- {_text(section)}")
        for a in actions:
            n += 1
            key = f"a{n}"
            url = with_credentials(f"{base}{link(a)}")
            head.append(f"item {key} {_text(a.title)}")
            bodies += ["", f":{key}"]
            if a.confirm:
                bodies += [f"menu {_text(a.confirm)}", "item no No, back to the admin menu",
                           f"item yes Yes: {_text(a.title)}", "choose --default no answer || goto start",
                           "iseq ${answer} yes || goto start"]
            if a.asks_note:
                bodies += ["echo -n Note for the sealed snapshot (what changed): ", "read note",
                           "isset ${note} || goto start",
                           f"chain --replace {url}?note=${{note:uristring}} || goto failed"]
            else:
                bodies.append(f"chain --replace {url} || goto failed")
    head += ["item --gap --", "item back Back to the student menu", "item logout Log out (forget the password)",
             "choose --default back choice || goto back", "goto ${choice}"]
    tail = ["", ":back", f"chain --replace {base}/boot/{mac}.ipxe", "",
            ":logout", "clear username", "clear password", "goto back", "",
            ":failed", "echo bootd: the action could not be fetched", "prompt Press any key to return",
            f"chain --replace {menu_url} || goto back"]
    return head + bodies + tail


def _base_url(request: web.Request, ctx: Context) -> str:
    server = local_ip(request) or ctx.config.server_ip or "127.0.0.1"
    host = f"[{server}]" if ":" in server else server
    return f"http://{host}:{ctx.config.http.port}"


@routes.get("/boot/admin/{mac}.ipxe", allow_head=False)
async def admin_menu(request: web.Request) -> web.Response:
    mac = _pc_of(request)
    admin = await _admin_for(request, mac)
    if admin is None:
        return _unauthorized()
    ctx: Context = request.app["ctx"]
    side = _side(request)
    binding = _binding(mac, request)

    def link(a: MenuAction) -> str:
        return f"/boot/admin/{mac}/do/{side.nonces.issue(admin, binding, a.action, a.args)}"
    # in the loop's thread: the nonce book and the state connection belong to it (a few quick queries)
    lines = render_admin_menu(ctx, mac, admin, _base_url(request, ctx), link, time.time())
    ctx.store.record_event(mac, "admin", {"outcome": "menu", "admin": admin, "client": request.remote})
    log.info("admin menu for %s to %s", _pc_name(ctx, mac), admin, extra={"mac": mac})
    return _script(lines)


class ActionRefused(Exception):
    """An action bootd did not do, with the reason shown at the PC."""


async def _run(request: web.Request, mac: str, admin: str, grant: Grant) -> str | web.Response:
    """Do what the grant says, as the API would; the one-line result, or a boot script (boot once)."""
    ctx: Context = request.app["ctx"]
    store = ctx.snapshots
    actor = f"{admin} at {_pc_name(ctx, mac)} (admin menu)"
    reason = "PXE admin menu"
    room = ctx.planner.settings_for(mac).group
    if grant.action == "adopt":
        try:
            row = Registry(ctx).adopt(mac, grant.arg("group"), None, None)
        except (HostRegistryError, HostNotFound) as e:
            raise ActionRefused(str(e)) from None
        dhcp = ctx.service("dhcp")
        if dhcp is not None:
            await dhcp.reload(ctx)
        return f"adopted as {row.name} into room {row.group}"
    if store is None:
        raise ActionRefused("the snapshot store is not running")
    try:
        if grant.action in ("boot", "pin", "promote", "maintenance", "seal"):
            snap = await asyncio.to_thread(store.get, int(grant.arg("snapshot")))
        if grant.action == "boot":
            label = f"v{snap.version}" if snap.version is not None else f"draft-{snap.id}"
            booter = ctx.booter if isinstance(ctx.booter, Booter) else Booter(ctx)
            menu = await booter.boot_once(mac, snap.image, snap.id, label, local_ip(request))
            return web.Response(text=render_ipxe(menu), content_type="text/plain",
                                headers={"Cache-Control": "no-store"})
        if grant.action == "pin":
            await asyncio.to_thread(store.pin, snap.id, mac, actor, reason)
            return f"this PC now boots {snap.name}"
        if grant.action == "unpin":
            await asyncio.to_thread(store.unpin, grant.arg("image"), mac, actor, reason)
            return f"this PC follows room {room or '(none)'} again for {grant.arg('image')}"
        if grant.action in ROOM_WIDE and not room:
            raise ActionRefused("this PC is in no room: promote or roll back with bootctl")
        if grant.action == "promote":
            await asyncio.to_thread(store.promote, snap.id, room, actor, reason)
            return f"room {room} now boots {snap.name}"
        if grant.action == "rollback":
            result = await asyncio.to_thread(store.rollback, grant.arg("image"), room, actor, reason)
            return f"room {room} rolled back: now {result.get('current')}"
        if grant.action == "maintenance":
            draft = await asyncio.to_thread(store.draft, snap.id, actor, reason, mac)
            return f"maintenance: this PC boots {draft.name} (writable) from its menu; seal it here afterwards"
        if grant.action == "seal":
            note = request.query.get("note", "").strip()
            if not note:
                raise ActionRefused("a sealed snapshot needs a note saying what changed")
            if ctx.disks is not None:
                await ctx.disks.end_maintenance(mac, snap.id)
            sealed = await asyncio.to_thread(store.seal, snap.id, clean_text(note)[:200], actor, reason)
            return f"sealed {sealed.name}: {clean_text(note)[:60]}"
    except SnapshotError as e:
        raise ActionRefused(str(e)) from None
    raise ActionRefused(f"unknown action {grant.action}")


@routes.get("/boot/admin/{mac}/do/{nonce}", allow_head=False)
async def admin_action(request: web.Request) -> web.Response:
    mac = _pc_of(request)
    admin = await _admin_for(request, mac)
    if admin is None:
        return _unauthorized()
    ctx: Context = request.app["ctx"]
    base = _base_url(request, ctx)
    back = ["prompt Press any key to return to the admin menu",
            f"chain --replace {with_credentials(f'{base}/boot/admin/{mac}.ipxe')}"]
    grant = _side(request).nonces.redeem(request.match_info["nonce"], admin, _binding(mac, request))
    if grant is None:
        log.warning("admin %s at %s: an unknown, used, expired or foreign action link: nothing done", admin,
                    _pc_name(ctx, mac), extra={"mac": mac})
        ctx.store.record_event(mac, "admin", {"outcome": "stale link", "admin": admin, "client": request.remote})
        return _script(["echo bootd: this action link is used up or expired: nothing done"] + back)
    try:
        result = await _run(request, mac, admin, grant)
    except ActionRefused as e:
        outcome, line = "refused", f"refused: {e}"
    else:
        if isinstance(result, web.Response):  # boot once: the PC boots now
            ctx.store.record_event(mac, "admin", {"outcome": "done", "admin": admin, "action": grant.action,
                                                  "args": dict(grant.args), "client": request.remote})
            log.info("admin %s at %s: boot once %s", admin, _pc_name(ctx, mac), dict(grant.args), extra={"mac": mac})
            return result
        outcome, line = "done", result
    ctx.store.record_event(mac, "admin", {"outcome": outcome, "admin": admin, "action": grant.action,
                                          "args": dict(grant.args), "result": line, "client": request.remote})
    log.info("admin %s at %s: %s %s: %s", admin, _pc_name(ctx, mac), grant.action, dict(grant.args), line,
             extra={"mac": mac})
    return _script([f"echo bootd: {_text(line)}"] + back)


def setup_routes(app: web.Application, ctx: Context) -> None:
    app[ADMIN_KEY] = side_for(ctx)
    app.add_routes(routes)

