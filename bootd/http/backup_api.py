"""Backup API: POST /api/v1/backup {"path": "/abs/file", "force": false} writes a consistent online copy
of state.db (StateStore.backup_to) where the daemon can write; `bootd restore FILE` is the way back."""
from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from bootd.http.app import json_error, read_json
from bootd.state import StateError

if TYPE_CHECKING:
    from bootd.daemon import Context

routes = web.RouteTableDef()


@routes.post("/api/v1/backup")
async def backup(request: web.Request) -> web.Response:
    ctx = request.app["ctx"]
    body = await read_json(request)
    path = body.get("path")
    force = body.get("force", False)
    if not isinstance(path, str) or not path:
        raise json_error(400, "path must name the backup file")
    if not isinstance(force, bool):
        raise json_error(400, "force must be true or false")
    if "\0" in path or not os.path.isabs(path):
        raise json_error(400, f"path must be absolute (the daemon writes it, from its own working directory): {path!r}")
    dest = Path(os.path.normpath(path))
    if ctx.store.dialect != "sqlite":
        raise json_error(409, f"the state is in PostgreSQL ({ctx.store.location}), not a file bootd can copy: "
                              f"back it up with pg_dump (e.g. pg_dump -Fc -f bootd.dump DBNAME)")
    if dest.resolve() in (ctx.store.path.resolve(), Path(f"{ctx.store.path}-wal").resolve(),
                          Path(f"{ctx.store.path}-shm").resolve()):
        raise json_error(400, "the backup cannot replace the live state database")
    if not dest.parent.is_dir():
        raise json_error(400, f"directory {str(dest.parent)!r} does not exist")
    if dest.is_dir():
        raise json_error(400, f"{str(dest)!r} is a directory")
    if dest.exists() and not force:
        raise json_error(409, f"{str(dest)!r} exists (force to overwrite it)")
    try:
        # its own connection in a worker thread: DHCP and the rest keep writing state.db meanwhile
        result = await asyncio.to_thread(ctx.store.backup_to, dest, force)
    except FileExistsError:
        raise json_error(409, f"{str(dest)!r} exists (force to overwrite it)") from None
    except (OSError, StateError) as e:
        ctx.metrics.inc("state", "backup_errors")
        status = {errno.ENOSPC: 507, errno.EACCES: 403, errno.EROFS: 403}.get(getattr(e, "errno", None) or 0, 409)
        raise json_error(status, f"backup failed: {e}") from None
    ctx.metrics.inc("state", "backups")
    return web.json_response(result, status=201)


def setup_routes(app: web.Application, ctx: "Context") -> None:
    app.add_routes(routes)
