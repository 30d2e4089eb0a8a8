"""A small synchronous client for bootd's API over its Unix socket (or TCP with a token)."""
from __future__ import annotations

import http.client
import json
import socket
from typing import Any, Callable, Optional, TypedDict, Unpack
from urllib.parse import quote

from bootd.cli.text import escape_controls, escape_strings


class ApiError(Exception):
    """A refusal from bootd (`status`: its HTTP status, `data`: its JSON answer), or no bootd to ask
    (`not_running`). The message is the reason alone: the status is for --json, not for the admin's eyes."""

    def __init__(self, message: str, status: Optional[int] = None, data: Any = None, not_running: bool = False):
        super().__init__(message)
        self.status = status
        self.data = data
        self.not_running = not_running


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class RequestOptions(TypedDict, total=False):
    """The keywords get() and post() pass on to request()."""

    raw: bool
    stream: Callable[[bytes], None] | None
    document: bool


class ApiClient:
    def __init__(self, socket_path: str = "/run/bootd/api.sock", url: Optional[str] = None,
                 token: Optional[str] = None, timeout: float = 600.0, escape_text: bool = False):
        self.socket_path = socket_path
        self.url = url
        self.token = token
        self.timeout = timeout
        # for a terminal: every string in an answer with its control characters escaped (bootd/cli/text.py)
        self.escape_text = escape_text

    def _conn(self) -> http.client.HTTPConnection:
        if self.url:
            rest = self.url.split("://", 1)[-1].rstrip("/")
            host, _, port = rest.rpartition(":")
            return http.client.HTTPConnection(host or rest, int(port or 80), timeout=self.timeout)
        return _UnixConnection(self.socket_path, self.timeout)

    def request(self, method: str, path: str, body: Any = None, raw: bool = False,
                stream: Callable[[bytes], None] | None = None, document: bool = False) -> Any:
        """`document`: the answer holds a rendered multi-line file; its newlines stay even with escape_text
        (the caller prints it with escape_controls(keep_lines=True))."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self._conn()
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            if stream is not None and resp.status < 400:
                for line in resp:
                    stream(line)
                return None
            payload = resp.read()
        except FileNotFoundError:
            raise ApiError(f"bootd is not running (no API socket at {self.socket_path})", not_running=True) from None
        except ConnectionRefusedError:
            raise ApiError(f"bootd is not running (connection refused at {self.url or self.socket_path})",
                           not_running=True) from None
        except PermissionError:
            raise ApiError(f"permission denied on {self.socket_path} (run as root or a member of its group)") from None
        except (OSError, http.client.HTTPException) as e:
            raise ApiError(f"cannot talk to bootd: {e}") from None
        finally:
            conn.close()
        if raw:
            if resp.status >= 400:
                raise ApiError(payload.decode(errors="replace"), resp.status)
            return payload
        try:
            parsed = json.loads(payload) if payload else None
        except json.JSONDecodeError:
            parsed = None
        if resp.status >= 400:
            reason = parsed.get("error") if isinstance(parsed, dict) else payload.decode(errors="replace").strip()
            if not reason:
                reason = f"bootd answered HTTP {resp.status} without a reason"
            if self.escape_text:
                reason = escape_controls(str(reason))
                parsed = escape_strings(parsed)
            raise ApiError(str(reason), resp.status, parsed)
        return escape_strings(parsed) if self.escape_text and not document else parsed

    def get(self, path: str, **kw: Unpack[RequestOptions]) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Unpack[RequestOptions]) -> Any:
        return self.request("POST", path, body=json if json is not None else {}, **kw)

    def put(self, path: str, json: Any = None) -> Any:
        return self.request("PUT", path, body=json if json is not None else {})

    def patch(self, path: str, json: Any = None) -> Any:
        return self.request("PATCH", path, body=json if json is not None else {})

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def q(part: str) -> str:
    """Quote one path segment."""
    return quote(str(part), safe="")
