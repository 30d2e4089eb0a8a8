"""bootctl status, reload, metrics, hosts, rooms."""
from __future__ import annotations

import argparse
import time

from bootd.cli.api_client import ApiClient, q
from bootd.cli.bootctl import emit, flatten, fmt_age, fmt_number, fmt_time, table


def cmd_status(args: argparse.Namespace, api: ApiClient) -> int:
    st = api.get("/api/v1/status")
    lines = [
        f"bootd {st['version']} (pid {st['pid']}), up {fmt_age(st['uptime'])} since {fmt_time(st['started_at'])}",
        f"config: {st['config_path']}   storage: {st['storage']}   dhcp: {st['dhcp_mode']}",
    ]
    if st["interfaces"]:
        lines += ["interfaces:", table([[i["name"], i["address"], i["state"]] for i in st["interfaces"]],
                                       ["NAME", "ADDRESS", "STATE"])]
    else:
        lines.append("interfaces: none")
    # one row per setting of each running service; nested answers (the TFTP data pump, the NBD
    # gatekeeper's splicer) as dotted names, never as a Python dict
    rows = []
    for s in st["services"]:
        details = flatten({k: v for k, v in s.items() if k != "name"}) or [("-", "-")]
        rows += [[s["name"] if n == 0 else "", key, value] for n, (key, value) in enumerate(details)]
    lines += ["services:", table(rows, ["SERVICE", "SETTING", "VALUE"]) if rows else "  none"]
    lines += [f"WARNING {w}" for w in st.get("warnings", [])]
    if st.get("reload_errors"):
        lines.append("last reload refused:")
        lines += [f"  {e}" for e in st["reload_errors"]]
    emit(args, st, "\n".join(lines))
    return 0


def cmd_reload(args: argparse.Namespace, api: ApiClient) -> int:
    from bootd.cli.api_client import ApiError
    try:
        res = api.post("/api/v1/reload")
    except ApiError as e:
        if e.status == 422 and isinstance(e.data, dict):
            emit(args, e.data, "reload refused, the running config is kept:\n"
                 + "\n".join(f"  {x}" for x in e.data.get("errors", [])))
            return 1
        raise
    emit(args, res, "configuration reloaded")
    return 0


def cmd_metrics(args: argparse.Namespace, api: ApiClient) -> int:
    m = api.get("/api/v1/metrics")
    rows = [[comp, k, fmt_number(v)] for comp, values in sorted(m.items()) for k, v in sorted(values.items())]
    emit(args, m, table(rows, ["COMPONENT", "COUNTER", "VALUE"]) if rows else "no counters yet")
    return 0


def cmd_hosts(args: argparse.Namespace, api: ApiClient) -> int:
    """`bootctl hosts` and `bootctl hosts list`: the table; `bootctl hosts HOST`: one host's boot timeline
    (a host named "list" by its MAC)."""
    if args.host and args.host != "list":
        h = api.get(f"/api/v1/hosts/{q(args.host)}")
        lines = [f"{h['name'] or '-'}  {h['mac']}  ip {h['ip'] or h['last_ip'] or '-'}  group {h['group'] or '-'}"
                 f"  arch {h['arch'] or '-'}  last seen {fmt_time(h['last_seen'])}",
                 f"state {h['state']}  snapshot {h['snapshot'] or '-'}"
                 f"  last boot {fmt_duration(h['last_boot_duration'])}",
                 f"last error: {h['last_error']} ({fmt_time(h['last_error_at'])})" if h["last_error"]
                 else "last error: none"]
        if h.get("chain"):
            lines.append("loader chain: " + " -> ".join(f"{c['step']} {c['path']} ({c['proto']})" for c in h["chain"]))
        servers = h.get("servers") or []
        if len(servers) > 1:
            lines.append("served by: " + ", ".join(servers) + " (several bootd servers: see each event)")
        elif servers:
            lines.append(f"served by: {servers[0]}")
        lines.append("boot timeline:")
        events = h["events"]
        start = None
        for e in events:
            if e["kind"] in ("dhcp", "proxydhcp") and (start is None or e["ts"] - start > 300):
                start = e["ts"]
            start = start if start is not None else e["ts"]
            what = e["detail"].get("reason") or e["detail"].get("path") or e["detail"].get("file") or \
                e["detail"].get("message") or \
                ", ".join(f"{k}={v}" for k, v in sorted(e["detail"].items()))
            size = f"{e['nbytes']} B" if e["nbytes"] is not None else ""
            dur = f"{e['duration'] * 1000:.0f} ms" if e["duration"] is not None else ""
            via = f"  [{e['server']}]" if len(servers) > 1 and e.get("server") else ""
            lines.append(f"  {fmt_time(e['ts'])}  +{e['ts'] - start:7.3f}s  {e['kind']:<9} {what}"
                         f"  {size}  {dur}".rstrip() + via)
        if not events:
            lines.append("  (no boot events yet)")
        emit(args, h, "\n".join(lines))
        return 0
    data = api.get("/api/v1/hosts")
    rows = [[h["name"], h["mac"], h["ip"] or h["last_ip"], h["group"], h["state"], h["snapshot"],
             fmt_duration(h["last_boot_duration"]),
             fmt_age(time.time() - h["last_seen"]) + " ago" if h["last_seen"] else "never",
             h["last_error"] if h["state"] == "failed" else None] for h in data["hosts"]]
    emit(args, data, table(rows, ["NAME", "MAC", "IP", "GROUP", "STATE", "SNAPSHOT", "LAST BOOT", "LAST SEEN",
                                  "ERROR"]) if rows else "no hosts")
    return 0


