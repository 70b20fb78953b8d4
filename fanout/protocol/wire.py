"""Pure-Python reference codec of the fanout wire protocol v1.

This module is the executable form of ``docs/protocol.md``. The client SDK
(:mod:`fanout.client`) uses it, and the tests use it to cross-check the
compiled codec of the node (``fanout._core``). It favours being obviously
correct over being fast; it never imports the compiled core.

A frame is an 8-byte header followed by a body::

    version:u8  type:u8  flags:u8  reserved:u8  length:u32 big-endian

The body is the protobuf message of the frame type
(``fanout/protocol/fanout.proto``). With :data:`FLAG_LZ4` set, the body is
``u32 little-endian uncompressed size`` followed by one raw LZ4 block; with
:data:`FLAG_DICT` as well, a dictionary id byte comes between the two and
the block was compressed with that pre-shared dictionary
(:data:`DICTIONARIES`).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import struct
from importlib import resources

import lz4.block
from google.protobuf.message import DecodeError, Message

from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.errors import ReasonError

__all__ = [
    "VERSION",
    "HEADER_SIZE",
    "FLAG_LZ4",
    "FLAG_DICT",
    "FLAGS_DEFINED",
    "DICTIONARIES",
    "DICT_SHA256",
    "dictionary",
    "DEFAULT_COMPRESS_MIN",
    "MAX_SERVER_FRAME",
    "FrameType",
    "MESSAGE_TYPES",
    "CLIENT_TO_SERVER",
    "SERVER_TO_CLIENT",
    "WireError",
    "KIND_NAMES",
    "KIND_CODES",
    "encode_varint",
    "encode_frame",
    "FrameDecoder",
    "decode_message",
]

#: Protocol version carried in byte 0 of every header.
VERSION = 1
#: Size of the frame header in bytes.
HEADER_SIZE = 8
#: Flag bit 0: the body is LZ4-compressed.
FLAG_LZ4 = 0x01
#: Flag bit 1, only with bit 0: the LZ4 block uses a pre-shared dictionary,
#: whose id is the body's fifth byte. No other flag bit is defined.
FLAG_DICT = 0x02
#: Every flag bit a receiver accepts.
FLAGS_DEFINED = FLAG_LZ4 | FLAG_DICT
#: The pre-shared LZ4 dictionaries by id, and the SHA-256 of each file:
#: ``fanout/protocol/lz4dict-<id>.bin``, built by ``scripts/make_dict.py``.
DICT_SHA256 = {
    1: "f42cf83165448aba00b58bff1e95a385a122cd4bd932ce095fbd6e15c6bd32b3",
}
#: Bodies shorter than this are sent uncompressed (node default as well).
DEFAULT_COMPRESS_MIN = 256
#: Largest server->client body a client must accept, compressed or not.
MAX_SERVER_FRAME = 16 * 1024 * 1024

_HEADER = struct.Struct(">BBBBI")
_STORED_SIZE = struct.Struct("<I")
_MAX_LENGTH = 0xFFFFFFFF
_DICT_PREFIX = struct.Struct("<IB")     # uncompressed size, dictionary id


def _load_dictionaries() -> dict[int, bytes]:
    out = {}
    for dict_id, digest in DICT_SHA256.items():
        data = resources.files(__package__).joinpath(f"lz4dict-{dict_id}.bin").read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise RuntimeError(f"lz4dict-{dict_id}.bin does not match its SHA-256; "
                               "rebuild it with scripts/make_dict.py")
        out[dict_id] = data
    return out


#: Dictionary bytes by id (every id of :data:`DICT_SHA256`), checked at import.
DICTIONARIES: dict[int, bytes] = _load_dictionaries()


def dictionary(dict_id: int) -> bytes:
    """The dictionary ``dict_id``; :class:`WireError` (``BAD_COMPRESSION``)
    for an id this codec does not hold."""
    try:
        return DICTIONARIES[dict_id]
    except KeyError:
        raise WireError(pb.BAD_COMPRESSION, f"unknown lz4 dictionary id {dict_id}") from None


class FrameType(enum.IntEnum):
    """Frame type codes (header byte 1).

    Client->server types are below ``0x40``; server->client types have
    bit 6 set.
    """

    HELLO = 0x01
    JOIN = 0x02
    LEAVE = 0x03
    CHAT = 0x04
    PING = 0x05
    REFRESH = 0x06
    AUTH_OK = 0x41
    ERROR = 0x42
    BATCH = 0x43
    KICK = 0x44
    PONG = 0x45
    GAP = 0x46
    ACK = 0x47
    PRESENCE = 0x48


#: The protobuf message class carried by each frame type.
MESSAGE_TYPES = {
    FrameType.HELLO: pb.Hello,
    FrameType.JOIN: pb.Join,
    FrameType.LEAVE: pb.Leave,
    FrameType.CHAT: pb.Chat,
    FrameType.PING: pb.Ping,
    FrameType.REFRESH: pb.Refresh,
    FrameType.AUTH_OK: pb.AuthOk,
    FrameType.ERROR: pb.Error,
    FrameType.BATCH: pb.Batch,
    FrameType.KICK: pb.Kick,
    FrameType.PONG: pb.Pong,
    FrameType.GAP: pb.Gap,
    FrameType.ACK: pb.Ack,
    FrameType.PRESENCE: pb.Presence,
}

#: Frame types a client may send.
CLIENT_TO_SERVER = frozenset(
    (FrameType.HELLO, FrameType.JOIN, FrameType.LEAVE, FrameType.CHAT, FrameType.PING,
     FrameType.REFRESH)
)
#: Frame types a server may send.
SERVER_TO_CLIENT = frozenset(MESSAGE_TYPES) - CLIENT_TO_SERVER

#: Message kinds by code, named as the admin API and tools spell them
#: ("chat", "gift", "system"); the codes are ``fanout.proto``'s ``Kind``.
KIND_NAMES = {v.number: v.name.lower() for v in pb.Kind.DESCRIPTOR.values if v.number}
#: The same table by name.
KIND_CODES = {name: code for code, name in KIND_NAMES.items()}


def encode_varint(n: int) -> bytes:
    """``n`` (0 .. 2**64-1) as a protobuf base-128 varint, for tools that
    assemble message bytes themselves (the load publisher pre-encodes its
    requests)."""
    if not 0 <= n < 1 << 64:
        raise ValueError(f"varint {n!r} is not an unsigned 64-bit integer")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class WireError(ReasonError):
    """A frame or body violates the protocol.

    The compiled core raises this same class (``fanout._core.FrameError``).

    :ivar reason: the ``fanout.v1.Reason`` code (an ``int``) a node would
        put in the :class:`Error` it sends before closing the connection.
    :ivar message: human-readable detail.
    """


def encode_frame(
    ftype: int,
    body: Message | bytes,
    *,
    compress_min: int = DEFAULT_COMPRESS_MIN,
    dict_id: int = 0,
) -> bytes:
    """Build one complete frame (header and body).

    The body is LZ4-compressed when ``compress_min > 0``, it is at least
    ``compress_min`` bytes long, and compressing makes it strictly smaller.
    With ``dict_id`` (one of :data:`DICTIONARIES`) it is compressed with
    that dictionary and flagged :data:`FLAG_DICT`.

    :param ftype: frame type, any value ``0..255`` (see :class:`FrameType`).
    :param body: the protobuf message, or its already-encoded bytes.
    :param compress_min: smallest body worth compressing; ``0`` disables
        compression.
    :param dict_id: pre-shared dictionary to compress with; ``0``: none.
    :returns: the frame, ready to write to the socket.
    :raises TypeError: ``body`` is a protobuf message of another frame type.
    :raises ValueError: ``ftype`` is out of range, the body is over 4 GiB, or
        ``dict_id`` is not one of :data:`DICTIONARIES`.
    """
    if not 0 <= ftype <= 0xFF:
        raise ValueError(f"frame type {ftype!r} is not a byte")
    if dict_id and dict_id not in DICTIONARIES:
        raise ValueError(f"unknown lz4 dictionary id {dict_id}")
    if isinstance(body, Message):
        expected = MESSAGE_TYPES.get(ftype)
        if expected is not None and not isinstance(body, expected):
            raise TypeError(
                f"frame type {FrameType(ftype).name} carries {expected.__name__}, "
                f"not {type(body).__name__}"
            )
        body = body.SerializeToString()
    else:
        body = bytes(body)
    flags = 0
    if 0 < compress_min <= len(body):
        if dict_id:
            packed = _DICT_PREFIX.pack(len(body), dict_id) + lz4.block.compress(
                body, store_size=False, dict=dictionary(dict_id))
            packed_flags = FLAG_LZ4 | FLAG_DICT
        else:
            packed = lz4.block.compress(body, store_size=True)
            packed_flags = FLAG_LZ4
        if len(packed) < len(body):
            body, flags = packed, packed_flags
    if len(body) > _MAX_LENGTH:
        raise ValueError(f"body of {len(body)} bytes does not fit a u32 length")
    return _HEADER.pack(VERSION, ftype, flags, 0, len(body)) + body


def _inflate(body: bytes, max_body: int, flags: int = FLAG_LZ4) -> bytes:
    """Decompress an LZ4 body (u32le size [+ dictionary id] + raw block),
    enforcing the limit."""
    prefix = _DICT_PREFIX.size if flags & FLAG_DICT else _STORED_SIZE.size
    if len(body) < prefix:
        raise WireError(pb.BAD_COMPRESSION, f"lz4 body of {len(body)} bytes has no size prefix")
    (size,) = _STORED_SIZE.unpack_from(body)
    # Checked before inflating so a tiny frame cannot make us allocate 4 GiB.
    if size > max_body:
        raise WireError(
            pb.BAD_COMPRESSION, f"lz4 body inflates to {size} bytes, limit is {max_body}"
        )
    try:
        # python-lz4 fails unless the block inflates to exactly `size` bytes.
        if not flags & FLAG_DICT:
            return lz4.block.decompress(body)
        # Given a size instead of reading it, python-lz4 takes it as a
        # limit: the exact size is checked here.
        out = lz4.block.decompress(body[prefix:], uncompressed_size=size,
                                   dict=dictionary(body[4]))
    except lz4.block.LZ4BlockError as exc:
        raise WireError(pb.BAD_COMPRESSION, f"corrupt lz4 body: {exc}") from None
    if len(out) != size:
        raise WireError(pb.BAD_COMPRESSION,
                        f"lz4 body inflates to {len(out)} bytes, not the stated {size}")
    return out


class FrameDecoder:
    """Incremental splitter of a byte stream into frames.

    Feed it whatever the socket returned; it returns the frames completed by
    that data and keeps any incomplete tail for the next call. A header is
    validated as soon as its 8 bytes are in, before its body arrives, so an
    oversized length is rejected without buffering the body.

    The frame type is not checked here (any byte is passed through); use
    :func:`decode_message` for that.

    After a :class:`WireError` the stream position is lost, so the decoder is
    broken for good: every later :meth:`feed` raises the same error. Frames
    completed earlier in the failing call are discarded with it; the peer
    violated the protocol and the connection is to be closed anyway.

    :param max_body: largest body length accepted, and largest size an LZ4
        body may inflate to. Clients use :data:`MAX_SERVER_FRAME`; a node
        uses its ``max_frame`` setting.
    """

    def __init__(self, max_body: int = MAX_SERVER_FRAME) -> None:
        self.max_body = max_body
        self._buf = bytearray()
        # Bytes that must be buffered before parsing can make progress; saves
        # re-reading a header while a large body trickles in.
        self._need = HEADER_SIZE
        self._error: WireError | None = None

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Add received bytes and return the frames they complete.

        :param data: bytes read from the stream (may be empty).
        :returns: ``(frame_type, flags, body)`` per complete frame, in stream
            order; ``body`` is already decompressed.
        :raises WireError: the stream violates the protocol (see the class
            description; the decoder stays broken).
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        if len(buf) < self._need:
            return []
        frames = []
        pos = 0
        end = len(buf)
        try:
            while end - pos >= HEADER_SIZE:
                ftype, flags, length = self._check_header(buf, pos)
                stop = pos + HEADER_SIZE + length
                if stop > end:
                    break
                body = bytes(buf[pos + HEADER_SIZE : stop])
                if flags & FLAG_LZ4:
                    body = _inflate(body, self.max_body, flags)
                frames.append((ftype, flags, body))
                pos = stop
        except WireError as exc:
            self._error = exc
            self._buf = bytearray()
            raise
        del buf[:pos]
        self._need = (
            HEADER_SIZE + _HEADER.unpack_from(buf)[4] if len(buf) >= HEADER_SIZE else HEADER_SIZE
        )
        return frames

    def _check_header(self, buf: bytearray, pos: int) -> tuple[int, int, int]:
        version, ftype, flags, reserved, length = _HEADER.unpack_from(buf, pos)
        if version != VERSION:
            raise WireError(pb.UNSUPPORTED_VERSION, f"header version {version}, expected {VERSION}")
        if flags & ~FLAGS_DEFINED or flags == FLAG_DICT:
            raise WireError(pb.BAD_FRAME, f"undefined flag bits set: 0x{flags:02x}")
        if reserved:
            raise WireError(pb.BAD_FRAME, f"reserved header byte is 0x{reserved:02x}, must be 0")
        if length > self.max_body:
            raise WireError(
                pb.FRAME_TOO_LARGE, f"body length {length} over the limit of {self.max_body}"
            )
        return ftype, flags, length

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)


def decode_message(ftype: int, body: bytes) -> Message:
    """Parse a frame body into the protobuf message of its frame type.

    Unknown fields are kept by protobuf and otherwise ignored, as the
    compatibility rules require.

    :param ftype: the frame type from the header.
    :param body: the (decompressed) body.
    :returns: an instance of ``MESSAGE_TYPES[ftype]``.
    :raises WireError: ``UNKNOWN_FRAME_TYPE`` for a type not in
        :data:`MESSAGE_TYPES`; ``BAD_PROTOBUF`` if the body does not parse.
    """
    cls = MESSAGE_TYPES.get(ftype)
    if cls is None:
        raise WireError(pb.UNKNOWN_FRAME_TYPE, f"unknown frame type 0x{ftype:02x}")
    try:
        return cls.FromString(body)
    except DecodeError as exc:
        raise WireError(pb.BAD_PROTOBUF, f"{cls.__name__} body does not parse: {exc}") from None


def record_json(record: bytes) -> tuple[pb.RoomMessage, dict]:
    """A stored room message (one ``Batch.messages`` record, as a router
    encodes it) and the fields every JSON view of it shows: seq, kind name,
    sender, server_ts_ms, and the payload as text, or base64 as
    ``payload_b64`` when it is not UTF-8."""
    msg = pb.Batch.FromString(record).messages[0]
    out = {"seq": msg.seq, "kind": KIND_NAMES.get(msg.kind, str(msg.kind)),
           "sender": msg.sender, "server_ts_ms": msg.server_ts_ms}
    try:
        out["payload"] = msg.payload.decode("utf-8")
    except UnicodeDecodeError:
        out["payload_b64"] = base64.b64encode(msg.payload).decode("ascii")
    return msg, out
