"""HTTP API of the snapshot store: images, snapshots, their lifecycle, background jobs and fsck.

Every change records who did it: the `actor` the client claims (bootctl sends the login name) together
with the peer's uid from SO_PEERCRED on the Unix socket, or the peer address on the TCP API.
Store calls run in a worker thread so qemu-img never blocks the boot traffic on the event loop.
"""
from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import unquote

from aiohttp import web

from bootd.http.app import read_json
from bootd.macaddr import parse_mac
from bootd.seams import SnapshotJobs, Snapshots
from snapshots.errors import SnapshotError
from snapshots.model import ALL_GROUPS, FsckReport, Snapshot

if TYPE_CHECKING:
    from bootd.daemon import Context

P = "/api/v1"


def _err(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _store(request: web.Request) -> Snapshots:
    store: Snapshots | None = request.app["ctx"].snapshots
    if store is None:
        raise web.HTTPServiceUnavailable(text='{"error": "the snapshot store is not running"}',
                                         content_type="application/json")
    return store


def _jobs(request: web.Request) -> SnapshotJobs:
    jobs: SnapshotJobs | None = request.app["ctx"].snapshot_jobs
    if jobs is None:
        raise web.HTTPServiceUnavailable(text='{"error": "the snapshot store is not running"}',
                                         content_type="application/json")
    return jobs


def actor_of(request: web.Request, body: dict[str, Any]) -> str:
    """`alice (uid 1000)`: the claimed name plus what the kernel says about the peer; on the dashboard's
    listener the logged-in account, whatever the body claims: `alice (dashboard, via 10.0.0.9)`."""
    if request.get("ui_user"):
        return f"{request['ui_user']} (dashboard, via {request['client_ip']})"
    claimed = str(body.get("actor") or "").strip()[:64] or "unknown"
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            return f"{claimed} (uid {uid})"
        except OSError:
            return claimed
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{claimed} (via {peer[0]})" if peer else claimed


def _host(request: web.Request, value: object) -> str:
    """A MAC, or a host name from the config, -> MAC."""
    if not value:
        raise SnapshotError("a host (MAC address or config host name) is required")
    mac = parse_mac(str(value))
    if mac:
        return mac
    ctx: Context = request.app["ctx"]
    h = ctx.config.host_by_name(str(value))
    if h is None:
        raise SnapshotError(f"{value!r} is neither a MAC address nor a host name in the config")
    return h.mac


def _group(request: web.Request, value: object) -> str:
    """A config group name, or None/'*'/'all' for every group."""
    if value in (None, "", ALL_GROUPS, "all"):
        return ALL_GROUPS
    cfg = request.app["ctx"].config
    if cfg.group(str(value)) is None:
        known = ", ".join(g.name for g in cfg.groups) or "none configured"
        raise SnapshotError(f"no group {value!r} in the config (groups: {known}; omit --group for all groups)")
    return str(value)


def _ref(request: web.Request) -> str:
    return unquote(request.match_info["ref"])


async def _call(fn: Callable[..., object], *args: object, status: int = 200, **kw: object) -> web.Response:
    try:
        result = await asyncio.to_thread(fn, *args, **kw)
    except SnapshotError as exc:
        return _err(exc.status, str(exc))
    if isinstance(result, (Snapshot, FsckReport)):  # the store's records: shown as their dicts
        result = result.to_dict()
    return web.json_response(result, status=status)


def _answer(resp: web.Response) -> dict[str, Any]:
    """The JSON object of one of these handlers' own answers (to add to it before it goes out)."""
    body = resp.body
    if not isinstance(body, (bytes, bytearray)):
        raise TypeError("a JSON answer has a bytes body")
    return dict(json.loads(body))


def _with_warnings(store: Snapshots, snap_dict: dict[str, Any]) -> dict[str, Any]:
    if snap_dict.get("depth", 1) > store.depth_warning:
        snap_dict["warnings"] = [f"chain of {snap_dict['depth']} layers (more than {store.depth_warning}): "
                                 f"reads get slower; run bootctl snapshot flatten {snap_dict['name']}"]
    return snap_dict


# ---------------------------------------------------------------------------------------- images
async def list_images(request: web.Request) -> web.Response:
    store = _store(request)
    return await _call(lambda: {"images": store.images()})


async def create_image(request: web.Request) -> web.Response:
    store = _store(request)
    body = await read_json(request)
    actor = actor_of(request, body)
    name, reason = str(body.get("name") or ""), str(body.get("reason") or "")
    if body.get("file"):
        file = str(body["file"])
        try:  # refuse bad input at once, not in a job the admin has to poll
            await asyncio.to_thread(store.check_new_image, name)
            from snapshots import qemu
            await asyncio.to_thread(qemu.check_importable, file)
        except SnapshotError as exc:
            return _err(exc.status, str(exc))
        kernel = str(body["kernel"]) if body.get("kernel") else None
        job = _jobs(request).start("import", name, actor, lambda progress: store.import_image(
            name, file, actor, reason, progress, kernel).to_dict())
        return web.json_response({"job": job.to_dict()}, status=202)
    if body.get("size"):
        return await _call(store.create_image, name, body["size"], actor, reason, status=201)
    return _err(400, "give either file (a raw or qcow2 disk image to import) or size (an empty disk)")


async def image_detail(request: web.Request) -> web.Response:
    store = _store(request)
    name = request.match_info["name"]

    def detail() -> dict[str, object]:
        snaps = [_with_warnings(store, s.to_dict()) for s in store.snapshots(name)]
        return {"image": name, "snapshots": snaps,
                "assignments": [a.to_dict() for a in store.assignments(name)]}
    return await _call(detail)


async def image_history(request: web.Request) -> web.Response:
    store = _store(request)
    limit = int(request.query.get("limit", "200"))
    return await _call(store.history, request.match_info["name"], limit)


async def rollback(request: web.Request) -> web.Response:
    store = _store(request)
    body = await read_json(request)
    try:
        group = _group(request, body.get("group"))
    except SnapshotError as exc:
        return _err(exc.status, str(exc))
    return _hosts_not_following(request, await _call(store.rollback, request.match_info["name"], group,
                                                     actor_of(request, body), str(body.get("reason") or "")))


Unassign = Callable[[str, str, str, str], dict[str, Any]]  # (image, host MAC, actor, reason) -> what changed


async def _unassign(request: web.Request, method: Callable[[Snapshots], Unassign]) -> web.Response:
    store = _store(request)
    body = await read_json(request)
    try:
        host = _host(request, body.get("host"))
    except SnapshotError as exc:
        return _err(exc.status, str(exc))
    return await _call(method(store), request.match_info["name"], host, actor_of(request, body),
                       str(body.get("reason") or ""))


async def unpin(request: web.Request) -> web.Response:
    return await _unassign(request, lambda store: store.unpin)


async def end_test(request: web.Request) -> web.Response:
    return await _unassign(request, lambda store: store.end_test)


async def end_maintenance(request: web.Request) -> web.Response:
    """The host no longer boots the draft, and its export of the draft goes now: `seal` works at once."""
    resp = await _unassign(request, lambda store: store.end_maintenance)
    disks = request.app["ctx"].disks
    if resp.status != 200 or disks is None:
        return resp
    result = _answer(resp)
    result["released"] = await disks.end_maintenance(result["host"], result.get("snapshot_id"))
    return web.json_response(result)


async def prune(request: web.Request) -> web.Response:
    store = _store(request)
    body = await read_json(request)
    try:
        keep = int(body.get("keep", ""))  # missing: "" is no whole number either
    except (TypeError, ValueError):
        return _err(400, "keep (how many of the newest snapshots to keep) must be a whole number")
    return await _call(store.prune, request.match_info["name"], keep, actor_of(request, body),
                       str(body.get("reason") or ""), bool(body.get("dry_run")))


# ---------------------------------------------------------------------------------------- snapshots
async def list_snapshots(request: web.Request) -> web.Response:
    store = _store(request)
    image = request.query.get("image") or None
    include_deleted = request.query.get("all") in ("1", "true", "yes")

    def listing() -> dict[str, object]:
        return {"snapshots": [_with_warnings(store, s.to_dict()) for s in store.snapshots(image, include_deleted)],
                "assignments": [a.to_dict() for a in store.assignments(image)]}
    return await _call(listing)


async def snapshot_detail(request: web.Request) -> web.Response:
    store = _store(request)

    def detail() -> dict[str, Any]:
        s = store.resolve(_ref(request))
        d = _with_warnings(store, s.to_dict())
        d["in_use"] = store.usage(s)
        return d
    return await _call(detail)


async def draft(request: web.Request) -> web.Response:
    store = _store(request)
    body = await read_json(request)
    try:
        host = _host(request, body["host"]) if body.get("host") else None
    except SnapshotError as exc:
        return _err(exc.status, str(exc))

    def run() -> dict[str, Any]:
        d = store.draft(_ref(request), actor_of(request, body), str(body.get("reason") or ""), host=host)
        out = _with_warnings(store, d.to_dict())
        out["parent"] = store.get(d.parent_id).name if d.parent_id is not None else None
        return out
    return await _call(run, status=201)


async def seal(request: web.Request) -> web.Response:
    store = _store(request)
    body = await read_json(request)
    note = str(body.get("note") or "").strip()
    if not note:
        return _err(400, "a sealed snapshot needs a note saying what changed (--note)")
    kernel = str(body["kernel"]) if body.get("kernel") else None
    return await _call(store.seal, _ref(request), note, actor_of(request, body), str(body.get("reason") or ""),
                       kernel)


async def set_kernel(request: web.Request) -> web.Response:
    """Read a sealed snapshot's kernel again from its own /boot (another of its kernels, or lost files)."""
    store = _store(request)
    body = await read_json(request)
    kernel = str(body["kernel"]) if body.get("kernel") else None
    return await _call(store.set_kernel, _ref(request), kernel, actor_of(request, body), str(body.get("reason") or ""))


Assign = Callable[[str, str, str, str], dict[str, Any]]  # (snapshot ref, host MAC or group, actor, reason)


def _assign(name: str, method: Callable[[Snapshots], Assign],
            target_key: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler assigning the snapshot in the path to a host (test, pin) or a group (promote)."""
    resolve_target = _host if target_key == "host" else _group

    async def handler(request: web.Request) -> web.Response:
        store = _store(request)
        body = await read_json(request)
        try:
            target = resolve_target(request, body.get(target_key))
        except SnapshotError as exc:
            return _err(exc.status, str(exc))
        return await _call(method(store), _ref(request), target, actor_of(request, body),
                           str(body.get("reason") or ""))
    handler.__name__ = name
    return handler


test_on_host = _assign("test", lambda store: store.test, "host")
pin = _assign("pin", lambda store: store.pin, "host")
_promote = _assign("promote", lambda store: store.promote, "group")


def _hosts_not_following(request: web.Request, resp: web.Response) -> web.Response:
    """A promote's or rollback's answer names the hosts of that group (every host: all groups) that keep
    booting their own test or pinned snapshot, with their config names."""
    if resp.status != 200:
        return resp
    result = _answer(resp)
    ctx: Context = request.app["ctx"]
    group = result.get("group")
    kept = []
    for h in result.get("hosts_not_following", []):
        if group not in (None, ALL_GROUPS) and ctx.planner.settings_for(h["host"]).group != group:
            continue
        cfg = ctx.config.host_by_mac(h["host"])
        kept.append({**h, "name": cfg.name if cfg is not None else None})
    result["hosts_not_following"] = kept
    return web.json_response(result)


async def promote(request: web.Request) -> web.Response:
    return _hosts_not_following(request, await _promote(request))


async def delete(request: web.Request) -> web.Response:
    store = _store(request)
    body = dict(request.query)
    dry_run = body.get("dry_run", "") not in ("", "0", "false")  # only the checks and what would go
    return await _call(store.delete, _ref(request), actor_of(request, body), str(body.get("reason") or ""), dry_run)


async def flatten(request: web.Request) -> web.Response:
    store = _store(request)
    body = await read_json(request)
    actor, reason, ref = actor_of(request, body), str(body.get("reason") or ""), _ref(request)
    try:  # refuse at once what would fail: a draft, a standalone layer, an unknown ref
        snap = await asyncio.to_thread(store.resolve, ref)
        if snap.state != "sealed" or snap.backing_id is None:
            await asyncio.to_thread(store.flatten, snap.id, actor, reason)  # raises the refusal
    except SnapshotError as exc:
        return _err(exc.status, str(exc))
    job = _jobs(request).start("flatten", snap.name, actor,
                               lambda progress: store.flatten(snap.id, actor, reason, progress))
    return web.json_response({"job": job.to_dict()}, status=202)


async def boot_choice(request: web.Request) -> web.Response:
    """What one host boots of each image, and why (pin, test, group or all groups)."""
    store = _store(request)
    planner = request.app["ctx"].planner
    try:
        mac = _host(request, unquote(request.match_info["host"]))
    except SnapshotError as exc:
        return _err(exc.status, str(exc))
    group = request.query.get("group") or planner.settings_for(mac).group  # the boot plan's group
    return await _call(boot_choices, store, mac, group)


def boot_choices(store: Snapshots, mac: str, group: Optional[str]) -> dict[str, object]:
    """What `mac` (in `group`) boots of each image and why (the API above, the dashboard's PC page)."""
    out = []
    for img in store.images():
        snap, why = store.boot_choice(mac, group, img["name"])
        prev = store.previous_for(group, img["name"]) if group else None
        # a test, pin or maintenance outlives promotes and rollbacks: say what the group boots instead
        own = why in ("test", "pinned", "maintenance")
        grp = ((store.assigned(img["name"], "current", group) if group else None)
               or store.assigned(img["name"], "current", ALL_GROUPS)) if own else None
        out.append({"image": img["name"], "snapshot": snap.name if snap else None,
                    "snapshot_id": snap.id if snap else None, "why": why,
                    "previous": prev.name if prev else None,
                    "group_boots": grp.name if grp else None})
    return {"host": mac, "group": group, "images": out}


# ---------------------------------------------------------------------------------------- jobs, fsck
async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response({"jobs": [j.to_dict() for j in _jobs(request).list()]})


async def job_detail(request: web.Request) -> web.Response:
    try:
        job = _jobs(request).get(int(request.match_info["id"]))
    except ValueError:
        job = None
    if job is None:
        return _err(404, f"no job {request.match_info['id']} (jobs are kept until bootd restarts)")
    return web.json_response(job.to_dict())


async def fsck(request: web.Request) -> web.Response:
    store = _store(request)
    body = await read_json(request)
    repair = body.get("repair", True) is not False
    if body.get("purge_lost_found"):
        actor, reason = actor_of(request, body), str(body.get("reason") or "")
        return await _call(lambda: {"purged": store.purge_lost_found(actor, reason)})
    return await _call(store.fsck, repair)


def setup_routes(app: web.Application, ctx: Context) -> None:
    r = app.router
    r.add_get(f"{P}/images", list_images)
    r.add_post(f"{P}/images", create_image)
    r.add_get(P + "/images/{name}", image_detail)
    r.add_get(P + "/images/{name}/history", image_history)
    r.add_post(P + "/images/{name}/rollback", rollback)
    r.add_post(P + "/images/{name}/unpin", unpin)
    r.add_post(P + "/images/{name}/end-test", end_test)
    r.add_post(P + "/images/{name}/end-maintenance", end_maintenance)
    r.add_post(P + "/images/{name}/prune", prune)
    r.add_get(f"{P}/snapshots", list_snapshots)
    r.add_get(P + "/snapshots/{ref}", snapshot_detail)
    r.add_delete(P + "/snapshots/{ref}", delete)
    r.add_post(P + "/snapshots/{ref}/draft", draft)
    r.add_post(P + "/snapshots/{ref}/seal", seal)
    r.add_post(P + "/snapshots/{ref}/kernel", set_kernel)
    r.add_post(P + "/snapshots/{ref}/test", test_on_host)
    r.add_post(P + "/snapshots/{ref}/pin", pin)
    r.add_post(P + "/snapshots/{ref}/promote", promote)
    r.add_post(P + "/snapshots/{ref}/flatten", flatten)
    r.add_get(P + "/snapshot-boot/{host}", boot_choice)
    r.add_get(f"{P}/snapshot-jobs", list_jobs)
    r.add_get(P + "/snapshot-jobs/{id}", job_detail)
    r.add_post(f"{P}/snapshot-fsck", fsck)
