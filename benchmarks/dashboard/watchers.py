#!/usr/bin/env python3
"""The browsers of a dashboard benchmark (benchmarks/dashboard/run.py starts this in its own process):
W logged-in watchers that either keep the Rooms page's live stream open (sse) or poll /api/v1/hosts once
a second (poll: a dashboard without server push), plus one probe that loads the Rooms page every half
second. Prints one JSON object: when each watcher first saw each (mac, state, step), and the page times.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time

import aiohttp


async def login(base: str, user: str, password: str, n: int) -> aiohttp.ClientSession:
    """Browser `n`, from its own address (127.0.0.n+2: bootd caps connections per address, as for PCs)."""
    # the session cookie is Secure: a browser sends it to http://127.0.0.1 (a secure context), aiohttp when told
    s = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=[base]),
                              connector=aiohttp.TCPConnector(local_addr=(f"127.0.{(n + 2) >> 8}.{(n + 2) & 255}", 0)))
    async with s.get(f"{base}/ui/login") as r:
        page = await r.text()
        found = re.search(r'name="login_token" value="([^"]+)"', page)
        if found is None:
            raise RuntimeError(f"no login form: {r.status} {page[:300]}")
        token = found.group(1)
    async with s.post(f"{base}/ui/login", data={"name": user, "password": password, "login_token": token,
                                                "next": "/ui/rooms"}, allow_redirects=False) as r:
        assert r.status == 303, (r.status, await r.text())
    return s


async def sse_watcher(s: aiohttp.ClientSession, base: str, seen: dict, stop: float) -> None:
    async with s.get(f"{base}/ui/events", timeout=aiohttp.ClientTimeout(total=None)) as r:
        event = None
        while time.time() < stop:
            try:
                line = await asyncio.wait_for(r.content.readline(), max(0.1, stop - time.time()))
            except asyncio.TimeoutError:
                break
            if not line:
                break
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                event = text[7:]
            elif text.startswith("data: ") and event == "tiles":
                now = time.time()
                for t in json.loads(text[6:]):
                    seen.setdefault(f"{t['mac']} {t['state']} {t['step']}", now)


async def poll_watcher(s: aiohttp.ClientSession, base: str, seen: dict, stop: float) -> None:
    while time.time() < stop:
        async with s.get(f"{base}/api/v1/hosts") as r:
            hosts = (await r.json())["hosts"]
        now = time.time()
        for t in hosts:
            seen.setdefault(f"{t['mac']} {t['state']} {t['step']}", now)
        await asyncio.sleep(1.0)


async def probe(s: aiohttp.ClientSession, base: str, times: list, stop: float) -> None:
    while time.time() < stop:
        t0 = time.monotonic()
        async with s.get(f"{base}/ui/rooms") as r:
            await r.read()
            assert r.status == 200
        times.append(time.monotonic() - t0)
        await asyncio.sleep(0.5)


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--watchers", type=int, default=1)
    ap.add_argument("--mode", choices=("sse", "poll"), default="sse")
    ap.add_argument("--seconds", type=float, default=30)
    a = ap.parse_args()
    sessions = [await login(a.base, a.user, a.password, n) for n in range(a.watchers + 1)]
    print("ready", flush=True, file=sys.stderr)
    stop = time.time() + a.seconds
    seen: list[dict] = [{} for _ in range(a.watchers)]
    page_times: list[float] = []
    watch = sse_watcher if a.mode == "sse" else poll_watcher
    await asyncio.gather(*(watch(s, a.base, d, stop) for s, d in zip(sessions[:-1], seen, strict=True)),
                         probe(sessions[-1], a.base, page_times, stop))
    for s in sessions:
        await s.close()
    print(json.dumps({"seen": seen, "page_times": page_times}))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
