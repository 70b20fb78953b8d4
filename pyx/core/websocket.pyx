# The WebSocket kind (see websocket.pxd for the data flow and rules).

from libc.string cimport memcmp
from libc.stdlib cimport free
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from fanout.protocol import fanout_pb2 as _pb

cdef extern from "<string.h>" nogil:
    # GNU; Python.h (pyconfig.h) defines _GNU_SOURCE on Linux
    void* memmem(const void* hay, size_t hay_n, const void* needle, size_t needle_n)

cdef enum:
    MAX_REQUEST_HEAD = 8192      # browsers send under 2 KiB; cookies are not ours to read
    WS_FIN = 0x80
    WS_OP_CONT = 0x0
    WS_OP_TEXT = 0x1
    WS_OP_BINARY = 0x2
    WS_OP_CLOSE = 0x8
    WS_OP_PING = 0x9
    WS_OP_PONG = 0xA
    WS_MASK_BIT = 0x80
    WS_MAX_CONTROL = 125
    WS_CLOSE_NORMAL = 1000
    WS_CLOSE_NO_STATUS = 1005
    WS_CLOSE_REASON_BASE = 4000  # + a fanout Reason: the private-use range of RFC 6455 7.4.2

# At most one pong per connection this often: a ping costs the client 6
# bytes and a pong costs the node a send(), so a ping flood must not buy
# one syscall per ping (RFC 6455 5.5.3 lets a reply skip to the latest).
cdef double PONG_INTERVAL = 1.0

# Item type of the handshake's request head in read()'s output: above every
# wire frame type (a u8), so no client frame can pose as it.
UPGRADE_REQUEST = 0x100
MAX_UPGRADE_REQUEST = MAX_REQUEST_HEAD
CLOSE_REASON_BASE = WS_CLOSE_REASON_BASE


def close_code(int reason):
    """The WebSocket close code the node sends after a frame with ``reason``."""
    return WS_CLOSE_REASON_BASE + reason if reason else WS_CLOSE_NORMAL


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline void _unmask(char* p, Py_ssize_t n, const uint8_t* key) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        p[i] = <char>(<uint8_t>p[i] ^ key[i & 3])


