"""The core's TLS layer (pyx/core/tls.pyx, tlsio.h, connection.pxd "TLS")
with real handshakes on loopback: Python's ssl module is the client, the
core's Connection the server, on both event loops.

Covers the handshake and frames both ways, frames sent before the
handshake ends, the writer threads writing TLS members (short writes and
the retry rule), input bigger than one wake's read budget, slow consumers,
a last word after a half-sent record, and the refusals: a client that does
not trust the CA, a wrong host name, plaintext on the TLS port."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl

import pytest

from fanout import _core, devcert
from fanout.protocol import fanout_pb2 as pb

from test_core import MAX, record
from test_write_rounds import seqs_and_controls

PING = 0x05


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return devcert.make(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A CA the node's certificate does not come from."""
    return devcert.make(tmp_path_factory.mktemp("other"))


def client_context(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    return ctx


class Owner:
    """The core's owner protocol, recording what it is told, and reading."""

    def __init__(self, conn):
        self.conn = conn
        self.failed = []
        self.lost = 0
        self.frames = []
        self.error_at_failure = None

    def connection_failed(self, status):
        self.failed.append(status)
        self.error_at_failure = self.conn.tls_error
        self.conn.close()

    def connection_lost(self):
        self.lost += 1

    def on_readable(self):
        self.frames += self.conn.read()
        if self.conn.eof and not self.conn.closing:
            self.conn.close()


class Server:
    """A loopback listener whose accepted sockets become TLS connections."""

    def __init__(self, certs, mode="auto", sndbuf=None, **limits):
        self.tls = _core.TlsContext(str(certs.cert), str(certs.key), mode)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.sndbuf = sndbuf
        self.limits = limits
        self.owners = {}                  # conn -> Owner (close() clears conn.owner)

    async def accept(self):
        loop = asyncio.get_running_loop()
        node_side, _ = await loop.sock_accept(self.sock)
        if self.sndbuf:
            node_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        node_side.setblocking(False)
        conn = _core.TcpConnection(node_side.detach(), loop, tls=self.tls, **self.limits)
        owner = conn.owner = self.owners[conn] = Owner(conn)
        conn.start_reading(owner.on_readable)
        return conn

    def close(self):
        self.sock.close()


async def tls_pair(server, ca, host="localhost", rcvbuf=None):
    # (A small rcvbuf only for a client that never reads: with TLS records
    # bigger than its window, loopback TCP stalls on zero-window probes.)
    """(node-side Connection, (reader, writer) of an asyncio TLS client)."""
    accepted = asyncio.ensure_future(server.accept())
    sock = socket.create_connection(("127.0.0.1", server.port))
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    client = await asyncio.wait_for(asyncio.open_connection(
        sock=sock, ssl=client_context(ca), server_hostname=host), 10)
    conn = await asyncio.wait_for(accepted, 10)
    return conn, client


async def until(cond, timeout=10.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def read_frames(reader, count, timeout=10.0):
    """``count`` wire frames from an asyncio TLS stream."""
    data = bytearray()
    frames = []
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while len(frames) < count:
        chunk = await asyncio.wait_for(reader.read(1 << 20), max(0.01, end - loop.time()))
        if not chunk:
            break
        data += chunk
        got, used = _core.parse_frames(bytes(data), MAX)
        frames += got
        del data[:used]
    return frames


def ping(nonce):
    return _core.pack_frame(PING, pb.Ping(nonce=nonce).SerializeToString())


async def test_handshake_then_frames_both_ways(certs):
    server = Server(certs)
    before = _core.tls_stats()
    try:
        conn, (reader, writer) = await tls_pair(server, certs.ca)
        assert conn.tls
        writer.write(ping(1) + ping(2))
        await writer.drain()
        await until(lambda: len(server.owners[conn].frames) == 2)
        assert [pb.Ping.FromString(b).nonce for _t, _f, b in server.owners[conn].frames] == [1, 2]
        assert conn.tls_mode in ("core", "kernel")
        version, cipher = conn.tls_version
        assert version in ("TLSv1.2", "TLSv1.3") and cipher
        assert conn.send(_core.core_frame(0x41, b"hello over tls")) == 0
        (ftype, _flags, body), = await read_frames(reader, 1)
        assert (ftype, body) == (0x41, b"hello over tls")
        after = _core.tls_stats()
        assert after["core"] + after["kernel"] == before["core"] + before["kernel"] + 1
        # The client's close reaches the owner as end of stream.
        writer.close()
        await until(lambda: conn.closed)
        assert server.owners[conn].lost == 1 and server.owners[conn].failed == []
    finally:
        server.close()


async def test_core_mode_never_asks_for_kernel_tls(certs):
    server = Server(certs, mode="core")
    try:
        conn, (reader, writer) = await tls_pair(server, certs.ca)
        writer.write(ping(7))
        await until(lambda: server.owners[conn].frames)
        assert conn.tls_mode == "core" and not conn.tls_kernel
        writer.close()
        conn.close()
    finally:
        server.close()
    with pytest.raises(ValueError, match="tls mode"):
        _core.TlsContext(str(certs.cert), str(certs.key), "kernel-only")


async def test_frames_sent_during_handshake_wait_for_it(certs):
    """A frame the node sends before the handshake ends is queued, not
    written in plaintext, and goes out encrypted once it is done; the owner
    reads nothing before that."""
    server = Server(certs)
    try:
        accepted = asyncio.ensure_future(server.accept())
        raw = socket.create_connection(("127.0.0.1", server.port))
        conn = await accepted
        assert conn.tls and conn.tls_mode is None
        assert conn.send(_core.core_frame(0x41, b"early")) == 0
        assert conn.backlog_frames == 1
        raw.setblocking(False)
        with pytest.raises(BlockingIOError):
            raw.recv(100)                       # nothing in plaintext
        reader, writer = await asyncio.open_connection(
            sock=raw, ssl=client_context(certs.ca), server_hostname="localhost")
        (ftype, _f, body), = await read_frames(reader, 1)
        assert (ftype, body) == (0x41, b"early")
        assert conn.backlog_frames == 0 and server.owners[conn].frames == []
        writer.close()
        conn.close()
    finally:
        server.close()


async def test_big_input_is_read_past_one_wakes_budget(certs):
    """Much more than one wake's read budget (4 TLS records) arrives at once:
    every frame is read, including what OpenSSL decrypted but read() left."""
    server = Server(certs)
    try:
        conn, (reader, writer) = await tls_pair(server, certs.ca)
        frames = [ping(i) for i in range(1, 20001)]
        writer.write(b"".join(frames))
        await writer.drain()
        await until(lambda: len(server.owners[conn].frames) == 20000)
        assert [pb.Ping.FromString(b).nonce for _t, _f, b in server.owners[conn].frames] == \
            list(range(1, 20001))
        writer.close()
        conn.close()
    finally:
        server.close()


async def test_partial_writes_resume_in_order(certs):
    """Small socket buffers and a client that reads late: sends come back
    short, the backlog drains through SSL_write per frame, and the stream
    decrypts and parses whole, in order."""
    server = Server(certs, sndbuf=4096, max_backlog_bytes=1 << 24)
    try:
        conn, (reader, writer) = await tls_pair(server, certs.ca)
        bodies = [os.urandom(20_000 + i) for i in range(40)]
        statuses = [conn.send(_core.core_frame(0x43, b)) for b in bodies]
        assert 1 in statuses                      # SEND_QUEUED: the socket filled up
        got = await read_frames(reader, len(bodies))
        assert [b for _t, _f, b in got] == bodies
        await until(lambda: conn.backlog_frames == 0)
        writer.close()
        conn.close()
    finally:
        server.close()


async def test_last_word_after_a_half_sent_record(certs):
    """close_after(drop_queued) when a frame's record is half sent inside
    OpenSSL: that frame is finished (OpenSSL needs the same bytes again),
    the unstarted ones dropped, the Kick last, and the client reads a clean
    stream ending in it."""
    server = Server(certs, sndbuf=4096, max_backlog_bytes=1 << 24)
    try:
        conn, (reader, writer) = await tls_pair(server, certs.ca)
        bodies = [os.urandom(30_000) for _ in range(60)]
        for b in bodies:
            conn.send(_core.core_frame(0x43, b))
        assert conn.backlog_frames > 1
        kick = pb.Kick(reason=pb.SLOW_CONSUMER, message="bye").SerializeToString()
        conn.close_after(_core.core_frame(0x44, kick))
        got = await read_frames(reader, 100, timeout=5)
        assert got[-1] == (0x44, 0, kick)
        data = [b for t, _f, b in got[:-1]]
        assert data == bodies[:len(data)] and len(data) < len(bodies)
        writer.close()
        await until(lambda: conn.closed)
        assert server.owners[conn].failed == []
    finally:
        server.close()


async def test_slow_tls_consumer_is_cut(certs):
    server = Server(certs, sndbuf=4096, max_backlog_bytes=64 * 1024)
    try:
        conn, (reader, writer) = await tls_pair(server, certs.ca, rcvbuf=4096)
        payload = os.urandom(8000)
        for _ in range(200):
            conn.send(_core.core_frame(0x43, payload))
            if server.owners[conn].failed:
                break
        assert server.owners[conn].failed == [_core.STATUS_SLOW]
        writer.close()
    finally:
        server.close()


async def test_writer_threads_write_tls_members(certs):
    """A room written by the writer threads (2 threads, every member in the
    round) whose members are TLS connections with small buffers: every
    member decrypts every seq once and in order; control frames sent
    between flushes keep their order."""
    loop = asyncio.get_running_loop()
    server = Server(certs, sndbuf=8192, max_backlog_bytes=1 << 24)
    hub = _core.Hub(loop, max_delay=0.0, write_threads=2, thread_min_members=1,
                    compress_min=0)
    try:
        room = hub.room("r", "e", 0)
        pairs = [await tls_pair(server, certs.ca) for _ in range(24)]
        for conn, _ in pairs:
            room.add(conn)
        got = [bytearray() for _ in pairs]

        async def collect(i, reader):
            while True:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    return
                got[i] += chunk

        readers = [asyncio.ensure_future(collect(i, r)) for i, (_c, (r, _w)) in enumerate(pairs)]
        seq = 0
        for flush in range(60):
            for _ in range(3):
                seq += 1
                hub.publish("r", "e", seq, record("r", seq, os.urandom(2000)))
            hub.flush("r")
            pairs[flush % len(pairs)][0].send(_core.core_frame(0x41, b"ctl-%d" % flush))
            await asyncio.sleep(0.001 if flush % 3 else 0.02)
        hub.settle()
        await until(lambda: all(c.backlog_frames == 0 for c, _ in pairs), 20)
        await asyncio.sleep(0.05)
        assert hub.rounds >= 30
        for i, (conn, _) in enumerate(pairs):
            items = seqs_and_controls(bytes(got[i]))
            assert [x for x in items if not isinstance(x, tuple)] == list(range(1, seq + 1))
            assert [x for x in items if isinstance(x, tuple)] == [
                ("c", b"ctl-%d" % f) for f in range(60) if f % len(pairs) == i]
        for conn, (_r, w) in pairs:
            w.close()
            conn.close()
        await asyncio.gather(*readers, return_exceptions=True)
    finally:
        hub.close()
        server.close()


async def test_reads_wait_for_the_round(certs):
    """A TLS member that sends while its round is out is read after the
    round (never by the loop while a writer thread may be in SSL_write),
    and nothing it sent is lost."""
    loop = asyncio.get_running_loop()
    server = Server(certs, max_backlog_bytes=1 << 24)
    hub = _core.Hub(loop, max_delay=0.0, write_threads=1, thread_min_members=1)
    try:
        room = hub.room("r", "e", 0)
        conn, (reader, writer) = await tls_pair(server, certs.ca)
        room.add(conn)
        for seq in range(1, 201):
            hub.publish("r", "e", seq, record("r", seq, os.urandom(500)))
            hub.flush("r")
            writer.write(ping(seq))
            if seq % 20 == 0:
                await asyncio.sleep(0.002)
        await writer.drain()
        hub.settle()
        await until(lambda: len(server.owners[conn].frames) == 200)
        assert [pb.Ping.FromString(b).nonce for _t, _f, b in server.owners[conn].frames] == \
            list(range(1, 201))
        batches = await read_frames(reader, 1)
        assert batches
        writer.close()
        conn.close()
    finally:
        hub.close()
        server.close()


# ---------------------------------------------------------------- refusals

async def _refused(server, ca, host="localhost"):
    """A blocking ssl client (in a thread) whose handshake fails: it sends
    its alert before giving up, as OpenSSL clients do."""
    loop = asyncio.get_running_loop()
    accepted = asyncio.ensure_future(server.accept())

    def connect():
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            with client_context(ca).wrap_socket(raw, server_hostname=host):
                pass

    with pytest.raises(ssl.SSLError) as info:
        await loop.run_in_executor(None, connect)
    conn = await accepted
    await until(lambda: conn.closed)
    return conn, info.value


async def test_client_that_does_not_trust_the_ca_is_refused(certs, other_ca):
    server = Server(certs)
    before = _core.tls_stats()["failed"]
    try:
        conn, exc = await _refused(server, other_ca.ca)
        assert isinstance(exc, ssl.SSLCertVerificationError)
        assert server.owners[conn].failed == [_core.STATUS_TLS]
        assert "unknown ca" in server.owners[conn].error_at_failure
        assert server.owners[conn].frames == [] and server.owners[conn].lost == 1
        assert _core.tls_stats()["failed"] == before + 1
        # The node side still serves the next, trusting, client.
        conn, (reader, writer) = await tls_pair(server, certs.ca)
        writer.write(ping(3))
        await until(lambda: server.owners[conn].frames)
        writer.close()
        conn.close()
    finally:
        server.close()


async def test_wrong_host_name_is_refused(certs):
    server = Server(certs)
    try:
        conn, exc = await _refused(server, certs.ca, host="fanout.example.com")
        assert isinstance(exc, ssl.SSLCertVerificationError)
        assert "fanout.example.com" in str(exc) or "match" in str(exc)
        assert server.owners[conn].failed == [_core.STATUS_TLS] and server.owners[conn].frames == []
        assert "certificate" in server.owners[conn].error_at_failure      # its alert
    finally:
        server.close()


async def test_plaintext_to_the_tls_port_gets_a_clear_close(certs):
    """A fanout client without TLS: its Hello is never parsed; it reads a
    plaintext Error(BAD_REQUEST) saying the port speaks TLS, then the
    socket closes. Other bytes (an HTTP request) just close."""
    loop = asyncio.get_running_loop()
    server = Server(certs)
    before = _core.tls_stats()["plaintext"]
    try:
        for first, expect_error in ((ping(1), True), (b"GET / HTTP/1.1\r\n\r\n", False)):
            accepted = asyncio.ensure_future(server.accept())
            raw = socket.create_connection(("127.0.0.1", server.port))
            conn = await accepted
            raw.sendall(first)
            await until(lambda: conn.closed)
            assert server.owners[conn].failed == [_core.STATUS_TLS]
            assert "not TLS" in server.owners[conn].error_at_failure
            assert server.owners[conn].frames == []
            raw.settimeout(5)
            data = b""
            while True:
                try:
                    chunk = await loop.run_in_executor(None, raw.recv, 4096)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
            raw.close()
            if expect_error:
                (ftype, _f, body), = _core.parse_frames(data, MAX)[0]
                err = pb.Error.FromString(body)
                assert ftype == 0x42 and err.reason == pb.BAD_REQUEST
                assert "TLS" in err.message
            else:
                assert data == b""
        assert _core.tls_stats()["plaintext"] == before + 2
    finally:
        server.close()


async def test_bad_key_files_are_refused_at_start(certs, tmp_path):
    with pytest.raises(ValueError, match="does not match|mismatch"):
        _core.TlsContext(str(certs.cert), str(certs.ca_key))
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match="nope.pem"):
        _core.TlsContext(str(missing), str(certs.key))
