"""TftpService in a real daemon Context: config -> listeners, reload keeps transfers, seam in ctx.tftp."""
from __future__ import annotations

import asyncio
import os
import socket

import pytest

from bootd.config import ConfigError, parse_config
from bootd.daemon import Context
from bootd.state import open_state
from bootd.tftp.service import TftpService
from bootd.tftp.session import OP_DATA, encode_ack, encode_request


def _config(root, port, **tftp):
    import yaml
    return parse_config(yaml.safe_dump({"tftp": {"root": str(root), "port": port, "addresses": ["127.0.0.1"],
                                                 "run_dir": str(root.parent / "run"), **tftp}}))


def _free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_service_start_reload_stop(tmp_path):
    root = tmp_path / "boot"
    root.mkdir()
    data = os.urandom(5000)
    (root / "kernel").write_bytes(data)
    port, port2 = _free_port(), _free_port()

    async def main():
        store = open_state(tmp_path / "state.db")
        ctx = Context(config=_config(root, port), config_path="x", store=store)
        svc = TftpService()
        await svc.start(ctx)
        assert ctx.tftp is svc.server
        assert svc.status()["addresses"] == [f"127.0.0.1:{port}"]
        assert svc.status()["data_pump"]["active"] == "c"          # tftp.data_pump defaults to c
        assert list((tmp_path / "run").glob("tftp-pump-*"))       # built in tftp.run_dir
        loop = asyncio.get_running_loop()
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.setblocking(False)
        c.bind(("127.0.0.1", 0))
        c.sendto(encode_request("kernel"), ("127.0.0.1", port))
        pkt, peer = await asyncio.wait_for(loop.sock_recvfrom(c, 65536), 5)
        assert pkt[:4] == bytes([0, OP_DATA, 0, 1])
        got = bytearray(pkt[4:])
        # reload onto another port mid-transfer: the transfer goes on, the listener moves
        assert svc.server.server_limits.max_sessions_per_client == 16   # the documented default
        ctx.config = _config(root, port2, max_sessions=7, max_sessions_per_client=2)
        await svc.reload(ctx)
        assert svc.status()["addresses"] == [f"127.0.0.1:{port2}"]
        assert svc.server.server_limits.max_sessions == 7
        assert svc.server.server_limits.max_sessions_per_client == 2
        block = 1
        while True:
            c.sendto(encode_ack(block), peer)
            pkt, _ = await asyncio.wait_for(loop.sock_recvfrom(c, 65536), 5)
            block += 1
            got += pkt[4:]
            if len(pkt) < 516:
                c.sendto(encode_ack(block), peer)
                break
        assert bytes(got) == data
        await asyncio.sleep(0.05)
        assert svc.status()["completed"] == 1 and svc.status()["data_pump"]["sessions"] == 1
        await svc.stop()
        c.close()
        store.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_max_sessions_per_client_is_validated(tmp_path):
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, 69, max_sessions_per_client=0)
    assert "tftp.max_sessions_per_client: Input should be greater than or equal to 1" in str(e.value)


def test_no_interfaces_means_no_listener(tmp_path):
    async def main():
        store = open_state(tmp_path / "state.db")
        cfg = parse_config(f"tftp: {{root: {tmp_path}, data_pump: python}}\n")
        svc = TftpService()
        await svc.start(Context(config=cfg, config_path="x", store=store))
        assert svc.status()["addresses"] == []
        await svc.stop()
        store.close()

    asyncio.run(main())