cdef class WsConnection(Connection):
    """A browser's connection: RFC 6455 framing around wire protocol v1
    frames (one frame per server message; see docs/protocol.md section 8).

    The first item :meth:`read` returns is ``(UPGRADE_REQUEST, 0, head)``,
    the opening handshake's request head; the owner answers it with
    :meth:`accept_upgrade` or :meth:`refuse_upgrade`.
    """

    def __init__(self, int fd, loop, **limits):
        super().__init__(fd, loop, **limits)
        self._prefix_tag = prefix_tag(("websocket",))

    def __dealloc__(self):
        free(self._msg)

    @property
    def upgraded(self):
        """True once the 101 response is sent: frames may go out."""
        return self._ws_state == WS_OPEN

    # ---------------------------------------------------------------- the handshake

    def accept_upgrade(self, bytes response):
        """Send the 101 ``response`` (nothing was sent before it, so it goes
        straight to the socket). False if the socket did not take all of it
        at once; the caller then aborts."""
        if self._ws_state != WS_UPGRADING or self.state != CONN_OPEN:
            raise RuntimeError("no upgrade request is waiting for an answer")
        if not self._send_raw(response):
            return False
        self._ws_state = WS_OPEN
        return True

    def refuse_upgrade(self, bytes response):
        """Send the HTTP refusal ``response`` (best effort), then close as
        close_after() does: half-close, read and discard until the peer
        closes or the owner calls close()."""
        if self.state != CONN_OPEN:
            return
        if self._tls_state == TLS_HANDSHAKE:
            self.close()                  # no HTTP can be sent before the TLS handshake
            return
        self._send_raw(response)
        self.state = CONN_CLOSING
        self._free_carry()
        if self._ssl != NULL:
            fo_tls_close_notify(self._ssl)
        c_shutdown(self.fd, SHUT_WR)
        self.resume_reading()

    cdef bint _send_raw(self, bytes data) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), done = 0
        cdef ssize_t w
        if self._bl_len or self._in_round:
            return False                  # never the case before the upgrade
        while done < n:
            if self._ssl != NULL:         # over TLS (wss_port): after its handshake
                w = fo_tls_send(self._ssl, PyBytes_AS_STRING(data) + done, <size_t>(n - done))
                if w < 0:
                    return False
                done += w
                continue
            w = c_send(self.fd, PyBytes_AS_STRING(data) + done, <size_t>(n - done),
                       MSG_NOSIGNAL | MSG_DONTWAIT)
            if w < 0:
                if errno == EINTR:
                    continue
                return False
            done += w
        self.bytes_sent += <unsigned long long>n
        return True

    # ---------------------------------------------------------------- writing

    cdef Py_ssize_t _write_prefix(self, char* end, Py_ssize_t wire_len) except -1:
        # FIN | binary, then the payload length in the shortest form
        # (RFC 6455 5.2); a server's frames are never masked.
        cdef uint8_t* p
        cdef int i
        if wire_len < 126:
            p = <uint8_t*>end - 2
            p[1] = <uint8_t>wire_len
            p[0] = WS_FIN | WS_OP_BINARY
            return 2
        if wire_len <= 0xFFFF:
            p = <uint8_t*>end - 4
            p[1] = 126
            p[2] = <uint8_t>(wire_len >> 8)
            p[3] = <uint8_t>wire_len
            p[0] = WS_FIN | WS_OP_BINARY
            return 4
        p = <uint8_t*>end - 10
        p[1] = 127
        for i in range(8):
            p[2 + i] = <uint8_t>((<uint64_t>wire_len) >> (56 - 8 * i))
        p[0] = WS_FIN | WS_OP_BINARY
        return 10

    cdef int _control(self, uint8_t opcode, const char* payload, Py_ssize_t n) except -1:
        # A control frame (n <= 125) built as a core frame whose headroom
        # already holds its own header, tagged as this kind's, so it goes
        # through send_frame() and the backlog in order like any frame.
        cdef bytes frame = PyBytes_FromStringAndSize(NULL, HEADROOM + n)
        cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(frame)
        p[HR_TAG] = self._prefix_tag
        p[HR_LEN] = 2
        p[HEADROOM - 2] = WS_FIN | opcode
        p[HEADROOM - 1] = <uint8_t>n
        if n:
            memcpy(p + HEADROOM, payload, n)
        return self.send_frame(frame)

    cdef int _last_words(self, int reason) except -1:
        cdef int code = close_code(reason)
        cdef bytes payload, frame
        cdef uint8_t* p
        if self._ws_state != WS_OPEN:
            return 0
        try:
            name = _pb.Reason.Name(reason) if reason else ""
        except ValueError:
            name = ""
        payload = bytes((code >> 8, code & 0xFF)) + name.encode()[:WS_MAX_CONTROL - 2]
        frame = PyBytes_FromStringAndSize(NULL, HEADROOM + len(payload))
        p = <uint8_t*>PyBytes_AS_STRING(frame)
        p[HR_TAG] = self._prefix_tag
        p[HR_LEN] = 2
        p[HEADROOM - 2] = WS_FIN | WS_OP_CLOSE
        p[HEADROOM - 1] = <uint8_t>len(payload)
        memcpy(p + HEADROOM, PyBytes_AS_STRING(payload), len(payload))
        return self._queue(frame)

    # ---------------------------------------------------------------- reading

    cdef Py_ssize_t _ws_need(self, const char* data, Py_ssize_t n,
                             Py_ssize_t* payload) except -1:
        # The frame header at data: returns its length (mask key included)
        # and sets *payload; while incomplete, returns the length it will
        # have (2 while even that is unknown) and sets *payload to -1.
        # Every check that needs only the header happens here, so a bad or
        # oversized frame is refused before its payload is read.
        cdef const uint8_t* p = <const uint8_t*>data
        cdef uint8_t op, len7
        cdef Py_ssize_t hlen
        cdef uint64_t plen
        cdef int i
        payload[0] = -1
        if n < 2:
            return 2
        op = p[0] & 0x0F
        if p[0] & 0x70:
            raise FrameError(R_BAD_FRAME, "WebSocket RSV bits set: no extension was negotiated")
        if not p[1] & WS_MASK_BIT:
            raise FrameError(R_BAD_FRAME, "client WebSocket frames must be masked")
        len7 = p[1] & 0x7F
        if op >= WS_OP_CLOSE:
            if op > WS_OP_PONG:
                raise FrameError(R_BAD_FRAME, f"WebSocket opcode 0x{op:x} is not defined")
            if not p[0] & WS_FIN:
                raise FrameError(R_BAD_FRAME, "a WebSocket control frame must not be fragmented")
            if len7 > WS_MAX_CONTROL:
                raise FrameError(R_BAD_FRAME, "WebSocket control frame over 125 bytes")
        elif op == WS_OP_BINARY:
            if self._in_message:
                raise FrameError(R_BAD_FRAME, "a WebSocket message began inside a fragmented one")
        elif op == WS_OP_CONT:
            if not self._in_message:
                raise FrameError(R_BAD_FRAME, "WebSocket continuation frame without a message")
        elif op == WS_OP_TEXT:
            raise FrameError(R_BAD_REQUEST, "WebSocket text messages are not accepted: send "
                             "wire protocol frames in binary messages")
        else:
            raise FrameError(R_BAD_FRAME, f"WebSocket opcode 0x{op:x} is not defined")
        hlen = 2 if len7 < 126 else (4 if len7 == 126 else 10)
        if n < hlen:
            return hlen + 4
        if len7 < 126:
            plen = len7
        elif len7 == 126:
            plen = (<uint64_t>p[2] << 8) | p[3]
        else:
            plen = 0
            for i in range(8):
                plen = (plen << 8) | p[2 + i]
        if op < WS_OP_CLOSE and plen > <uint64_t>(self._max_frame + HEADER_SIZE - self._msg_len):
            raise FrameError(R_FRAME_TOO_LARGE, f"WebSocket message over "
                             f"{self._max_frame + HEADER_SIZE} bytes, the node's limit")
        payload[0] = <Py_ssize_t>plen
        return hlen + 4

    cdef Py_ssize_t _need(self, const char* data, Py_ssize_t n) except -1:
        cdef Py_ssize_t hlen, plen
        if self._ws_state == WS_HANDSHAKE:
            # Carried byte by byte once the head spans reads: the head is
            # complete exactly when its last four bytes end the carry.
            if n >= 4 and memcmp(data + n - 4, b"\r\n\r\n", 4) == 0:
                return n
            if n >= MAX_REQUEST_HEAD:
                raise FrameError(R_BAD_REQUEST, f"HTTP request head over {MAX_REQUEST_HEAD} bytes")
            return n + 1
        hlen = self._ws_need(data, n, &plen)
        return hlen if plen < 0 else hlen + plen

    cdef Py_ssize_t _parse(self, const char* data, Py_ssize_t n, list out,
                           Py_ssize_t max_frames) except -1:
        cdef Py_ssize_t pos = 0, hlen, plen
        cdef const char* end
        cdef char* payload
        cdef uint8_t op, fin
        if self.eof:
            return n                      # nothing after a Close counts
        if self._ws_state == WS_HANDSHAKE:
            end = <const char*>memmem(data, <size_t>n, b"\r\n\r\n", 4)
            if end == NULL or end + 4 - data > MAX_REQUEST_HEAD:
                if n >= MAX_REQUEST_HEAD:
                    raise FrameError(R_BAD_REQUEST,
                                     f"HTTP request head over {MAX_REQUEST_HEAD} bytes")
                return 0
            pos = end + 4 - data
            out.append((UPGRADE_REQUEST, 0, PyBytes_FromStringAndSize(data, pos)))
            self._ws_state = WS_UPGRADING
        while pos < n:
            hlen = self._ws_need(data + pos, n - pos, &plen)
            if plen < 0 or n - pos < hlen + plen:
                break
            op = data[pos] & 0x0F
            fin = data[pos] & WS_FIN
            # Our own buffer (the shared scratch or the carry): unmasked in
            # place, once, now that the frame is complete.
            payload = <char*>data + pos + hlen
            _unmask(payload, plen, <const uint8_t*>payload - 4)
            pos += hlen + plen
            if op == WS_OP_BINARY and fin:
                self._message(payload, plen, out, max_frames)
            elif op == WS_OP_BINARY or op == WS_OP_CONT:
                self._in_message = True
                self._append(payload, plen)
                if fin:
                    self._in_message = False
                    try:
                        self._message(self._msg, self._msg_len, out, max_frames)
                    finally:
                        free(self._msg)
                        self._msg = NULL
                        self._msg_len = self._msg_cap = 0
            elif op == WS_OP_PING:
                # Only to a client that reads what it gets (a pong never
                # queues), and at most one per PONG_INTERVAL.
                if (self._ws_state == WS_OPEN and not self._bl_len and not self._in_round
                        and _now() - self._pong_at >= PONG_INTERVAL):
                    self._pong_at = _now()
                    self._control(WS_OP_PONG, payload, plen)
                    self.pings_answered += 1
            elif op == WS_OP_CLOSE:
                self.close_code = ((<uint8_t>payload[0] << 8) | <uint8_t>payload[1]
                                   if plen >= 2 else WS_CLOSE_NO_STATUS)
                if self._ws_state == WS_OPEN and not self._bl_len and not self._in_round:
                    self._control(WS_OP_CLOSE, payload, 2 if plen >= 2 else 0)
                self.eof = True           # the owner closes, as after a FIN
                return n
            # a pong: nothing to do; its bytes already count as activity
        return pos

    cdef int _message(self, const char* data, Py_ssize_t n, list out,
                      Py_ssize_t max_frames) except -1:
        if split_frames(data, n, self._max_frame, out, max_frames) != n:
            raise FrameError(R_BAD_FRAME, "a WebSocket message must hold whole wire frames; "
                             "one ended inside it")
        return 0

    cdef int _append(self, const char* data, Py_ssize_t n) except -1:
        # _ws_need bounded _msg_len + n by the message limit already. The
        # buffer grows geometrically: a message in many tiny fragments must
        # not cost a copy of itself per fragment.
        cdef char* grown
        cdef Py_ssize_t cap
        if self._msg_len + n > self._msg_cap:
            cap = 2 * self._msg_cap
            if cap < self._msg_len + n:
                cap = self._msg_len + n
            if cap > self._max_frame + HEADER_SIZE:
                cap = self._msg_len + n
            grown = <char*>realloc(self._msg, cap if cap else 1)
            if grown == NULL:
                raise MemoryError()
            self._msg = grown
            self._msg_cap = cap
        if n:
            memcpy(self._msg + self._msg_len, data, n)
        self._msg_len += n
        return 0
