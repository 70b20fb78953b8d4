"""Shedding a connection flood in the kernel: addresses that keep being
refused get their new connections dropped before they reach the accept
queue.

Refusing a connection costs the node an accept, a send and a close; a flood
from a few dozen addresses refused as fast as the node can refuse keeps the
listen queue full, and a valid client's SYN is then dropped by the kernel and
retried a second later. So an IPv4 address refused at least ``threshold``
times within a second is *shed* for ``seconds``: a classic BPF filter on the
listening socket (``SO_ATTACH_FILTER``) drops the packets it sends to the
listener (its SYNs), so its connection attempts wait on the kernel's SYN
retries and leave the queue to everyone else. Connections the address
already holds are untouched (their packets go to their own sockets). The
filter is rebuilt when the set changes, at most :data:`MAX_SHED` addresses.

IPv6 sources are not shed (a /64 per subscriber makes a short list of
addresses a poor filter); they keep the per-address caps. Nothing here runs
for connections behind a trusted proxy: their packets come from the proxy.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import socket
import struct
from typing import Callable

from .slots import address_key

log = logging.getLogger("fanout.listener")

#: Addresses the filter holds at most: classic BPF jumps are 8-bit.
MAX_SHED = 200
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
# Classic BPF: the network header, whatever the socket layer's offset.
_SKF_NET_OFF = -0x100000
_LD_B_ABS, _LD_W_ABS, _ALU_AND_K, _JEQ_K, _RET_K = 0x30, 0x20, 0x54, 0x15, 0x06
_INSN = struct.Struct("=HBBI")


def filter_program(addresses: list[int]) -> bytes:
    """A classic BPF program that drops IPv4 packets from ``addresses``
    (host-order ints) and accepts everything else."""
    n = len(addresses)
    if n > MAX_SHED:
        raise ValueError(f"at most {MAX_SHED} addresses")
    net = _SKF_NET_OFF & 0xFFFFFFFF
    insns = [
        (_LD_B_ABS, 0, 0, net),                 # version and IHL
        (_ALU_AND_K, 0, 0, 0xF0),
        (_JEQ_K, 0, n + 1, 0x40),               # not IPv4: accept
        (_LD_W_ABS, 0, 0, net + 12),            # IPv4 source address
    ]
    for i, addr in enumerate(addresses):
        insns.append((_JEQ_K, n - i, 0, addr))  # match: jump to the drop
    insns.append((_RET_K, 0, 0, 0xFFFFFFFF))    # accept
    insns.append((_RET_K, 0, 0, 0))             # drop
    return b"".join(_INSN.pack(*insn) for insn in insns)


def attach(sock: socket.socket, program: bytes) -> None:
    """Attach ``program`` to ``sock`` (replacing any filter it had)."""
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // _INSN.size, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class SynShed:
    """:param socks: the listening sockets (every client port: a flooding
        address is shed from all of them).
    :param threshold: refusals of one address within a second that shed it
        (0: never shed).
    :param seconds: how long an address stays shed.
    :param on_shed: ``on_shed(ip, count)`` when an address is shed.
    """

    def __init__(self, socks: list[socket.socket], loop: asyncio.AbstractEventLoop, *,
                 threshold: int, seconds: float,
                 on_shed: Callable[[str, int], object] | None = None) -> None:
        self._socks = socks
        self._loop = loop
        self.threshold = threshold
        self.seconds = seconds
        self._on_shed = on_shed
        self._window_start = 0.0
        self._refusals: dict[int, int] = {}     # this second's refusals per IPv4 address
        self.shed: dict[int, float] = {}        # address -> when it is let back in
        self._timer: asyncio.TimerHandle | None = None
        self.rebuilds = 0
        self._working = threshold > 0

    def refused(self, ip: str) -> None:
        """One more connection from ``ip`` was refused."""
        if not self._working:
            return
        now = self._loop.time()
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._refusals.clear()
        addr = _ipv4(ip)
        if addr is None or addr in self.shed:
            return
        count = self._refusals.get(addr, 0) + 1
        self._refusals[addr] = count
        if count >= self.threshold and len(self.shed) < MAX_SHED:
            self.shed[addr] = now + self.seconds
            if self._on_shed is not None:
                self._on_shed(ip, count)
            self._rebuild()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._working = False

    def _expire(self) -> None:
        self._timer = None
        now = self._loop.time()
        self.shed = {a: until for a, until in self.shed.items() if until > now}
        self._rebuild()

    def _rebuild(self) -> None:
        try:
            program = filter_program(list(self.shed)) if self.shed else None
            for sock in self._socks:
                if program is not None:
                    attach(sock, program)
                else:
                    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        except OSError as exc:
            # No filter (a kernel without it, a closed socket): the caps
            # still hold, only without the kernel's help.
            log.warning("connection-flood filter unavailable (%s); refusing in the node only",
                        exc)
            self._working = False
            self.shed.clear()
            return
        self.rebuilds += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.shed:
            self._timer = self._loop.call_at(min(self.shed.values()), self._expire)


def _ipv4(ip: str) -> int | None:
    key = address_key(ip)            # an IPv4-mapped address is its IPv4 client
    if ":" in key:
        return None
    try:
        return int(ipaddress.IPv4Address(key))
    except ValueError:
        return None
