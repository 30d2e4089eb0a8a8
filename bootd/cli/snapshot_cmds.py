"""bootctl image ... and bootctl snapshot ...: the lab admin's view of the snapshot store.

Every change sends the admin's login name and a reason (-m) for the audit log. Long operations (import,
flatten) run as jobs in bootd; bootctl polls them and draws a progress bar on stderr (--no-wait returns
the job at once).
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from typing import Any

from bootd.cli.api_client import ApiClient, ApiError, q
from bootd.cli.bootctl import EXIT_REFUSED, confirmed, emit, fmt_time, table
from bootd.units import human

P = "/api/v1"


def _actor() -> str:
    for var in ("SUDO_USER", "USER", "LOGNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


KERNEL_HELP = ("which kernel of the image's /boot its PCs boot (a release such as 6.1.0-28-amd64, or latest); "
               "for kind: native images, needed when /boot has several")


def _body(args: argparse.Namespace, **extra: object) -> dict[str, object]:
    body = {"actor": _actor(), "reason": getattr(args, "reason", None) or ""}
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def _bar(fraction: float, width: int = 30) -> str:
    done = int(round(fraction * width))
    return "[" + "#" * done + "-" * (width - done) + f"] {fraction * 100:5.1f}%"


def wait_job(args: argparse.Namespace, api: ApiClient, job: dict[str, Any]) -> dict[str, Any]:
    """Poll a job until it ends, drawing a progress bar on stderr (only on a terminal, unless --progress)."""
    show = not args.json and (sys.stderr.isatty() or getattr(args, "progress", False))
    last = -1.0
    while job["state"] == "running":
        if show and job["progress"] != last:
            sys.stderr.write(f"\r{job['kind']} {job['target']}: {_bar(job['progress'])}")
            sys.stderr.flush()
            last = job["progress"]
        time.sleep(0.2)
        job = api.get(f"{P}/snapshot-jobs/{job['id']}")
    if show:
        sys.stderr.write(f"\r{job['kind']} {job['target']}: {_bar(1.0 if job['state'] == 'done' else job['progress'])}"
                         f" {job['state']}\n")
    if job["state"] == "failed":
        raise ApiError(f"{job['kind']} of {job['target']} failed: {job['error']}", job.get("error_status"), job)
    return job


# ---------------------------------------------------------------------------------------- image
def cmd_image_import(args: argparse.Namespace, api: ApiClient) -> int:
    res = api.post(f"{P}/images", _body(args, name=args.name, file=os.path.abspath(args.file), kernel=args.kernel))
    job = res["job"]
    if args.no_wait:
        emit(args, job, f"importing {args.file} as {args.name}: job {job['id']} (bootctl snapshot jobs)")
        return 0
    job = wait_job(args, api, job)
    snap = job["result"]
    kernel = f", boots its own kernel {snap['kernel_release']}" if snap.get("kernel_release") else ""
    emit(args, snap, f"imported {args.file} as {snap['name']} ({human(snap['virtual_size'])} disk{kernel})")
    return 0


def cmd_image_create(args: argparse.Namespace, api: ApiClient) -> int:
    snap = api.post(f"{P}/images", _body(args, name=args.name, size=args.size))
    emit(args, snap, f"created {snap['name']}: an empty {human(snap['virtual_size'])} disk")
    return 0


def cmd_image_list(args: argparse.Namespace, api: ApiClient) -> int:
    res = api.get(f"{P}/images")
    rows = [[i["name"], human(i["virtual_size"]), i["snapshots"], i["drafts"], i["latest"], i["current"],
             i["max_depth"], human(i["bytes_on_disk"])] for i in res["images"]]
    emit(args, res, table(rows, ["IMAGE", "SIZE", "SNAPSHOTS", "DRAFTS", "LATEST", "CURRENT(all)", "MAX-DEPTH",
                                 "ON-DISK"]) if rows else "no images (bootctl image import NAME FILE)")
    return 0


# ---------------------------------------------------------------------------------------- snapshot
def _where(kind: str, target: str) -> str:
    if kind == "current":
        return "current:" + ("all" if target == "*" else target)
    return f"{kind}:{target}"


def cmd_list(args: argparse.Namespace, api: ApiClient) -> int:
    path = f"{P}/snapshots"
    params = []
    if args.image:
        params.append(f"image={q(args.image)}")
    if args.all:
        params.append("all=1")
    if params:
        path += "?" + "&".join(params)
    res = api.get(path)
    used: dict[int, list[str]] = {}
    for a in res["assignments"]:
        used.setdefault(a["snapshot_id"], []).append(_where(a["kind"], a["target"]))
    rows, warnings = [], []
    for s in res["snapshots"]:
        depth = f"{s['depth']}!" if s.get("warnings") else str(s["depth"])
        rows.append([s["id"], s["name"], s["state"], depth, fmt_time(s["sealed_at"] or s["created_at"]),
                     s["sealed_by"] or s["created_by"], ", ".join(used.get(s["id"], [])) or "-", s["note"] or "-"])
        warnings += s.get("warnings", [])
    text = table(rows, ["ID", "SNAPSHOT", "STATE", "DEPTH", "WHEN", "WHO", "USED-BY", "NOTE"]) if rows \
        else "no snapshots"
    if warnings:
        text += "\n" + "\n".join(f"warning: {w}" for w in warnings)
    emit(args, res, text)
    return 0


def cmd_draft(args: argparse.Namespace, api: ApiClient) -> int:
    d = api.post(f"{P}/snapshots/{q(args.ref)}/draft", _body(args, host=args.host))
    text = f"draft {d['name']} (id {d['id']}) on top of {d.get('parent', args.ref)}: {d['path']}"
    if args.host:
        text += f"\nhost {args.host} boots it writable until it is sealed"
    for w in d.get("warnings", []):
        text += f"\nwarning: {w}"
    emit(args, d, text)
    return 0


def cmd_seal(args: argparse.Namespace, api: ApiClient) -> int:
    s = api.post(f"{P}/snapshots/{q(args.ref)}/seal", _body(args, note=args.note, kernel=args.kernel))
    kernel = f" (boots kernel {s['kernel_release']})" if s.get("kernel_release") else ""
    emit(args, s, f"sealed {s['name']}: {s['note']}{kernel}")
    return 0


def cmd_kernel(args: argparse.Namespace, api: ApiClient) -> int:
    s = api.post(f"{P}/snapshots/{q(args.ref)}/kernel", _body(args, kernel=args.kernel))
    emit(args, s, f"{s['name']} boots kernel {s['kernel_release']}")
    return 0


def cmd_test(args: argparse.Namespace, api: ApiClient) -> int:
    if args.end:
        image = args.ref.split("@", 1)[0]
        r = api.post(f"{P}/images/{q(image)}/end-test", _body(args, host=args.host))
        emit(args, r, f"host {r['host']} no longer tests {r['ended']}")
        return 0
    r = api.post(f"{P}/snapshots/{q(args.ref)}/test", _body(args, host=args.host))
    emit(args, r, f"host {r['host']} boots {r['test']} on its next boot (test)")
    return 0


def _not_following(r: dict[str, Any]) -> str:
    """The hosts a promote or rollback does not move (their own test or pin), and how to move them."""
    text = ""
    for h in r.get("hosts_not_following", []):
        who = h["name"] or h["host"]
        undo = (f"bootctl snapshot test {r['image']} {who} --end" if h["kind"] == "test"
                else f"bootctl snapshot unpin {r['image']} {who}")
        what = "tests" if h["kind"] == "test" else "is pinned to"
        text += f"\nnote: host {who} still {what} {h['snapshot']} and keeps booting it (to follow: {undo})"
    return text


def cmd_promote(args: argparse.Namespace, api: ApiClient) -> int:
    r = api.post(f"{P}/snapshots/{q(args.ref)}/promote", _body(args, group=args.group))
    where = "all groups" if r["group"] == "*" else f"group {r['group']}"
    text = f"{r['current']} is now current for {where}" + (f" (was {r['previous']})" if r["previous"] else "")
    text += _not_following(r)
    for w in r.get("warnings", []):
        text += f"\nwarning: {w}"
    emit(args, r, text)
    return 0


def cmd_rollback(args: argparse.Namespace, api: ApiClient) -> int:
    r = api.post(f"{P}/images/{q(args.image)}/rollback", _body(args, group=args.group))
    where = "all groups" if r["group"] == "*" else f"group {r['group']}"
    text = f"rolled back {where} from {r['rolled_back']} to {r['current']}"
    if r.get("follows_all_groups"):
        text += " (it follows the all-groups current again)"
    text += f"; another rollback would go to {r['previous']}" if r.get("previous") else "; no earlier promotion left"
    text += _not_following(r)
    emit(args, r, text)
    return 0


def _unknown_host_warning(api: ApiClient, mac: str) -> str | None:
    """A warning when no host in the config has this MAC and bootd never saw it boot: most likely a typo,
    and the pin or test would wait for a PC that does not exist."""
    try:
        api.get(f"/api/v1/hosts/{q(mac)}")
    except ApiError as e:
        if e.status == 404:
            return f"no configured or seen host has MAC {mac}: check the address (it applies once such a PC boots)"
        raise
    return None


def cmd_pin(args: argparse.Namespace, api: ApiClient) -> int:
    r = api.post(f"{P}/snapshots/{q(args.ref)}/pin", _body(args, host=args.host))
    text = f"host {r['host']} is pinned to {r['pin']}"
    warning = _unknown_host_warning(api, r["host"])
    if warning:
        r["warnings"] = [warning]
        text += f"\nwarning: {warning}"
    emit(args, r, text)
    return 0


def cmd_unpin(args: argparse.Namespace, api: ApiClient) -> int:
    image = args.image.split("@", 1)[0]
    r = api.post(f"{P}/images/{q(image)}/unpin", _body(args, host=args.host))
    emit(args, r, f"host {r['host']} is no longer pinned to {r['ended']}")
    return 0


def cmd_end_maintenance(args: argparse.Namespace, api: ApiClient) -> int:
    image = args.image.split("@", 1)[0]
    r = api.post(f"{P}/images/{q(image)}/end-maintenance", _body(args, host=args.host))
    emit(args, r, f"host {r['host']} no longer boots {r['ended']} (the draft stays; seal or delete it)")
    return 0


def cmd_prune(args: argparse.Namespace, api: ApiClient) -> int:
    if not args.dry_run:
        plan = api.post(f"{P}/images/{q(args.image)}/prune", _body(args, keep=args.keep, dry_run=True))
        if plan["deleted"] and not confirmed(args, f"snapshot prune {args.image}", plan["deleted"]):
            return EXIT_REFUSED
    r = api.post(f"{P}/images/{q(args.image)}/prune", _body(args, keep=args.keep, dry_run=args.dry_run))
    verb = "would delete" if r["dry_run"] else "deleted"
    lines = [f"{verb}: {', '.join(r['deleted']) or 'nothing'}"]
    for name, why in sorted(r["kept"].items()):
        lines.append(f"  kept {name}: {'; '.join(why)}")
    emit(args, r, "\n".join(lines))
    return 0


def cmd_delete(args: argparse.Namespace, api: ApiClient) -> int:
    path = f"{P}/snapshots/{q(args.ref)}?actor={q(_actor())}&reason={q(args.reason or '')}"
    plan = api.delete(path + "&dry_run=1")  # refusals (in use) come here, before any question
    if not confirmed(args, f"snapshot delete {args.ref}", plan["would_delete"]):
        return EXIT_REFUSED
    r = api.delete(path)
    emit(args, r, f"deleted {', '.join(r['deleted'])}")
    return 0


def cmd_flatten(args: argparse.Namespace, api: ApiClient) -> int:
    res = api.post(f"{P}/snapshots/{q(args.ref)}/flatten", _body(args))
    job = res["job"]
    if args.no_wait:
        emit(args, job, f"flattening {job['target']} in the background: job {job['id']} (bootctl snapshot jobs)")
        return 0
    job = wait_job(args, api, job)
    r = job["result"]
    emit(args, r, f"flattened {r['snapshot']}: chain depth {r['old_depth']} -> {r['depth']}")
    return 0


def cmd_history(args: argparse.Namespace, api: ApiClient) -> int:
    h = api.get(f"{P}/images/{q(args.image)}/history?limit={int(args.limit)}")
    lines = ["snapshots:"]
    for s in h["snapshots"]:
        lines.append(f"  {s['name']:<20} {s['state']:<8} depth {s['depth']}"
                     f"  {fmt_time(s['sealed_at'] or s['created_at'])}"
                     f"  {s['sealed_by'] or s['created_by']}  {s['note']}")
    lines.append("assignments:")
    for a in h["assignments"]:
        lines.append(f"  {_where(a['kind'], a['target']):<28} {a['snapshot']:<20} {a['status']:<12} "
                     f"{fmt_time(a['created_at'])}  {a['created_by']}  {a['reason']}")
    lines.append("audit log:")
    for e in h["audit"]:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(e["detail"].items()) if v not in (None, ""))
        lines.append(f"  {fmt_time(e['at'])}  {e['actor']:<22} {e['action']:<12} {e['target'] or '':<18} "
                     f"{e['reason'] or ''}{'  (' + detail + ')' if detail else ''}")
    emit(args, h, "\n".join(lines))
    return 0


def cmd_fsck(args: argparse.Namespace, api: ApiClient) -> int:
    if args.purge_lost_found:
        r = api.post(f"{P}/snapshot-fsck", _body(args, purge_lost_found=True))
        emit(args, r, f"deleted {len(r['purged'])} files from lost+found" +
             "".join(f"\n  {f}" for f in r["purged"]))
        return 0
    r = api.post(f"{P}/snapshot-fsck", {"repair": not args.check_only})
    lines = [f"checked {r['checked']} layers: " + ("files and database agree" if r["clean"] else "found:")]
    for key in ("removed_temp", "orphans_moved", "finished_deletes", "fixed_modes", "fixed_backing",
                "ended_assignments", "problems"):
        for item in r[key]:
            lines.append(f"  {key.replace('_', ' ')}: {item}")
    emit(args, r, "\n".join(lines))
    return 1 if r["problems"] else 0


def cmd_which(args: argparse.Namespace, api: ApiClient) -> int:
    path = f"{P}/snapshot-boot/{q(args.host)}" + (f"?group={q(args.group)}" if args.group else "")
    r = api.get(path)
    def why(i: dict[str, Any]) -> str:
        if i["why"] not in ("test", "pinned", "maintenance"):
            return str(i["why"])
        return f"{i['why']}: not its group's {i.get('group_boots') or 'nothing promoted'} (outlives promote/rollback)"
    rows = [[i["image"], i["snapshot"], why(i), i["previous"]] for i in r["images"]]
    emit(args, r, f"host {r['host']} (group {r['group'] or '-'}):\n" +
         table(rows, ["IMAGE", "BOOTS", "WHY", "ROLLBACK-TO"]))
    return 0


def cmd_jobs(args: argparse.Namespace, api: ApiClient) -> int:
    r = api.get(f"{P}/snapshot-jobs")
    rows = [[j["id"], j["kind"], j["target"], j["state"], f"{j['progress'] * 100:.0f}%", j["actor"],
             j["error"] or ""] for j in r["jobs"]]
    emit(args, r, table(rows, ["JOB", "KIND", "TARGET", "STATE", "PROGRESS", "WHO", "ERROR"]) if rows else "no jobs")
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", common: argparse.ArgumentParser) -> None:
    def reason(p: argparse.ArgumentParser) -> None:
        p.add_argument("-m", "--reason", help="why (kept in the audit log)")

    img = sub.add_parser("image", help="OS images (import, create, list)", parents=[common])
    isub = img.add_subparsers(dest="image_cmd", metavar="ACTION")
    isub.required = True
    p = isub.add_parser("import", help="import a raw or qcow2 disk image as v1 of a new image", parents=[common])
    p.add_argument("name")
    p.add_argument("file", help="raw or qcow2 disk image; bootd reads it, so it is a path on the bootd machine")
    p.add_argument("--no-wait", action="store_true", help="return the job at once")
    p.add_argument("--progress", action="store_true", help="draw the progress bar even when not on a terminal")
    p.add_argument("--kernel", metavar="RELEASE", help=KERNEL_HELP)
    reason(p)
    p.set_defaults(func=cmd_image_import)
    p = isub.add_parser("create", help="a new image whose v1 is an empty disk", parents=[common])
    p.add_argument("name")
    p.add_argument("--size", required=True, help="disk size, e.g. 20G")
    reason(p)
    p.set_defaults(func=cmd_image_create)
    p = isub.add_parser("list", help="images with their latest and current snapshots", parents=[common])
    p.set_defaults(func=cmd_image_list)

    snap = sub.add_parser("snapshot", help="snapshots: draft, seal, test, promote, rollback, pin, prune ...",
                          parents=[common])
    ssub = snap.add_subparsers(dest="snapshot_cmd", metavar="ACTION")
    ssub.required = True
    p = ssub.add_parser("list", help="snapshots, their state, chain depth and who uses them", parents=[common])
    p.add_argument("image", nargs="?")
    p.add_argument("--all", action="store_true", help="include deleted snapshots")
    p.set_defaults(func=cmd_list)
    p = ssub.add_parser("draft", help="a writable layer on top of a snapshot (REF: IMAGE@vN, IMAGE, ID)",
                        parents=[common])
    p.add_argument("ref")
    p.add_argument("--host", help="MAC or host name that boots the draft writable (maintenance)")
    reason(p)
    p.set_defaults(func=cmd_draft)
    p = ssub.add_parser("seal", help="turn a draft into an immutable snapshot", parents=[common])
    p.add_argument("ref", help="the draft: IMAGE@draft-ID or ID")
    p.add_argument("-n", "--note", required=True, help="what changed in this snapshot")
    p.add_argument("--kernel", metavar="RELEASE", help=KERNEL_HELP)
    reason(p)
    p.set_defaults(func=cmd_seal)
    p = ssub.add_parser("kernel", help="read a sealed snapshot's kernel again from its own /boot (kind: native "
                        "images): pick another of its kernels, or restore lost boot files", parents=[common])
    p.add_argument("ref")
    p.add_argument("--kernel", metavar="RELEASE", help=KERNEL_HELP)
    reason(p)
    p.set_defaults(func=cmd_kernel)
    p = ssub.add_parser("test", help="boot a snapshot on one host only", parents=[common])
    p.add_argument("ref")
    p.add_argument("host", help="MAC or host name")
    p.add_argument("--end", action="store_true", help="end the test of REF's image on HOST")
    reason(p)
    p.set_defaults(func=cmd_test)
    p = ssub.add_parser("promote", help="make a snapshot current for a group (default: all groups)",
                        parents=[common])
    p.add_argument("ref")
    p.add_argument("--group", help="group (room) name; omit for all groups")
    reason(p)
    p.set_defaults(func=cmd_promote)
    p = ssub.add_parser("rollback", help="make the previously promoted snapshot current again", parents=[common])
    p.add_argument("image")
    p.add_argument("--group", help="group (room) name; omit for all groups")
    reason(p)
    p.set_defaults(func=cmd_rollback)
    p = ssub.add_parser("pin", help="a host boots this snapshot whatever its group's current is", parents=[common])
    p.add_argument("ref")
    p.add_argument("host")
    reason(p)
    p.set_defaults(func=cmd_pin)
    p = ssub.add_parser("unpin", help="a pinned host follows its group again", parents=[common])
    p.add_argument("image")
    p.add_argument("host")
    reason(p)
    p.set_defaults(func=cmd_unpin)
    p = ssub.add_parser("end-maintenance", help="a maintenance host stops booting its draft", parents=[common])
    p.add_argument("image")
    p.add_argument("host")
    reason(p)
    p.set_defaults(func=cmd_end_maintenance)
    p = ssub.add_parser("prune", help="delete old snapshots nothing uses", parents=[common])
    p.add_argument("image")
    p.add_argument("--keep", type=int, required=True, help="how many of the newest snapshots to keep")
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    p.add_argument("--yes", action="store_true", help="go ahead without asking (else: list what goes, ask at a TTY)")
    reason(p)
    p.set_defaults(func=cmd_prune)
    p = ssub.add_parser("delete", help="delete one snapshot or draft (refused while in use)", parents=[common])
    p.add_argument("ref")
    p.add_argument("--yes", action="store_true", help="go ahead without asking (else: list what goes, ask at a TTY)")
    reason(p)
    p.set_defaults(func=cmd_delete)
    p = ssub.add_parser("flatten", help="rewrite a snapshot as a standalone layer (background)", parents=[common])
    p.add_argument("ref")
    p.add_argument("--no-wait", action="store_true")
    p.add_argument("--progress", action="store_true", help="draw the progress bar even when not on a terminal")
    reason(p)
    p.set_defaults(func=cmd_flatten)
    p = ssub.add_parser("history", help="snapshots, assignments and audit log of an image", parents=[common])
    p.add_argument("image")
    p.add_argument("--limit", type=int, default=200)
    p.set_defaults(func=cmd_history)
    p = ssub.add_parser("fsck", help="make files and database agree (also run at start-up)", parents=[common])
    p.add_argument("--check-only", action="store_true", help="report, change nothing")
    p.add_argument("--purge-lost-found", action="store_true",
                   help="delete the unreferenced files fsck moved to lost+found/")
    reason(p)
    p.set_defaults(func=cmd_fsck)
    p = ssub.add_parser("which", help="what a host boots of each image, and why", parents=[common])
    p.add_argument("host")
    p.add_argument("--group", help="assume this group (default: the host's group in the config)")
    p.set_defaults(func=cmd_which)
    p = ssub.add_parser("jobs", help="background imports and flattens", parents=[common])
    p.set_defaults(func=cmd_jobs)
