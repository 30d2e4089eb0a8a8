"""bootctl client render HOST, bootctl clientroot build DIR, bootctl clientroot exports."""
from __future__ import annotations

import argparse
import sys

from bootd.cli.api_client import ApiClient, q
from bootd.cli.bootctl import emit
from bootd.units import human


def cmd_client_render(args: argparse.Namespace, api: ApiClient) -> int:
    data = api.get(f"/api/v1/clients/{q(args.host)}/render", document=True)  # files keep their lines
    files = data["files"]
    if args.file:
        if args.file not in files:
            print(f"bootctl: no file {args.file!r} for {data['mac']} (have: {', '.join(files)})", file=sys.stderr)
            return 1
        emit(args, {args.file: files[args.file]}, files[args.file].rstrip("\n"))
        return 0
    lines = [f"# host {data['name'] or '-'} ({data['mac']}): {len(data['instances'])} instances, "
             f"{len(files)} files"]
    for inst in data["instances"]:
        lines.append(f"#   {inst['n']}: {inst['name']} on vt{inst['vt']} display {inst['display']} "
                     f"{inst['protocol']}:{inst['port']} disk {inst['disk']} ({inst['format']}, "
                     f"cache {inst['cache']}, from {inst['disk_source']})")
    for name in data.get("names") or list(files):
        lines += ["", f"==> {name} <==", files[name].rstrip("\n")]
    emit(args, data, "\n".join(lines))
    return 0


def cmd_clientroot_build(args: argparse.Namespace, api: ApiClient) -> int:
    """Runs here, not in the daemon: debootstrap needs a minute and root, and shows its progress."""
    from bootd.clientconfig.clientroot import build_client_root
    try:
        summary = build_client_root(args.target, suite=args.suite, mirror=args.mirror, cache_dir=args.cache_dir,
                                    image=args.image, image_size=args.size,
                                    progress=(lambda s: None) if args.json else (lambda s: print(s, flush=True)))
    except RuntimeError as e:
        print(f"bootctl: {e}", file=sys.stderr)
        return 1
    text = (f"client root ready in {summary['target']}: {human(summary['bytes'])} of files, kernel "
            f"{summary['kernel'] or '-'}, in {summary['seconds']:.0f} s")
    if summary["image"]:
        text += (f"\nimage {summary['image']} ({human(summary['image_bytes'])}): import it as a native image, "
                 f"e.g. `bootctl image import clientroot {summary['image']}`, then test, promote and roll it back "
                 "like any image")
    emit(args, summary, text)
    return 0


def cmd_clientroot_exports(args: argparse.Namespace, api: ApiClient) -> int:
    st = api.get("/api/v1/status")
    nfs = next((s for s in st["services"] if s["name"] == "nfs"), None)
    if nfs is None:
        emit(args, {}, "the nfs service is not running")
        return 1
    info = {k: v for k, v in nfs.items() if k != "name"}
    if "error" in info:
        emit(args, info, f"NFS exports not applied: {info['error']}")
        return 1
    lines = [f"server: {info.get('server', '-')}  file: {info.get('file') or '-'}",
             "exports: " + (", ".join(info.get("exports", [])) or "none")]
    for where, state in (info.get("check") or {}).items():
        lines.append(f"  {where}: {state}")
    emit(args, info, "\n".join(lines))
    return 0 if all(v == "ok" for v in (info.get("check") or {}).values()) else 1


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("client", parents=[common], help="what a client boots into (rendered jobs/units)")
    s = p.add_subparsers(dest="client_cmd", metavar="ACTION")
    s.required = True
    r = s.add_parser("render", parents=[common], help="print a host's rendered qemuinstance/xserver/viewer files")
    r.add_argument("host", help="MAC or configured host name")
    r.add_argument("--file", help="print only this file (e.g. qemuinstance1.service)")
    r.set_defaults(func=cmd_client_render)

    p = sub.add_parser("clientroot", parents=[common], help="the client root (minimal Linux over NFS)")
    s = p.add_subparsers(dest="clientroot_cmd", metavar="ACTION")
    s.required = True
    b = s.add_parser("build", parents=[common], help="debootstrap a client root with QEMU, X, a VNC viewer, nbd-client")
    b.add_argument("target", help="directory to create (must not exist or be empty)")
    b.add_argument("--suite", default="bookworm")
    b.add_argument("--mirror", default=None, help="Debian mirror (default: the one apt uses here)")
    b.add_argument("--image", default=None, metavar="FILE.qcow2",
                   help="also make the root as a disk image (ext4, qcow2) to import as a kind: native image")
    b.add_argument("--size", default="3G", help="the image's virtual size (default 3G)")
    b.add_argument("--cache-dir", default=None, help="keep downloaded packages here for the next build")
    b.set_defaults(func=cmd_clientroot_build)
    e = s.add_parser("exports", parents=[common], help="NFS exports of the client roots and whether they answer")
    e.set_defaults(func=cmd_clientroot_exports)
