"""The PROXY protocol header (HAProxy's spec, versions 1 and 2) that a
trusted load balancer puts in front of a client's stream, naming the real
client address.

:func:`parse` reads one header from the bytes peeked at the start of a
stream: it says how long the header is, so the caller consumes exactly that
and leaves the client's first frame in the socket. Only the source address
matters here; TLVs are skipped.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107                # the spec's longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16               # signature, version/command, family, length
# The spec allows 64 KiB of TLVs; real proxies send well under a few
# hundred bytes (addresses, an ALPN or SSL note), and a peeked header must
# fit one bounded buffer.
V2_MAX_BODY = 2048
MAX_HEADER = V2_FIXED + V2_MAX_BODY

_V2_ADDRESS_LEN = {0x1: 12, 0x2: 36, 0x3: 216}     # INET, INET6, UNIX


class ProxyHeaderError(ValueError):
    """The stream does not start with a valid PROXY header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """:ivar length: bytes the header takes at the start of the stream.
    :ivar source: the real client ``(host, port)``, or None when the header
        names none (v1 ``UNKNOWN``, v2 ``LOCAL``, UNSPEC or UNIX family): the
        connection is then the proxy's own.
    """

    length: int
    source: tuple[str, int] | None


def parse(data) -> ProxyHeader | None:
    """The header at the start of ``data`` (a bytes-like object), or None
    when ``data`` is a proper prefix of one (read more and try again).

    :raises ProxyHeaderError: not a PROXY header, malformed, or longer than
        :data:`MAX_HEADER`.
    """
    data = bytes(data[:MAX_HEADER])
    if data.startswith(V2_SIGNATURE[:len(data)]) and data[:1] == b"\r":
        return _parse_v2(data)
    if data.startswith(V1_PREFIX[:len(data)]):
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyHeaderError("PROXY v1 line not ended by CRLF")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    length = end + 2
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(length, None)       # the rest of the line is ignored
    if len(parts) != 6:
        raise ProxyHeaderError(f"PROXY v1 line has {len(parts)} fields, not 6")
    _, proto, src, _dst, sport, dport = parts
    if proto not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"PROXY v1 protocol {proto[:8]!r} is not TCP4, TCP6 or UNKNOWN")
    address_type = ipaddress.IPv4Address if proto == "TCP4" else ipaddress.IPv6Address
    try:
        host = str(address_type(src))
        address_type(_dst)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 addresses are not {proto} addresses") from None
    port = _v1_port(sport)
    _v1_port(dport)
    return ProxyHeader(length, (host, port))


def _v1_port(text: str) -> int:
    # The spec's ports are plain decimal numbers, without sign or leading zeros.
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0") \
            or not text.isascii() or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1 port {text[:8]!r} is not 0-65535")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED:
        return None
    ver_cmd, fam, body_len = data[12], data[13], int.from_bytes(data[14:16], "big")
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {ver_cmd >> 4}")
    command = ver_cmd & 0xF
    if command > 1:
        raise ProxyHeaderError(f"PROXY v2 command {command} is neither LOCAL nor PROXY")
    if body_len > V2_MAX_BODY:
        raise ProxyHeaderError(f"PROXY v2 header of {body_len} bytes, over {V2_MAX_BODY}")
    length = V2_FIXED + body_len
    if len(data) < length:
        return None
    if command == 0:                           # LOCAL: the proxy's own connection
        return ProxyHeader(length, None)
    family, transport = fam >> 4, fam & 0xF
    if family > 3 or transport > 2:
        raise ProxyHeaderError(f"PROXY v2 address family byte 0x{fam:02x} is not defined")
    if family == 0 or family == 3:             # UNSPEC, UNIX: no address to use
        if body_len < _V2_ADDRESS_LEN.get(family, 0):
            raise ProxyHeaderError("PROXY v2 address block shorter than its family's")
        return ProxyHeader(length, None)
    if transport != 1:
        raise ProxyHeaderError("PROXY v2 header for a transport other than a stream")
    if body_len < _V2_ADDRESS_LEN[family]:
        raise ProxyHeaderError("PROXY v2 address block shorter than its family's")
    if family == 1:
        host = str(ipaddress.IPv4Address(data[16:20]))
        port = int.from_bytes(data[24:26], "big")
    else:
        host = str(ipaddress.IPv6Address(data[16:32]))
        port = int.from_bytes(data[48:50], "big")
    return ProxyHeader(length, (host, port))


def encode_v1(source: tuple[str, int], dest: tuple[str, int]) -> bytes:
    """A v1 header for ``source`` -> ``dest`` (tests and tools)."""
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {proto} {source[0]} {dest[0]} {source[1]} {dest[1]}\r\n".encode("ascii")


def encode_v2(source: tuple[str, int] | None, dest: tuple[str, int] | None = None,
              tlvs: bytes = b"") -> bytes:
    """A v2 PROXY header for ``source`` -> ``dest``, or LOCAL when ``source``
    is None (tests and tools)."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + len(tlvs).to_bytes(2, "big") + tlvs
    dest = dest or (("::" if ":" in source[0] else "0.0.0.0"), 0)
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(dest[0])
    fam = 0x11 if src.version == 4 else 0x21
    body = (src.packed + dst.packed + source[1].to_bytes(2, "big") + dest[1].to_bytes(2, "big")
            + tlvs)
    return V2_SIGNATURE + bytes([0x21, fam]) + len(body).to_bytes(2, "big") + body
