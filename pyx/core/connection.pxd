# Where a frame is written: the base of every client connection kind (as
# uvloop's transports derive from one stream base). It owns the socket, its
# write backlog and its read loop; a kind adds only what differs:
#
#   TcpConnection (tcp.pyx)          frames as they are; fanout framing on input
#   PrefixConnection (prefixed.pyx)  a fixed header before every frame: the
#                                    seam's second kind, used by the tests
#   WsConnection (websocket.pyx)     RFC 6455: a frame header written once per
#                                    frame into its headroom, masked client
#                                    frames undone in C
#
# Exactly one writer per socket: every byte a client receives, control
# replies included, goes through send_frame(), so frames never interleave.
# A large room's frame is written by the core's writer threads instead
# (rounds.pxd); while a connection is in such a round, send_frame() queues
# and nothing drains, and the round's leftover goes back at the front of the
# backlog when the loop thread reconciles it.
#
# Write backlog: a ring of references to core frames (frame.pxd; shared with
# every other member of the room, no copy per recipient) plus the absolute
# offset already written of the oldest one. The frame objects stay alive, and
# so their buffers valid, until the backlog drops its reference.
#
# Prefixed kinds: before a frame's first write on such a connection,
# _prefixed() makes sure the frame's headroom holds this kind's header
# (_prefix_tag names the kind, from prefix_tag()): written once per frame for
# all connections of the kind by _write_prefix(); if another prefixed kind
# got there first, each connection of this kind writes a private copy
# (counted in prefix_copies; rooms are expected to hold one prefixed kind at
# most).
#
# Read side: frames are parsed from a scratch buffer shared by all
# connections (the loop is single-threaded). The carry buffer holds at most
# the one incomplete frame at the end of the input: when more bytes come,
# only those that complete it are copied in (its header says how many), it
# is parsed and freed, and the rest is parsed straight from the scratch
# buffer. Its allocation grows with what arrived, never past that frame's
# header + body (<= HEADER_SIZE + max_frame), and an idle connection holds
# no read memory. The kind's input framing is _parse() and _need().
#
# read() never raises for bad input: it returns the frames before the first
# bad one and keeps the error in read_error; from then on no input is parsed.
# The owner answers the good frames first, in order, then fails the
# connection with that error (a request budget overrun is one such error).
#
# TLS (tls.pxd) is a property of the base, whatever the kind: a connection
# made with a TlsContext holds an SSL object (_ssl) and does every write
# and read through it (tlsio.h), its kind's framing inside the TLS stream.
#   * handshake first (_tls_state TLS_HANDSHAKE), driven by readability and
#     writability; frames sent meanwhile are queued, the owner's read
#     callback is not called, and a write round queues it like a backlog.
#     A failure (or plaintext on the port) reports SEND_TLS to the owner with
#     the reason in tls_error, then closes; a fanout frame sent in plaintext
#     gets a plaintext Error(BAD_REQUEST) first, so that client sees why.
#   * one thread per SSL object: while the connection is in a write round a
#     writer thread may be in SSL_write, so its reads wait (the reader is
#     removed, _tls_read_deferred) until _after_round; a closing connection
#     discards input with recv() on the socket, never through SSL.
#   * a write that came back short left a record half sent inside OpenSSL:
#     _tls_retry says the backlog's head must be written next, from its
#     offset, even if no byte of it was counted yet (_drop_unstarted keeps
#     it). The backlog drains with SSL_write per frame (no writev).
#   * data OpenSSL decrypted but read() left (its per-wake budget) is read on
#     a later loop turn (_tls_reread), the socket being readable or not.
#   * bytes_sent/bytes_received count the plaintext stream.
#
# Closing: a closing connection reads and discards input to see the peer's
# close, at most MAX_READS_PER_WAKE reads per wake and MAX_DISCARD bytes in
# all; past that it is aborted (RST).

from cpython.ref cimport PyObject
from libc.stdint cimport uint8_t

cdef enum SendStatus:
    SEND_OK = 0          # written (or queued behind a backlog that is draining)
    SEND_QUEUED = 1      # partially written; the rest waits for writability
    SEND_SLOW = 2        # backlog over its bound: cut this consumer
    SEND_DEAD = 3        # socket error (peer gone)
    SEND_CLOSED = 4      # connection closing/closed: frame dropped by design

    SEND_TLS = 5         # TLS handshake failed (tls_error says why); closing

cdef enum TlsState:
    TLS_NONE = 0         # a plaintext connection
    TLS_HANDSHAKE = 1
    TLS_OPEN = 2

cdef enum ConnState:
    CONN_OPEN = 0
    CONN_CLOSING = 1     # flushing a final Kick/Error; input read and discarded
    CONN_CLOSED = 2

