"""A blocking raw-socket client for protocol-level tests.

It speaks the wire format through fanout.protocol.wire (the pure-Python reference
codec), independent of the compiled core the node uses.
"""

from __future__ import annotations

import base64
import os
import socket
import time

from fanout.protocol import wire
from fanout.protocol import fanout_pb2 as pb

FT = wire.FrameType


class RawClient:
    def __init__(self, host: str, port: int, *, timeout: float = 10.0, rcvbuf: int | None = None,
                 source: str | None = None):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        if source is not None:
            self.sock.bind((source, 0))              # another client address on loopback
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect((host, port))
        except ConnectionResetError:
            pass            # refused at accept; on loopback the RST can beat connect()
        self.decoder = wire.FrameDecoder()
        self.pending: list = []
        self.closed = False

    def send(self, ftype: int, msg) -> None:
        try:
            self.sock.sendall(wire.encode_frame(ftype, msg))
        except (ConnectionResetError, BrokenPipeError):
            # Refused at accept, the node resets the socket: what it sent
            # first (the Error) stays readable, then reads see EOF.
            pass

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, tok: str, *, device_class: str = "", resume=()) -> pb.AuthOk | pb.Error:
        self.send(FT.HELLO, pb.Hello(token=tok, device_id="test", device_class=device_class,
                                     resume=list(resume)))
        return self.expect(FT.AUTH_OK, FT.ERROR)

    def join(self, room: str, req_id: int = 1, last_seq: int = 0, epoch: str = ""):
        self.send(FT.JOIN, pb.Join(req_id=req_id, room=room, last_seq=last_seq, epoch=epoch))
        return self.expect(FT.ACK, FT.ERROR)

    def chat(self, room: str, payload: bytes, req_id: int = 2):
        self.send(FT.CHAT, pb.Chat(req_id=req_id, room=room, payload=payload))

    def _fill(self, deadline: float) -> bool:
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(262144)
            except socket.timeout:
                return False
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                return False
            self._take(data)
        return True

    def _take(self, data: bytes) -> None:
        for ftype, _flags, body in self.decoder.feed(data):
            self.pending.append((ftype, wire.decode_message(ftype, body)))

    def next(self, timeout: float = 10.0):
        """Next (frame type, message); None at EOF or timeout."""
        if not self._fill(time.monotonic() + timeout):
            return None
        return self.pending.pop(0)

    def expect(self, *types: int, timeout: float = 10.0):
        item = self.next(timeout)
        assert item is not None, f"expected {types}, got EOF/timeout"
        ftype, msg = item
        assert ftype in types, f"expected {[FT(t).name for t in types]}, got {FT(ftype).name}: {msg}"
        return msg

    def messages(self, count: int, timeout: float = 10.0) -> list[pb.RoomMessage]:
        """Collect ``count`` RoomMessages from Batch frames."""
        out: list[pb.RoomMessage] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            item = self.next(max(0.0, deadline - time.monotonic()))
            assert item is not None, f"got {len(out)} of {count} messages"
            ftype, msg = item
            if ftype == FT.BATCH:
                out.extend(msg.messages)
        return out

    def until_closed(self, timeout: float = 10.0) -> list:
        """All frames until the node closes the connection."""
        frames = []
        deadline = time.monotonic() + timeout
        while True:
            item = self.next(max(0.0, deadline - time.monotonic()))
            if item is None:
                assert self.closed, "node did not close the connection"
                return frames
            frames.append(item)

    def close(self) -> None:
        self.sock.close()


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True,
             rsv: int = 0, length: int | None = None) -> bytes:
    """One client WebSocket frame (RFC 6455 5.2), masked unless told not to;
    ``length`` overrides the declared payload length (to lie about it)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n <= 0xFFFF:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def upgrade_request(path: str = "/ws", *, host: str = "127.0.0.1", key: str | None = None,
                    extra: str = "", version: str = "13") -> bytes:
    key = key or base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: {version}\r\n{extra}\r\n").encode()


class WsRawClient(RawClient):
    """RawClient over the node's WebSocket port: wire frames ride in masked
    binary messages one by one; what the node sends is de-framed here, its
    control frames kept in ``controls`` and a Close's code in ``close_code``.
    ``upgrade=False`` leaves the handshake to the test."""

    def __init__(self, host: str, port: int, *, timeout: float = 10.0, upgrade: bool = True,
                 path: str = "/ws", headers: str = "", **kwargs):
        super().__init__(host, port, timeout=timeout, **kwargs)
        self._buf = b""
        self.controls: list[tuple[int, bytes]] = []
        self.close_code: int | None = None
        self.response = b""
        if upgrade:
            self.response = self.handshake(path, headers)
            assert self.response.startswith(b"HTTP/1.1 101 "), self.response

    def handshake(self, path: str = "/ws", headers: str = "", request: bytes | None = None) -> bytes:
        """Send the upgrade request; return the response head (and body, for
        a refusal) as read until the head ends (a refusal: until close)."""
        self.sock.sendall(request or upgrade_request(path, extra=headers))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101 "):
            while True:
                try:
                    chunk = self.sock.recv(65536)
                except (socket.timeout, ConnectionResetError):
                    break
                if not chunk:
                    break
                rest += chunk
            return head + b"\r\n\r\n" + rest
        self._take(rest)
        return head + b"\r\n\r\n"

    def send(self, ftype: int, msg) -> None:
        try:
            self.sock.sendall(ws_frame(0x2, wire.encode_frame(ftype, msg)))
        except (ConnectionResetError, BrokenPipeError):
            pass

    def _frames(self):
        # Complete server frames off the buffer: (fin, opcode, payload).
        while len(self._buf) >= 2:
            b0, b1 = self._buf[0], self._buf[1]
            assert not b1 & 0x80, "a server frame must not be masked"
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if len(self._buf) < 4:
                    return
                n, pos = int.from_bytes(self._buf[2:4], "big"), 4
            elif n == 127:
                if len(self._buf) < 10:
                    return
                n, pos = int.from_bytes(self._buf[2:10], "big"), 10
            if len(self._buf) < pos + n:
                return
            payload, self._buf = self._buf[pos:pos + n], self._buf[pos + n:]
            yield b0 & 0x80, b0 & 0x0F, payload

    def _take(self, data: bytes) -> None:
        self._buf += data
        for fin, opcode, payload in self._frames():
            assert fin, "the node never fragments"
            if opcode == 0x2:
                frames = list(self.decoder.feed(payload))
                assert len(frames) == 1 and not self.decoder._buf, \
                    "one wire frame per WebSocket message"
                for ftype, _flags, body in frames:
                    self.pending.append((ftype, wire.decode_message(ftype, body)))
            else:
                self.controls.append((opcode, payload))
                if opcode == 0x8:
                    self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
