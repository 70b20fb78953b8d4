"""Issue 8 item 10: behind a proxy, per-address limits see the real client
address. The PROXY protocol parser (v1 text, v2 binary) on good, malformed,
truncated and oversize headers; then a node that trusts 127.0.0.1 and
applies its per-address cap to the address a PROXY header names."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import token
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol import wire
from fanout.server import proxyproto
from fanout.server.config import ConfigError, NodeConfig
from fanout.server.proxyproto import ProxyHeaderError, encode_v1, encode_v2, parse
from rawclient import FT, RawClient

# ---------------------------------------------------------------- the parser, v1


def test_v1_tcp4_and_tcp6_give_the_source_and_the_exact_length():
    line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 7000\r\n"
    header = parse(line + b"\x01\x00\x00\x00rest-of-stream")
    assert header == proxyproto.ProxyHeader(len(line), ("203.0.113.7", 51234))
    line6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 443 7000\r\n"
    assert parse(line6) == proxyproto.ProxyHeader(len(line6), ("2001:db8::7", 443))
    assert encode_v1(("203.0.113.7", 51234), ("10.0.0.1", 7000)) == line


def test_v1_unknown_is_the_proxys_own_connection():
    assert parse(b"PROXY UNKNOWN\r\n") == proxyproto.ProxyHeader(15, None)
    line = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"
    assert parse(line) == proxyproto.ProxyHeader(len(line), None)


@pytest.mark.parametrize("prefix", [b"P", b"PROXY", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2",
                                    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"])
def test_v1_truncated_asks_for_more(prefix):
    assert parse(prefix) is None


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",                 # 5 fields
    b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",              # double space
    b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",               # not TCP
    b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",           # family mismatch
    b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",           # port range
    b"PROXY TCP4 1.2.3.4 5.6.7.8 0080 2\r\n",            # leading zero
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",                 # LF without CR
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\xff 2\r\n",           # not ASCII
    b"GET / HTTP/1.1\r\n",                               # not a PROXY header at all
    b"\x01\x00\x00\x00\x00\x00\x00\x00",                 # a fanout frame
])
def test_v1_malformed_is_refused(line):
    with pytest.raises(ProxyHeaderError):
        parse(line)


def test_v1_longer_than_the_spec_is_refused_without_a_crlf():
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        parse(b"PROXY TCP6 " + b"f" * 200)


# ---------------------------------------------------------------- the parser, v2


def test_v2_inet_and_inet6_give_the_source_and_skip_tlvs():
    header = encode_v2(("203.0.113.7", 51234), ("10.0.0.1", 7000))
    assert len(header) == 16 + 12
    assert parse(header + b"\x01frame") == proxyproto.ProxyHeader(28, ("203.0.113.7", 51234))
    tlvs = b"\x04\x00\x03abc" + b"\x05\x00\x01z"               # a NOOP and a UNIQUE_ID
    header6 = encode_v2(("2001:db8::7", 443), ("2001:db8::1", 7000), tlvs)
    assert parse(header6) == proxyproto.ProxyHeader(16 + 36 + len(tlvs), ("2001:db8::7", 443))


def test_v2_local_unspec_and_unix_use_the_proxys_address():
    assert parse(encode_v2(None)) == proxyproto.ProxyHeader(16, None)
    unspec = proxyproto.V2_SIGNATURE + bytes([0x21, 0x00, 0, 0])
    assert parse(unspec) == proxyproto.ProxyHeader(16, None)
    unix = proxyproto.V2_SIGNATURE + bytes([0x21, 0x31]) + (216).to_bytes(2, "big") + b"\0" * 216
    assert parse(unix) == proxyproto.ProxyHeader(16 + 216, None)


@pytest.mark.parametrize("cut", [1, 5, 12, 15, 16, 20, 27])
def test_v2_truncated_asks_for_more(cut):
    header = encode_v2(("203.0.113.7", 51234))
    assert parse(header[:cut]) is None


def _v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return proxyproto.V2_SIGNATURE + bytes([ver_cmd, fam]) + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize("data", [
    _v2(0x11, 0x11, b"\0" * 12),                 # version 1 in a v2 header
    _v2(0x22, 0x11, b"\0" * 12),                 # command 2
    _v2(0x21, 0x11, b"\0" * 11),                 # INET block too short
    _v2(0x21, 0x21, b"\0" * 12),                 # INET6 block too short
    _v2(0x21, 0x12, b"\0" * 12),                 # INET over DGRAM
    _v2(0x21, 0x41, b"\0" * 12),                 # family 4
    _v2(0x21, 0x31, b"\0" * 100),                # UNIX block too short
    b"\r\n\r\n\x00\r\nQUIT\r" + b"\0" * 8,       # signature off by one byte
])
def test_v2_malformed_is_refused(data):
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_v2_oversize_is_refused_from_its_fixed_part():
    # The length field alone says it is too big: no need to wait for 64 KiB.
    data = _v2(0x21, 0x11, b"")[:14] + (proxyproto.V2_MAX_BODY + 1).to_bytes(2, "big")
    with pytest.raises(ProxyHeaderError, match="over"):
        parse(data)
    assert parse(_v2(0x21, 0x11, b"\0" * proxyproto.V2_MAX_BODY)).length == proxyproto.MAX_HEADER


def test_proxy_protocol_from_must_be_networks():
    assert NodeConfig(proxy_protocol_from="10.0.0.0/8, ::1").validate().trusted_proxies()
    with pytest.raises(ConfigError, match="not a network"):
        NodeConfig(proxy_protocol_from="10.0.0.0/8,proxy.local").validate()


# ---------------------------------------------------------------- end to end


def test_per_address_cap_applies_to_the_address_the_proxy_names(start_node):
    """Item 10: with 127.0.0.1 trusted and max_conns_per_ip 3, three clients
    the proxy says come from 203.0.113.7 fill that address's cap (the 4th
    gets ADDRESS_LIMIT), while a client it says comes from 198.51.100.9
    still gets in, and v2 LOCAL health checks count as the proxy's own
    address (127.0.0.1, its own cap of 3)."""
    node = start_node("--proxy-protocol-from", "127.0.0.0/8", "--max-conns-per-ip", "3",
                      "--max-unauthenticated-per-ip", "3")
    dest = (node.host, node.port)
    held = []
    for i in range(3):
        c = RawClient(node.host, node.port)
        header = (encode_v1 if i % 2 else encode_v2)(("203.0.113.7", 40000 + i), dest)
        c.send_raw(header)
        assert isinstance(c.hello(token(f"behind-{i}")), pb.AuthOk)
        held.append(c)
    fourth = RawClient(node.host, node.port)
    fourth.send_raw(encode_v1(("203.0.113.7", 40009), dest))
    frames = fourth.until_closed(timeout=5)
    assert [m.reason for t, m in frames if t == FT.ERROR] == [pb.ADDRESS_LIMIT]
    # The proxy's own address and another client are not held to 203.0.113.7's cap.
    other = RawClient(node.host, node.port)
    other.send_raw(encode_v2(("198.51.100.9", 1234), dest))
    assert isinstance(other.hello(token("other")), pb.AuthOk)
    # v2 LOCAL (the proxy's health check) counts against the proxy's own address.
    for i in range(3):
        local = RawClient(node.host, node.port)
        local.send_raw(encode_v2(None))
        assert isinstance(local.hello(token(f"check-{i}")), pb.AuthOk), "v2 LOCAL refused"
        held.append(local)
    local = RawClient(node.host, node.port)
    local.send_raw(encode_v2(None))
    assert local.hello(token("check-3")).reason == pb.ADDRESS_LIMIT
    log = node.log()
    assert "refused connection from 203.0.113.7" in log
    assert "refused connection from 127.0.0.1" in log
    # A client that leaves gives the address its slot back.
    held[0].close()
    time.sleep(0.3)
    again = RawClient(node.host, node.port)
    again.send_raw(encode_v1(("203.0.113.7", 40010), dest))
    assert isinstance(again.hello(token("again")), pb.AuthOk)


@pytest.mark.parametrize("node_loop", ["uvloop"])
def test_trusted_source_without_a_valid_header_is_closed_at_once(start_node):
    """Item 10: from a trusted network, a missing or malformed header closes
    the connection (counted, throttled log); an untrusted source's PROXY
    header is just a bad frame."""
    node = start_node("--proxy-protocol-from", "127.0.0.1/32")
    t0 = time.monotonic()
    bad = RawClient(node.host, node.port)
    bad.send_raw(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n")
    assert bad.until_closed(timeout=3) == []
    bare = RawClient(node.host, node.port)         # a fanout Hello, no header
    bare.send(FT.HELLO, pb.Hello(token=token("x")))
    assert bare.until_closed(timeout=3) == []
    assert time.monotonic() - t0 < 1.0
    silent = RawClient(node.host, node.port)        # nothing at all: the header deadline
    t1 = time.monotonic()
    assert silent.until_closed(timeout=5) == []
    assert 1.5 < time.monotonic() - t1 < 3.5
    assert node.log().count("closing connection from trusted proxy 127.0.0.1") == 3
    # 127.0.0.2 is not trusted: its PROXY header is a bad frame.
    src = socket.socket()
    src.bind(("127.0.0.2", 0))
    src.settimeout(5)
    src.connect((node.host, node.port))
    src.sendall(encode_v1(("1.2.3.4", 1), ("5.6.7.8", 2)))
    data = b""
    while True:
        chunk = src.recv(4096)
        if not chunk:
            break
        data += chunk
    frames = list(wire.FrameDecoder().feed(data))
    assert frames and frames[0][0] == FT.ERROR
    assert wire.decode_message(FT.ERROR, frames[0][2]).reason != pb.REASON_UNSPECIFIED