cdef class Connection:
    cdef readonly int fd
    cdef readonly int state
    cdef object _loop
    cdef public object owner          # control-layer session, see connection.pyx
    cdef object _read_cb              # called with no arguments when readable
    cdef bint _reading
    cdef readonly bint eof            # peer closed or reset its side
    cdef uint8_t _prefix_tag          # 0: frames go out as they are (plain kinds)
    cdef bytes _copy                  # the last private copy _prefixed() made

    # write backlog (ring of owned bytes references)
    cdef PyObject** _bl
    cdef Py_ssize_t _bl_cap
    cdef Py_ssize_t _bl_head
    cdef Py_ssize_t _bl_len
    cdef Py_ssize_t _bl_offset        # absolute offset into the oldest frame
    cdef readonly Py_ssize_t backlog_bytes
    cdef readonly Py_ssize_t unsent_at_close   # backlog bytes dropped by close()/abort()
    cdef readonly Py_ssize_t max_backlog_bytes
    cdef Py_ssize_t _max_backlog_frames
    cdef bint _writer_armed
    # in a write round (rounds.pxd): a writer thread may be writing to fd,
    # so nothing else does, and close() leaves fd open until the round ends
    cdef bint _in_round
    cdef int _deferred_fd             # fd close() left open for the round, or -1

    # TLS (see above); _ssl NULL for plaintext
    cdef SSL* _ssl
    cdef SSL* _deferred_ssl           # freed with _deferred_fd, after the round
    cdef readonly uint8_t _tls_state
    cdef bint _tls_retry
    cdef bint _tls_read_deferred
    cdef bint _tls_reread
    cdef bint _tls_peeked             # first byte checked: TLS, not plaintext
    cdef readonly bint tls_kernel     # the kernel encrypts this connection's writes
    cdef readonly object tls_error    # why the handshake failed, or None

    # read side
    cdef char* _carry
    cdef Py_ssize_t _carry_len
    cdef Py_ssize_t _carry_cap
    cdef Py_ssize_t _max_frame        # property max_frame: settable (smaller before auth)
    cdef readonly object read_error   # FrameError that stopped parsing, or None
    cdef Py_ssize_t _discarded        # bytes read and dropped while closing
    cdef public double last_recv      # loop time of the last byte received

    # counters
    cdef readonly unsigned long long frames_sent
    cdef readonly unsigned long long bytes_sent
    cdef readonly unsigned long long bytes_received

    # the hot path: one frame, from C, for every member of a flushed room
    cdef int send_frame(self, bytes frame) except -1
    cdef PyObject* _prefixed(self, bytes frame) except NULL
    cdef int _queue(self, bytes frame) except -1
    cdef int _enqueue(self, bytes frame, Py_ssize_t offset) except -1
    cdef int _enqueue_front(self, bytes frame, Py_ssize_t offset) except -1
    cdef int _after_round(self, PyObject* obj, Py_ssize_t start, Py_ssize_t n,
                          ssize_t result) except -1
    cdef void _close_deferred(self) noexcept
    cdef int _drain(self) except -1
    cdef int _drain_tls(self) except -1
    cdef int _tls_step(self) except -1
    cdef void _tls_failed(self, str why, bint plaintext) except *
    cdef void _tls_schedule_reread(self) except *
    cdef void _pop_head(self) noexcept
    cdef void _resume_deferred(self) noexcept
    cdef void _arm_writer(self) except *
    cdef void _disarm_writer(self) except *
    cdef void _release_backlog(self) noexcept
    cdef int _discard_input(self) except -1
    cdef int _drop_unstarted(self) except -1
    cdef int _take(self, const char* data, Py_ssize_t n, list out,
                   Py_ssize_t max_frames) except -1
    cdef int _keep(self, const char* data, Py_ssize_t n, Py_ssize_t need) except -1
    cdef void _free_carry(self) noexcept
    cdef void _report(self, int status) except *

    # what a kind overrides
    cdef Py_ssize_t _write_prefix(self, char* end, Py_ssize_t wire_len) except -1
    # queued after close_after()'s last frame: a kind's own closing words
    # (WebSocket: a Close carrying the reason); nothing for plain kinds
    cdef int _last_words(self, int reason) except -1
    # (_parse: complete frames off data into out, at most max_frames in out
    # in all; returns the bytes consumed. _need: the bytes the frame starting
    # at data needs in all, as far as the n bytes there tell. Both raise
    # FrameError on bad input.)
    cdef Py_ssize_t _parse(self, const char* data, Py_ssize_t n, list out,
                           Py_ssize_t max_frames) except -1
    cdef Py_ssize_t _need(self, const char* data, Py_ssize_t n) except -1
