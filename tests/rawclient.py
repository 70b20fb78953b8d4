"""A blocking raw-socket client for protocol-level tests.

It speaks the wire format through fanout.protocol.wire (the pure-Python reference
codec), independent of the compiled core the node uses.
"""

from __future__ import annotations

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
            for ftype, _flags, body in self.decoder.feed(data):
                self.pending.append((ftype, wire.decode_message(ftype, body)))
        return True

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