def cmd_servers(args: argparse.Namespace, api: ApiClient) -> int:
    """`bootctl servers`: the bootd servers on this state database and which one answers DHCP."""
    data = api.get("/api/v1/servers")
    rows = [[s["name"] + (" (this one)" if s["this"] else ""), s["address"], s["pid"],
             "active" if s["dhcp_active"] else "standby" if s["alive"] else "-",
             "up" if s["alive"] else "NO HEARTBEAT", fmt_age(s["heartbeat_age"]) + " ago",
             fmt_time(s["started"])] for s in data["servers"]]
    head = f"state: {data['state']}" + ("" if data["shared_state"] else " (SQLite: this server alone)")
    emit(args, data, head + "\n" + (table(rows, ["NAME", "ADDRESS", "PID", "DHCP", "STATE", "HEARTBEAT", "STARTED"])
                                    if rows else "no servers"))
    return 0


def fmt_duration(seconds: float | None) -> str:
    return f"{seconds:.1f} s" if seconds is not None else "-"


def cmd_rooms(args: argparse.Namespace, api: ApiClient) -> int:
    data = api.get("/api/v1/rooms")
    lines = []
    for r in data["rooms"]:
        st = r["states"]
        up_on = ", ".join(f"{n} on {snap}" for snap, n in sorted(r["up_on"].items()))
        lines.append(f"{r['room']}: {r['hosts']} PCs, {st['up']} up{f' ({up_on})' if up_on else ''}, "
                     f"{st['booting']} booting, {st['failed']} failed, {st['off']} off")
        lines += [f"  failed {f['name'] or f['mac']}: {f['last_error']}" for f in r["failed"]]
    emit(args, data, "\n".join(lines) or "no rooms")
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="what runs, since when, on which interfaces")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("reload", parents=[common], help="re-read the config file (like SIGHUP)")
    p.set_defaults(func=cmd_reload)
    p = sub.add_parser("metrics", parents=[common], help="packet and request counters")
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser("hosts", parents=[common], help="hosts seen and configured (hosts list); with a host, "
                                                       "its boot timeline")
    p.add_argument("host", nargs="?", metavar="list|HOST", help="`list` (the default), or a host name or MAC")
    p.set_defaults(func=cmd_hosts)
    p = sub.add_parser("servers", parents=[common], help="the bootd servers sharing this state database, and "
                                                         "which one answers DHCP")
    p.set_defaults(func=cmd_servers)
    p = sub.add_parser("rooms", aliases=["groups"], parents=[common],
                       help="per room: PCs up on which snapshot, booting, failed (and why), off")
    p.set_defaults(func=cmd_rooms)
