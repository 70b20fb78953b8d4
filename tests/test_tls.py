"""TLS on a real node (tls_port: TCP+TLS, wss_port: WebSocket over TLS),
with certificates from `fanout cert` and real handshakes on loopback, on
both event loops: AuthOk and room messages over TLS, a large room written
by the writer threads to TLS members, the SDK and `fanout say` with --ca,
the refusals (untrusted CA, wrong host name, plaintext on the TLS port),
the slow-consumer cut, and the config checks."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import time

import pytest

from conftest import dev_certs, token
from nodeprobe import metric
from rawclient import RawClient, WsRawClient
from test_websocket import publish
from fanout import _core
from fanout.client import Client
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol import wire

FT = wire.FrameType


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA and a certificate for localhost/127.0.0.1/::1, made by `fanout cert`."""
    d = tmp_path_factory.mktemp("tls")
    out = subprocess.run([sys.executable, "-m", "fanout", "cert", "--dir", str(d)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--tls-cert" in out.stdout and "--ca" in out.stdout
    for name in ("ca.pem", "ca-key.pem", "cert.pem", "key.pem"):
        assert (d / name).is_file()
    assert oct((d / "key.pem").stat().st_mode & 0o777) == "0o600"
    return d


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    return dev_certs(tmp_path_factory, "other")


def tls_flags(certs, *more):
    return ("--tls-port", "0", "--wss-port", "0", "--tls-cert", str(certs / "cert.pem"),
            "--tls-key", str(certs / "key.pem"), *more)


@pytest.fixture
def tls_node(start_node, certs):
    return start_node(*tls_flags(certs, "--chat-rate", "100000", "--chat-burst", "100000",
                                 "--request-rate", "1e6", "--request-burst", "1e6"))


def wrap(client: RawClient, ca, host="localhost") -> RawClient:
    """Make a connected raw client speak TLS (a blocking handshake)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    client.sock = ctx.wrap_socket(client.sock, server_hostname=host)
    return client


def tls_client(node, ca, **kw) -> RawClient:
    return wrap(RawClient("127.0.0.1", node.tls_port, **kw), ca)


def wss_client(node, ca) -> WsRawClient:
    ws = wrap(WsRawClient("127.0.0.1", node.wss_port, upgrade=False), ca)
    ws.response = ws.handshake()
    assert ws.response.startswith(b"HTTP/1.1 101 "), ws.response
    return ws


def test_tls_and_wss_clients_get_authok_and_room_messages(tls_node, certs):
    """TCP+TLS, WebSocket over TLS and plain TCP viewers of one room get
    the same messages; the node says TLS is on and how it encrypts."""
    node = tls_node
    assert node.tls_port and node.wss_port
    tls = tls_client(node, certs / "ca.pem")
    wss = wss_client(node, certs / "ca.pem")
    plain = RawClient("127.0.0.1", node.port)
    for client, user in ((tls, "tls"), (wss, "wss"), (plain, "plain")):
        assert isinstance(client.hello(token(user)), pb.AuthOk)
        assert isinstance(client.join("live"), pb.Ack)
    publish(node, "live", "gift", "rocket")
    tls.chat("live", b"hi over tls")
    got = [[(m.kind, m.payload) for m in c.messages(2)] for c in (tls, wss, plain)]
    assert got[0] == got[1] == got[2] == [(pb.GIFT, b"rocket"), (pb.CHAT, b"hi over tls")]
    tls.send(FT.PING, pb.Ping(nonce=9))
    assert tls.expect(FT.PONG, FT.PRESENCE)
    assert isinstance(tls.sock, ssl.SSLSocket) and tls.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert "TLS (OpenSSL" in node.log()
    # two TLS connections so far, each counted under the mode it got
    assert (metric(node, "fanout_tls_connections_core_total")
            + metric(node, "fanout_tls_connections_kernel_total")) == 2
    for c in (tls, wss, plain):
        c.close()


@pytest.mark.parametrize("node_loop", ["uvloop"])
def test_kernel_tls_falls_back_to_the_core(tls_node, certs):
    """tls_mode auto on a kernel without the tls ULP: the node says so and
    every connection is encrypted by the core; where the kernel has it, the
    node says that instead (this test then checks the other branch)."""
    from fanout.server.tlsconf import kernel_tls_available

    ok, why = kernel_tls_available()
    c = tls_client(tls_node, certs / "ca.pem")
    assert isinstance(c.hello(token("k")), pb.AuthOk)
    log = tls_node.log()
    if ok:
        assert "kernel TLS where the cipher allows" in log
    else:
        assert "kernel TLS unavailable" in log and why in log
        assert metric(tls_node, "fanout_tls_connections_kernel_total") == 0
        assert metric(tls_node, "fanout_tls_connections_core_total") == 1
    c.close()


def test_large_room_written_by_writer_threads_to_tls_members(start_node, certs):
    """A room over write_thread_min_members (lowered to 4): its flushes go
    to the TLS members through the writer threads' SSL_write; every member
    gets every message intact and in order."""
    node = start_node(*tls_flags(certs, "--write-threads", "1", "--write-thread-min-members",
                                 "4", "--max-publish-bytes", "60000", "--max-delay-ms", "5"))
    ca = certs / "ca.pem"
    members = [tls_client(node, ca) for _ in range(8)] + [wss_client(node, ca)] + \
        [RawClient("127.0.0.1", node.port)]
    for i, c in enumerate(members):
        assert isinstance(c.hello(token(f"m{i}")), pb.AuthOk)
        assert isinstance(c.join("big"), pb.Ack)
    payloads = [os.urandom(3000 + 37 * i).hex() for i in range(60)]
    for p in payloads:
        publish(node, "big", "chat", p)
    for c in members:
        got = c.messages(len(payloads), timeout=30)
        assert [m.payload.decode() for m in got] == payloads
        assert [m.seq for m in got] == sorted(m.seq for m in got)
    for c in members:
        c.close()


def test_tls_behind_a_proxy_protocol_balancer(start_node, certs):
    """A TCP balancer that passes TLS through, with a PROXY header first:
    the header is read in plaintext before the core connection exists, then
    the handshake runs, and the client's address is the header's."""
    node = start_node(*tls_flags(certs, "--proxy-protocol-from", "127.0.0.1/32",
                                 "--log-level", "DEBUG"))
    c = RawClient("127.0.0.1", node.tls_port)
    c.sock.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 7443\r\n")
    wrap(c, certs / "ca.pem")
    assert isinstance(c.hello(token("behind-lb")), pb.AuthOk)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "203.0.113.7" not in node.log():
        time.sleep(0.05)
    assert "203.0.113.7" in node.log()
    c.close()


async def test_sdk_over_tls(tls_node, certs):
    """The Python SDK with tls/ca: connect, join, receive, chat."""
    node = tls_node
    async with Client("127.0.0.1", node.tls_port, token("sdk"), ca=str(certs / "ca.pem"),
                      server_hostname="localhost", reconnect=False) as client:
        await client.join("sdk-room")
        await asyncio.get_running_loop().run_in_executor(
            None, publish, node, "sdk-room", "gift", "over tls")
        event = await asyncio.wait_for(anext(aiter(client)), 10)
        assert event.payload == b"over tls"
        ack = await client.say("sdk-room", b"hello")
        assert ack.seq > 0
    with pytest.raises(ssl.SSLCertVerificationError):
        async with Client("127.0.0.1", node.tls_port, token("sdk"), tls=True,
                          reconnect=False):
            pass                                      # the system CAs do not know it


def test_cli_say_with_ca(tls_node, certs):
    out = subprocess.run(
        [sys.executable, "-m", "fanout", "say", "cli-room", "hi", "--port",
         str(tls_node.tls_port), "--host", "127.0.0.1", "--server-name", "localhost",
         "--tls", "--ca", str(certs / "ca.pem"), "--token", token("cli")],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "sent to cli-room as seq" in out.stdout


# ---------------------------------------------------------------- refusals

def test_untrusted_ca_and_wrong_host_name_are_refused(tls_node, certs, other_certs):
    node = tls_node
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        wrap(RawClient("127.0.0.1", node.tls_port), other_certs / "ca.pem")
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        wrap(RawClient("127.0.0.1", node.tls_port), certs / "ca.pem",
             host="live.example.com")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and metric(node, "fanout_tls_handshake_failures_total") < 2:
        time.sleep(0.05)
    assert metric(node, "fanout_tls_handshake_failures_total") == 2
    assert "TLS handshake failed" in node.log()
    # the node keeps serving TLS clients
    c = tls_client(node, certs / "ca.pem")
    assert isinstance(c.hello(token("after")), pb.AuthOk)
    c.close()


def test_plaintext_to_the_tls_port_is_closed_clearly(tls_node, certs):
    """A fanout client without TLS gets a plaintext Error(BAD_REQUEST)
    saying the port speaks TLS, then the close; an HTTP request to the wss
    port just closes. The node logs it, counts it and keeps serving."""
    node = tls_node
    plain = RawClient("127.0.0.1", node.tls_port)
    plain.send(FT.HELLO, pb.Hello(token=token("p"), device_id="x"))
    frames = plain.until_closed()
    assert [(t, m.reason) for t, m in frames] == [(FT.ERROR, pb.BAD_REQUEST)]
    assert "TLS" in frames[0][1].message
    plain.close()
    s = socket.create_connection(("127.0.0.1", node.wss_port), timeout=10)
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert s.recv(4096) == b""
    except ConnectionResetError:
        pass
    s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "not TLS" not in node.log():
        time.sleep(0.05)
    assert "not TLS" in node.log()
    assert metric(node, "fanout_protocol_errors_total") >= 1
    c = tls_client(node, certs / "ca.pem")
    assert isinstance(c.hello(token("still")), pb.AuthOk)
    c.close()


def test_refused_at_accept_on_a_tls_port_is_a_bare_reset(start_node, certs):
    """Refused at accept (here: the connection rate), a TLS port sends no
    plaintext Error the client could not read: the handshake just fails on
    the reset, and the refusal is counted as on the plaintext ports."""
    node = start_node(*tls_flags(certs, "--conn-rate-per-ip", "0.01", "--conn-burst-per-ip",
                                 "1"))
    first = tls_client(node, certs / "ca.pem")
    try:
        # (on loopback the RST can fail connect() itself)
        with socket.create_connection(("127.0.0.1", node.tls_port), timeout=10) as raw:
            data = raw.recv(4096)
    except ConnectionResetError:
        data = b""
    assert data == b""
    # (wrap_socket would skip the handshake of a socket already reset)
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with pytest.raises(OSError):                  # a reset, or ENOTCONN once it arrived
        with socket.create_connection(("127.0.0.1", node.tls_port), timeout=10) as s:
            ctx.wrap_socket(s, server_hostname="localhost",
                            do_handshake_on_connect=False).do_handshake()
    assert "refused connection" in node.log()
    assert isinstance(first.hello(token("first")), pb.AuthOk)
    first.close()


def test_silent_connections_meet_the_handshake_deadline(start_node, certs):
    """A client that connects to a TLS port and sends nothing (no TLS
    handshake) is closed at auth_timeout_ms like any other, on both ports."""
    node = start_node(*tls_flags(certs, "--auth-timeout-ms", "300"))
    socks = [socket.create_connection(("127.0.0.1", p), timeout=10)
             for p in (node.tls_port, node.wss_port)]
    started = time.monotonic()
    for s in socks:
        try:
            assert s.recv(4096) == b""
        except ConnectionResetError:
            pass
        s.close()
    assert time.monotonic() - started < 5
    c = tls_client(node, certs / "ca.pem")
    assert isinstance(c.hello(token("late")), pb.AuthOk)
    c.close()


def test_slow_tls_consumer_is_cut(start_node, certs):
    node = start_node(*tls_flags(certs, "--max-backlog-bytes", "65536", "--sndbuf-bytes",
                                 "4096", "--max-publish-bytes", "60000"))
    slow = tls_client(node, certs / "ca.pem", rcvbuf=4096)
    assert isinstance(slow.hello(token("slow")), pb.AuthOk)
    assert isinstance(slow.join("r"), pb.Ack)
    for _ in range(60):                               # the client reads nothing
        publish(node, "r", "gift", os.urandom(25_000).hex())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "cut as slow consumer" not in node.log():
        time.sleep(0.05)
    assert "cut as slow consumer" in node.log()
    slow.close()


def test_tls_config_errors(certs, tmp_path):
    def run(*flags):
        return subprocess.run([sys.executable, "-m", "fanout", "node", "--port", "0",
                               "--admin-port", "-1", *flags],
                              capture_output=True, text=True, timeout=30)

    out = run("--tls-port", "0")
    assert out.returncode == 2 and "need tls_cert" in out.stderr
    out = run("--tls-port", "0", "--tls-cert", str(certs / "cert.pem"), "--tls-key",
              str(tmp_path / "missing.pem"))
    assert out.returncode == 2 and "missing.pem" in out.stderr
    out = run("--tls-port", "0", "--tls-cert", str(certs / "cert.pem"), "--tls-key",
              str(certs / "ca-key.pem"))
    assert out.returncode == 2 and "does not match" in out.stderr
    out = run("--tls-mode", "kernel")
    assert out.returncode == 2 and "tls_mode" in out.stderr
    assert _core.TLS_MODES == ("auto", "core")
