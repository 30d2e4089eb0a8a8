"""What each dashboard page shows, as plain data for its template: read through the same functions the API's
GET handlers use (bootd/hoststate.py, the snapshot store, status_of, lease_rows), never a second query of
our own."""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

from bootd.hoststate import (
    EVENTS_READ,
    FAILED,
    STATES,
    host_rows,
    latest_boot,
    main_disks,
    with_state,
)
from bootd.http.api_core import status_of
from bootd.http.dhcp_api import lease_rows
from bootd.http.snapshot_api import boot_choices
from bootd.macaddr import parse_mac
from bootd.metrichistory import SERIES, MetricHistory
from snapshots.files import allocated

if TYPE_CHECKING:
    from bootd.daemon import Context

CHART_WIDTH = 640  # px of the timeline's and the throughput plot's drawing area


def rooms_view(ctx: Context, tiles: list[dict]) -> dict[str, Any]:
    """Tiles per room: the config's groups in their order, then PCs in no group ("-")."""
    rooms: dict[str, list[dict]] = {g.name: [] for g in ctx.config.groups}
    for t in sorted(tiles, key=lambda t: (t["name"] or "", t["mac"])):
        rooms.setdefault(t["group"] or "-", []).append(t)
    return {"rooms": [{"name": name, "tiles": ts, "counts": {s: sum(1 for t in ts if t["state"] == s) for s in STATES}}
                      for name, ts in rooms.items()], "states": STATES}


def timeline_chart(boot: list[dict]) -> dict[str, Any]:
    """The latest boot's steps as bars on one time axis: offset and length in px, with what, size, time."""
    if not boot:
        return {"bars": [], "span": 0.0, "width": CHART_WIDTH}
    t0 = float(boot[0]["ts"])
    end = max(float(e.get("last_ts") or e["ts"]) + float(e.get("duration") or 0) for e in boot)
    span = max(end - t0, 0.001)
    bars = []
    for e in boot:
        d = e.get("detail") or {}
        start = float(e["ts"]) - t0
        length = float(e.get("duration") or 0)
        what = str(d.get("path") or d.get("file") or d.get("action") or d.get("step") or "")
        if e["kind"] == FAILED:
            what = str(d.get("reason") or "failed")
        bars.append({"kind": e["kind"], "what": what[:48], "start": round(start, 3), "duration": round(length, 3),
                     "bytes": e.get("nbytes"), "count": e.get("count") or 1, "failed": e["kind"] == FAILED,
                     "x": round(start / span * CHART_WIDTH, 1),
                     "w": round(max(length / span * CHART_WIDTH, 3.0), 1)})
    return {"bars": bars, "span": round(span, 3), "width": CHART_WIDTH, "started": t0}


async def pc_view(ctx: Context, ident: str) -> Optional[dict[str, Any]]:
    """One PC: its state, latest boot as a chart, disks, what it boots of each image and why; None if unknown."""
    mac = parse_mac(ident)
    row = next((r for r in host_rows(ctx) if r["mac"] == mac or r["name"] == ident), None)
    if row is None:
        return None
    mac = row["mac"]
    disks = [d for d in await ctx.disks.list() if d["mac"] == mac] if ctx.disks is not None else []
    host = with_state(ctx, row, main_disks(disks).get(mac))
    events = ctx.store.events(mac, limit=EVENTS_READ)
    store = ctx.snapshots
    group = ctx.planner.settings_for(mac).group
    choices: dict[str, Any] = {"images": []}
    sealed: list[str] = []
    if store is not None:
        choices = boot_choices(store, mac, group)
        sealed = [s.name for s in store.snapshots() if s.sealed]
    return {"host": host, "chart": timeline_chart(latest_boot(events)), "disks": disks, "choices": choices,
            "sealed": sealed, "group": group, "events": events[-30:][::-1]}


