"""Type stubs for the compiled core, fanout._core (sources in pyx/)."""

from asyncio import AbstractEventLoop
from typing import Callable

from collections.abc import Buffer

HELLO: int
JOIN: int
LEAVE: int
CHAT: int
PING: int
AUTH_OK: int
ERROR: int
BATCH: int
KICK: int
PONG: int
GAP: int
ACK: int
PRESENCE: int
STATUS_SLOW: int
STATUS_DEAD: int

class FrameError(Exception):
    reason: int
    def __init__(self, reason: int, message: str) -> None: ...

def encode_room_message(room: str, seq: int, kind: int, priority: int, sender: str,
                        payload: Buffer, server_ts_ms: int) -> bytes: ...
def pack_frame(ftype: int, body: Buffer, compress_min: int = 0) -> bytes: ...
def parse_frames(data: Buffer, max_body: int) -> tuple[list[tuple[int, int, bytes]], int]: ...

class Connection:
    fd: int
    state: int
    owner: object
    last_recv: float
    eof: bool
    max_frame: int
    max_backlog_bytes: int
    backlog_bytes: int
    frames_sent: int
    bytes_sent: int
    bytes_received: int
    def __init__(self, fd: int, loop: AbstractEventLoop, *, max_frame: int = 65536,
                 max_backlog_bytes: int = 1048576, max_backlog_frames: int = 1024) -> None: ...
    @property
    def backlog_frames(self) -> int: ...
    @property
    def closing(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    def send(self, frame: bytes, force: bool = False) -> int: ...
    def close_after(self, frame: bytes, drop_queued: bool = True) -> None: ...
    def close(self) -> None: ...
    def start_reading(self, callback: Callable[[], object]) -> None: ...
    def read(self) -> list[tuple[int, int, bytes]]: ...

class Room:
    name: str
    epoch: str
    last_seq: int
    flushed_seq: int
    pending_count: int
    frames_built: int
    deliveries: int
    bytes_in: int
    bytes_out: int
    last_flush: float
    first_pending: float
    sampled: bool
    last_activity: float
    def add(self, conn: Connection) -> bool: ...
    def discard(self, conn: Connection) -> bool: ...
    def __len__(self) -> int: ...
    def __contains__(self, conn: object) -> bool: ...
    @property
    def members(self) -> list[Connection]: ...
    @property
    def oldest_seq(self) -> int: ...
    def pending_bytes(self) -> int: ...
    def reset(self, epoch: str, head_seq: int) -> None: ...
    def replay(self, after_seq: int, max_frame_bytes: int,
               compress_min: int = 0) -> tuple[int, int, list[bytes]]: ...
    def stats(self) -> dict[str, int]: ...

class Hub:
    rooms: dict[str, Room]
    max_delay: float
    max_batch_bytes: int
    compress_min: int
    ring_size: int
    ring_bytes: int
    flushes: int
    flush_observer: Callable[[int, int, int, int, float], object] | None
    def __init__(self, loop: AbstractEventLoop, *, max_delay: float = 0.05,
                 max_batch_bytes: int = 65536, compress_min: int = 256,
                 ring_size: int = 1024, ring_bytes: int = 1048576) -> None: ...
    def room(self, name: str, epoch: str, head_seq: int) -> Room: ...
    def publish(self, room_name: str, epoch: str, seq: int, record: bytes,
                sampled: bool = False) -> bool: ...
    def broadcast(self, room_name: str, frame: bytes) -> int: ...
    def flush(self, room_name: str | None = None) -> None: ...
    def sweep(self, idle_ttl: float) -> int: ...
