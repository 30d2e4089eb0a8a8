"""TLS with a pre-shared key: clients without the key get nothing; bootd's own export check uses it."""
from __future__ import annotations

import os

import nbd
import pytest

from nbdexport.check import ClientTls
from nbdexport.qsd import TlsSettings

A = "52:54:00:00:03:0a"


def test_psk_tls_export_needs_the_key(harness, bases, tmp_path):
    v1, _ = bases
    d = tmp_path / "psk"
    d.mkdir()
    keys = d / "keys.psk"
    keys.write_text(f"lab:{os.urandom(32).hex()}\n")
    hs = harness(tls=TlsSettings("psk", str(d)),
                 client_tls=ClientTls("psk", psk_file=str(keys), username="lab"))
    exp = hs.run(hs.m.prepare_boot(A, v1))  # the libnbd check passed over TLS
    assert exp.tls and exp.uri.startswith("nbds://")
    plain = nbd.NBD()
    with pytest.raises(nbd.Error):
        plain.connect_uri(f"nbd://127.0.0.1:{hs.port}/{exp.name}")
    wrong = tmp_path / "wrong.psk"
    wrong.write_text(f"lab:{os.urandom(32).hex()}\n")
    for psk in (wrong,):
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(str(psk))
        h.set_tls_username("lab")
        with pytest.raises(nbd.Error):
            h.connect_uri(exp.uri)
    h = nbd.NBD()
    h.set_tls_psk_file(str(keys))
    h.set_tls_username("lab")
    h.connect_uri(exp.uri)
    assert h.pread(4, 0) == b"\xab" * 4
    h.shutdown()
