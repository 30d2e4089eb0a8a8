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


def _openssl(*args: str, cwd) -> None:
    import subprocess
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def test_x509_tls_export_needs_a_client_certificate(harness, bases, tmp_path):
    import shutil
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    v1, _ = bases
    srv, cli, ca = tmp_path / "srv", tmp_path / "cli", tmp_path / "ca"
    for d in (srv, cli, ca):
        d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=lab-ca",
             "-keyout", "ca-key.pem", "-out", "ca-cert.pem", cwd=ca)
    for d, cn, ext in ((srv, "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                       (cli, "bootd-check", "extendedKeyUsage=clientAuth")):
        kind = "server" if d is srv else "client"
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{kind}-key.pem",
                 "-out", "req.csr", cwd=d)
        (d / "ext.cnf").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", "req.csr", "-CA", str(ca / "ca-cert.pem"), "-CAkey", str(ca / "ca-key.pem"),
                 "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", f"{kind}-cert.pem", cwd=d)
        shutil.copy(ca / "ca-cert.pem", d / "ca-cert.pem")
    hs = harness(tls=TlsSettings("x509", str(srv)), client_tls=ClientTls("x509", cert_dir=str(cli)))
    exp = hs.run(hs.m.prepare_boot(A, v1))  # checked over TLS with bootd's client certificate
    assert exp.uri.startswith("nbds://")
    anon = nbd.NBD()
    anon.set_tls(nbd.TLS_REQUIRE)
    anon.set_tls_verify_peer(False)
    with pytest.raises(nbd.Error):  # TLS, but no client certificate: refused
        anon.connect_uri(exp.uri)
    r = subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{hs.port}/{exp.name}"], capture_output=True, text=True)
    assert r.returncode != 0  # plain NBD: refused
    h = nbd.NBD()
    h.set_tls_certificates(str(cli))
    h.connect_uri(exp.uri)
    assert h.pread(2, 0) == b"\xab\xab"
    h.shutdown()
