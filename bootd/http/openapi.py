"""GET /api/v1/openapi.json: the admin API described as OpenAPI 3.1, built from the routes the server really
has (so it cannot miss one or describe one that is gone): each operation's summary is the first line of
its handler's docstring, its path parameters come from the route, and every error is the same
`{"error": reason}` object.

Access: the Unix socket, the TCP API (bearer token) and the dashboard's listener (its session cookie and,
for every change, the X-CSRF-Token header), as the description's security schemes say.
"""
from __future__ import annotations

import inspect
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bootd import __version__

if TYPE_CHECKING:
    from bootd.daemon import Context

routes = web.RouteTableDef()
PREFIX = "/api/v1/"
_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
_BODY_METHODS = ("POST", "PUT", "PATCH")
_ERRORS = {"400": "bad input (the reason says which)", "401": "not logged in / no token",
           "403": "not allowed (viewer account, missing CSRF token)", "404": "no such thing",
           "409": "refused by the current state (the reason says why)"}


def _summary(handler: Any, method: str, path: str) -> tuple[str, str]:
    doc = inspect.getdoc(handler) or ""
    first, _, rest = doc.partition("\n")
    name = getattr(handler, "__name__", "") or f"{method.lower()} {path}"
    return (first.strip() or name.replace("_", " ")), rest.strip()


def describe(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of `app`'s /api/v1 routes."""
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = str(info.get("formatter") or info.get("path") or "")
        method = route.method.upper()
        if not path.startswith(PREFIX) or method in ("HEAD", "*", "OPTIONS"):
            continue
        oa_path = _PARAM.sub(lambda m: "{" + m.group(1) + "}", path)
        summary, description = _summary(route.handler, method, path)
        op: dict[str, Any] = {
            "operationId": f"{method.lower()}_{re.sub(r'[^a-z0-9]+', '_', oa_path[len(PREFIX):].lower()).strip('_')}",
            "summary": summary,
            "tags": [oa_path[len(PREFIX):].split("/")[0]],
            "parameters": [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                           for p in _PARAM.findall(path)],
            "responses": {"200": {"description": "done", "content": {"application/json": {"schema": {
                "type": "object"}}}},
                          **{code: {"description": text, "content": {"application/json": {"schema": {
                              "$ref": "#/components/schemas/Error"}}}} for code, text in _ERRORS.items()}},
        }
        if description:
            op["description"] = description
        if method in _BODY_METHODS:
            op["requestBody"] = {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}
            op["security"] = [{"unixSocket": []}, {"bearer": []}, {"session": [], "csrf": []}]
        paths.setdefault(oa_path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "bootd admin API", "version": __version__,
                 "description": "What bootctl, the web dashboard and the PXE admin menu use. Changes are "
                                "audited with the caller as actor."},
        "servers": [{"url": "/"}],
        "security": [{"unixSocket": []}, {"bearer": []}, {"session": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": {"Error": {"type": "object", "required": ["error"],
                                  "properties": {"error": {"type": "string"}}}},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "api.tcp: the token in api.token_file"},
                "unixSocket": {"type": "apiKey", "in": "header", "name": "X-Unix-Socket",
                               "description": "no header: a request on api.socket is trusted by its file mode"},
                "session": {"type": "apiKey", "in": "cookie", "name": "bootd_session",
                            "description": "the dashboard's login (ui.listen)"},
                "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token",
                         "description": "the dashboard session's token, on every change"},
            },
        },
    }


@routes.get("/api/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """This description of the API (OpenAPI 3.1)."""
    return web.json_response(describe(request.app))


def setup_routes(app: web.Application, ctx: Context) -> None:
    app.add_routes(routes)