def _tree(snaps: list[dict]) -> list[dict]:
    """Snapshots in tree order (each after its parent), with `indent` = its generation in the image."""
    ids = {s["id"] for s in snaps}
    children: dict[Optional[int], list[dict]] = {}
    for s in snaps:
        parent = s["parent_id"] if s["parent_id"] in ids else None
        children.setdefault(parent, []).append(s)
    out: list[dict] = []

    def walk(parent: Optional[int], indent: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s["id"]):
            out.append({**s, "indent": indent})
            walk(s["id"], indent + 1)
    walk(None, 0)
    return out


async def images_view(ctx: Context) -> dict[str, Any]:
    store = ctx.snapshots
    groups = [g.name for g in ctx.config.groups]
    hosts = [{"name": h.name, "mac": h.mac} for h in ctx.config.hosts]
    jobs = [j.to_dict() for j in ctx.snapshot_jobs.list()] if ctx.snapshot_jobs is not None else []
    if store is None:
        return {"images": [], "error": "the snapshot store is not running", "groups": groups, "hosts": hosts,
                "jobs": jobs}
    images = []
    for img in store.images():
        assigned: dict[int, list[str]] = {}
        for a in store.assignments(img["name"]):
            label = {"current": "boots in", "test": "test on", "pin": "pinned on"}.get(a.kind, a.kind)
            target = ctx.config.host_by_mac(a.target)
            assigned.setdefault(a.snapshot_id, []).append(
                f"{label} {'every room' if a.target == '*' else (target.name if target else a.target)}")
        snaps = [{**s.to_dict(), "bytes_on_disk": allocated(s.path), "assigned": assigned.get(s.id, [])}
                 for s in store.snapshots(img["name"])]
        images.append({**img, "tree": _tree(snaps)})
    return {"images": images, "error": None, "groups": groups, "hosts": hosts,
            "jobs": [j for j in jobs if j["state"] in ("running", "queued")]}


def audit_view(ctx: Context, query: Mapping[str, str]) -> dict[str, Any]:
    filters = {k: (query.get(k) or "").strip()[:64] for k in ("actor", "action", "target", "image")}
    if ctx.snapshots is None:
        return {"rows": [], "filters": filters, "error": "the snapshot store is not running"}
    try:
        rows = ctx.snapshots.audit_log(filters["image"] or None, 500, filters["actor"] or None,
                                       filters["action"] or None, filters["target"] or None)
    except Exception as e:  # an unknown image: say so in the page
        return {"rows": [], "filters": filters, "error": str(e)}
    for r in rows:
        host = ctx.config.host_by_mac(r["target"]) if r.get("target") else None
        r["target_name"] = f"{host.name} ({r['target']})" if host else r.get("target")
    return {"rows": rows[::-1], "filters": filters, "error": None}


def throughput_chart(history: dict[str, Any], height: int = 120) -> dict[str, Any]:
    """The last hour per protocol as SVG polylines (x: time, y: bytes/s scaled to the busiest sample)."""
    samples = history.get("samples") or []
    now = time.time()
    peak = max([max(s[k] for k in SERIES) for s in samples] + [1.0])
    lines = {}
    for k in SERIES:
        pts = []
        for s in samples:
            x = CHART_WIDTH - (now - s["at"]) / 3600.0 * CHART_WIDTH
            if x >= 0:
                pts.append(f"{x:.1f},{height - s[k] / peak * (height - 4):.1f}")
        lines[k] = " ".join(pts)
    last = samples[-1] if samples else {k: 0.0 for k in SERIES}
    return {"lines": lines, "peak": peak, "width": CHART_WIDTH, "height": height, "series": SERIES,
            "last": {k: last[k] for k in SERIES}}


async def server_view(ctx: Context) -> dict[str, Any]:
    from bootd.dhcp.server import DhcpService
    status = status_of(ctx)
    dhcp = ctx.service("dhcp")
    leases = lease_rows(dhcp, False, time.time()) if isinstance(dhcp, DhcpService) else []
    history = ctx.service("history")
    chart = throughput_chart(history.history() if isinstance(history, MetricHistory) else {})
    return {"status": status, "leases": leases, "chart": chart}
