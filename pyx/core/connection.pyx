# Socket I/O of one client connection: the base of every kind (see
# connection.pxd).
#
# Owner protocol: `owner` is the control-layer session. The core calls
#   owner.connection_failed(status)  backlog over bound (SEND_SLOW) or socket
#                                    error (SEND_DEAD); never from inside a
#                                    room's write loop (the Hub defers it);
#   owner.connection_lost()          exactly once, from close().

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
# EWOULDBLOCK equals EAGAIN on the platforms we build for (Linux, BSDs).
from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy
from cpython.pyport cimport PY_SSIZE_T_MAX

from system cimport c_send, c_recv, c_shutdown, c_writev, c_close, iovec, \
    MSG_NOSIGNAL, MSG_DONTWAIT, SHUT_WR
from openssl cimport SSL_free, SSL_pending, SSL_get_version, SSL_get_cipher_name

cdef extern from "<sys/socket.h>" nogil:
    enum: MSG_PEEK
    struct linger:
        int l_onoff
        int l_linger
    int c_setsockopt "setsockopt"(int fd, int level, int name, const void* val,
                                  unsigned int n)
    enum: SOL_SOCKET
    enum: SO_LINGER

# Invariant checks for debug builds only (setup.py: FANOUT_DEBUG=1); in a
# release build the macro expands to nothing, so the hot path pays nothing.
cdef extern from *:
    """
    #include <assert.h>
    #ifdef FANOUT_DEBUG
    #define FANOUT_ASSERT(cond) assert(cond)
    #else
    #define FANOUT_ASSERT(cond) ((void)0)
    #endif
    /* FANOUT_SLOW (setup.py) adds busy work to every recipient write, to
       prove the performance regression check fails on a slower core. */
    #ifdef FANOUT_SLOW
    #define FANOUT_SLOWDOWN() do { volatile int i_; for (i_ = 0; i_ < 3000; i_++) {} } while (0)
    #else
    #define FANOUT_SLOWDOWN() ((void)0)
    #endif
    """
    void FANOUT_ASSERT(bint cond) nogil
    void FANOUT_SLOWDOWN() nogil

cdef enum:
    SCRATCH_SIZE = 65536
    MAX_IOV = 64                 # frames per writev; well under IOV_MAX
    MAX_READS_PER_WAKE = 4       # bound one connection's share of a loop turn
    # What a closing connection may still send before it is cut with an RST:
    # room for what a client had in flight (a drain can take seconds of
    # chat and pings), not for a flood.
    MAX_DISCARD = 256 * 1024

# One read buffer for every connection: the loop is single-threaded and a
# read callback parses everything it reads before returning.
cdef char _scratch[SCRATCH_SIZE]

# Frames a prefixed connection had to copy because another prefixed kind's
# header already sat in the shared frame's headroom.
cdef unsigned long long _prefix_copies = 0

# Headroom tags (1-255), one per distinct prefix of every prefixed kind, so
# kinds never mistake each other's header for their own (connection.pxd).
cdef dict _prefix_tags = {}


cdef uint8_t prefix_tag(object key) except 0:
    """The headroom tag of prefix ``key`` (any hashable naming the kind's
    header, e.g. ("prefix", b"AB") or ("websocket",)), made on first use."""
    tag = _prefix_tags.get(key)
    if tag is None:
        if len(_prefix_tags) >= 255:
            raise ValueError("at most 255 distinct connection prefixes")
        tag = _prefix_tags[key] = len(_prefix_tags) + 1
    return tag


# Status codes, exported for the control layer.
STATUS_SLOW = SEND_SLOW
STATUS_DEAD = SEND_DEAD
STATUS_TLS = SEND_TLS

# What a TLS port answers a client that sent a fanout frame in plaintext,
# in plaintext (it could read nothing else): Error(BAD_REQUEST).
_NOT_TLS_MESSAGE = b"this port speaks TLS: connect with TLS (fanout listen --tls)"
_NOT_TLS_FRAME = pack_frame(FT_ERROR, bytes([0x08, R_BAD_REQUEST, 0x12, len(_NOT_TLS_MESSAGE)])
                            + _NOT_TLS_MESSAGE, 0)
TLS_RECORD_HANDSHAKE = 0x16       # the first byte of every TLS ClientHello


def prefix_copies():
    """Frames copied for a prefixed connection (see connection.pxd)."""
    return _prefix_copies


cdef void _on_writable(Connection conn) except *:
    cdef int st
    if conn._tls_state == TLS_HANDSHAKE:
        conn._tls_step()
        return
    st = conn._drain()
    if st == SEND_DEAD:
        if conn.state == CONN_CLOSING:
            conn.close()
        else:
            conn._report(SEND_DEAD)


def _writable_cb(Connection conn):
    _on_writable(conn)


def _readable_cb(Connection conn):
    if conn.state == CONN_CLOSING:
        conn._discard_input()
    elif conn.state == CONN_OPEN:
        if conn._ssl != NULL:
            if conn._tls_state == TLS_HANDSHAKE:
                conn._tls_step()
                return
            if conn._in_round:
                # A writer thread may be in SSL_write on this SSL object:
                # read once the round is back (WriteRound.release).
                conn._loop.remove_reader(conn.fd)
                conn._reading = False
                conn._tls_read_deferred = True
                return
        conn._read_cb()


def _tls_reread_cb(Connection conn):
    conn._tls_reread = False
    if conn._reading:
        _readable_cb(conn)


cdef inline Py_ssize_t _wire_start(Connection conn, object frame) noexcept:
    # Where this connection's bytes of a core frame begin (frame.pxd).
    if conn._prefix_tag:
        return HEADROOM - (<const uint8_t*>PyBytes_AS_STRING(frame))[HR_LEN]
    return HEADROOM


cdef class Connection:
    """A client socket owned by the core: framed reads, zero-copy writes.

    The base of every connection kind; instantiate a kind
    (:class:`TcpConnection`). The connection takes ownership of ``fd``
    (non-blocking) and closes it.
    """

    def __cinit__(self, int fd, loop, *args, **kwargs):
        # Owns fd from here on (closed in __dealloc__), whatever __init__ does.
        # Limits and kind options are __init__'s, where each kind checks its own.
        self.fd = fd
        self.state = CONN_OPEN
        self._loop = loop
        self._bl = NULL
        self._carry = NULL
        self._deferred_fd = -1

    def __init__(self, int fd, loop, *, Py_ssize_t max_frame=65536,
                  Py_ssize_t max_backlog_bytes=1 << 20,
                  Py_ssize_t max_backlog_frames=1024, TlsContext tls=None):
        if type(self) is Connection:
            raise TypeError("Connection is the base of the connection kinds; "
                            "use TcpConnection")
        if max_frame <= 0 or max_backlog_bytes <= 0 or max_backlog_frames <= 0:
            raise ValueError("limits must be positive")
        self._max_frame = max_frame
        self.max_backlog_bytes = max_backlog_bytes
        self._max_backlog_frames = max_backlog_frames
        self.last_recv = loop.time()
        if tls is not None and self._ssl == NULL:
            self._ssl = tls._new_ssl(self.fd)
            self._tls_state = TLS_HANDSHAKE

    def __dealloc__(self):
        self._release_backlog()
        free(self._bl)
        free(self._carry)
        self._close_deferred()
        if self._ssl != NULL:
            SSL_free(self._ssl)
            self._ssl = NULL
        if self.fd >= 0:
            c_close(self.fd)

    # ---------------------------------------------------------------- writing

    cdef int send_frame(self, bytes frame) except -1:
        # The hot path, once per member per flush. `obj` is the frame this
        # connection writes: the shared one, or the private copy _prefixed()
        # keeps alive. A raw pointer, so no reference is taken per recipient.
        cdef PyObject* obj = <PyObject*>frame
        cdef Py_ssize_t start = HEADROOM, n
        cdef ssize_t w
        cdef int err = 0
        if self.state != CONN_OPEN:
            return SEND_CLOSED
        FANOUT_SLOWDOWN()
        if self._prefix_tag:
            obj = self._prefixed(frame)
            start -= (<const uint8_t*>PyBytes_AS_STRING(<object>obj))[HR_LEN]
        n = PyBytes_GET_SIZE(<object>obj) - start
        if self._bl_len or self._in_round or self._tls_state == TLS_HANDSHAKE:
            # Behind a backlog, a writer thread's round or a TLS handshake:
            # queue in order (one writer), or give up on a consumer that
            # cannot keep up rather than buffer without bound.
            if (self.backlog_bytes + n > self.max_backlog_bytes
                    or self._bl_len >= self._max_backlog_frames):
                return SEND_SLOW
            self._enqueue(<bytes>obj, start)
            return SEND_OK
        if self._ssl == NULL:
            w = c_send(self.fd, PyBytes_AS_STRING(<object>obj) + start, <size_t>n,
                       MSG_NOSIGNAL | MSG_DONTWAIT)
            if w < 0:
                err = errno
        else:
            w = fo_tls_send(self._ssl, PyBytes_AS_STRING(<object>obj) + start, <size_t>n)
            if w < 0:
                err = <int>-w
        if w == n:
            self.frames_sent += 1
            self.bytes_sent += <unsigned long long>n
            return SEND_OK
        if w < 0:
            if err != EAGAIN and err != EINTR:
                return SEND_DEAD
            w = 0
        if self._ssl != NULL:
            self._tls_retry = True        # a record is half sent: this frame goes next
        self.bytes_sent += <unsigned long long>w
        self._enqueue(<bytes>obj, start + w)
        self._arm_writer()
        return SEND_QUEUED

    cdef PyObject* _prefixed(self, bytes frame) except NULL:
        # `frame` with this kind's header in its headroom: itself (borrowed,
        # alive for the caller), or a private copy held in _copy until the
        # next one, when another prefixed kind's header is already there.
        cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(frame)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(frame), plen
        global _prefix_copies
        if p[HR_TAG] == self._prefix_tag:
            return <PyObject*>frame           # another member of the kind wrote it
        if p[HR_TAG] != 0:
            self._copy = PyBytes_FromStringAndSize(PyBytes_AS_STRING(frame), size)
            _prefix_copies += 1
            frame = self._copy
            p = <uint8_t*>PyBytes_AS_STRING(frame)
        plen = self._write_prefix(<char*>p + HEADROOM, size - HEADROOM)
        if plen <= 0 or plen > MAX_PREFIX:
            raise ValueError(f"a connection prefix must be 1-{MAX_PREFIX} bytes, got {plen}")
        p[HR_LEN] = <uint8_t>plen
        p[HR_TAG] = self._prefix_tag
        return <PyObject*>frame

    cdef Py_ssize_t _write_prefix(self, char* end, Py_ssize_t wire_len) except -1:
        # A prefixed kind writes its header for a wire frame of wire_len
        # bytes so that it ends at `end`, and returns its length.
        raise NotImplementedError("a kind with a prefix tag must write its prefix")

    cdef int _last_words(self, int reason) except -1:
        return 0

    cdef int _queue(self, bytes frame) except -1:
        # The whole frame (this kind's bytes of it) behind the backlog, past
        # its bound: for frames the node bounds itself (replays, a last word).
        cdef PyObject* obj = <PyObject*>frame
        if self._prefix_tag:
            obj = self._prefixed(frame)
        return self._enqueue(<bytes>obj, _wire_start(self, <object>obj))

    cdef int _enqueue(self, bytes frame, Py_ssize_t offset) except -1:
        cdef Py_ssize_t i, new_cap
        cdef PyObject** grown
        if self._bl_len == self._bl_cap:
            new_cap = 8 if self._bl_cap == 0 else self._bl_cap * 2
            grown = <PyObject**>malloc(new_cap * sizeof(PyObject*))
            if grown == NULL:
                raise MemoryError()
            for i in range(self._bl_len):
                grown[i] = self._bl[(self._bl_head + i) % self._bl_cap]
            free(self._bl)
            self._bl = grown
            self._bl_cap = new_cap
            self._bl_head = 0
        Py_INCREF(frame)
        self._bl[(self._bl_head + self._bl_len) % self._bl_cap] = <PyObject*>frame
        if self._bl_len == 0:
            self._bl_offset = offset
        self._bl_len += 1
        self.backlog_bytes += PyBytes_GET_SIZE(frame) - offset
        return 0

    cdef int _enqueue_front(self, bytes frame, Py_ssize_t offset) except -1:
        # A round's leftover: it was written before anything queued during
        # the round, so it goes out first.
        if self._bl_len == 0:
            return self._enqueue(frame, offset)
        self._enqueue(frame, offset)          # grows the ring if needed
        # _enqueue put it last; rotate it to the front.
        self._bl_len -= 1
        self._bl[(self._bl_head + self._bl_len) % self._bl_cap] = NULL
        self._bl_head = (self._bl_head + self._bl_cap - 1) % self._bl_cap
        self._bl[self._bl_head] = <PyObject*>frame
        self._bl_len += 1
        # The old head was queued during the round, so never started: its
        # bytes are already counted from its wire start, as a non-head's are.
        FANOUT_ASSERT(self._bl_offset == _wire_start(
            self, <object>self._bl[(self._bl_head + 1) % self._bl_cap]))
        self._bl_offset = offset
        return 0

    cdef int _after_round(self, PyObject* obj, Py_ssize_t start, Py_ssize_t n,
                          ssize_t result) except -1:
        # A writer thread wrote obj[start:start+n] and the kernel took
        # `result` bytes (or -errno). Returns a SendStatus for the Hub.
        cdef int st
        self._in_round = False
        if self._deferred_fd >= 0:
            self._close_deferred()          # closed during the round
            return SEND_CLOSED
        if self.state == CONN_CLOSED:
            return SEND_CLOSED
        if result == n:
            self.frames_sent += 1
            self.bytes_sent += <unsigned long long>n
        elif result >= 0 or result == -EAGAIN:
            if self._ssl != NULL:
                self._tls_retry = True    # the writer thread left a record half sent
            if result > 0:
                self.bytes_sent += <unsigned long long>result
                start += result
            self._enqueue_front(<bytes>obj, start)
        elif self.state == CONN_CLOSING:
            self.close()
            return SEND_CLOSED
        else:
            return SEND_DEAD
        if self._bl_len == 0:
            return SEND_OK
        if result == n:
            # only frames queued during the round: the socket took the
            # whole frame, so it most likely takes these too
            st = self._drain()
            if st == SEND_OK:
                return SEND_OK
            if st == SEND_DEAD:
                if self.state == CONN_CLOSING:
                    self.close()
                    return SEND_CLOSED
                return SEND_DEAD
        self._arm_writer()
        if self.state == CONN_OPEN and (self.backlog_bytes > self.max_backlog_bytes
                                        or self._bl_len > self._max_backlog_frames):
            return SEND_SLOW
        return SEND_QUEUED

    cdef void _close_deferred(self) noexcept:
        if self._deferred_ssl != NULL:
            SSL_free(self._deferred_ssl)
            self._deferred_ssl = NULL
        if self._deferred_fd >= 0:
            c_close(self._deferred_fd)
            self._deferred_fd = -1

    cdef int _drain(self) except -1:
        cdef iovec iov[MAX_IOV]
        cdef int cnt, i
        cdef ssize_t w
        cdef Py_ssize_t left, start
        cdef PyObject* head
        if self._in_round:
            # a writer thread owns the socket; the round's end drains it
            self._disarm_writer()
            return SEND_QUEUED
        if self._ssl != NULL:
            return self._drain_tls()
        while self._bl_len:
            cnt = <int>(self._bl_len if self._bl_len < MAX_IOV else MAX_IOV)
            for i in range(cnt):
                head = self._bl[(self._bl_head + i) % self._bl_cap]
                start = self._bl_offset if i == 0 else _wire_start(self, <object>head)
                iov[i].iov_base = PyBytes_AS_STRING(<object>head) + start
                iov[i].iov_len = <size_t>(PyBytes_GET_SIZE(<object>head) - start)
            FANOUT_ASSERT(iov[0].iov_len > 0)
            w = c_writev(self.fd, iov, cnt)
            if w < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    return SEND_QUEUED
                return SEND_DEAD
            self.bytes_sent += <unsigned long long>w
            self.backlog_bytes -= w
            while w > 0:
                head = self._bl[self._bl_head]
                left = PyBytes_GET_SIZE(<object>head) - self._bl_offset
                if w < left:
                    self._bl_offset += w
                    break
                w -= left
                self._pop_head()
            if self._bl_len:
                return SEND_QUEUED     # short write: the socket is full
        FANOUT_ASSERT(self.backlog_bytes == 0 and self._bl_offset == 0)
        self._disarm_writer()
        if self.state == CONN_CLOSING:
            # Final frame is out. Half-close and keep reading until the peer
            # closes: closing with unread input would send RST, and an RST
            # can destroy the Kick/Error the client has not read yet.
            c_shutdown(self.fd, SHUT_WR)
        return SEND_OK

    cdef int _drain_tls(self) except -1:
        # The backlog through SSL_write, a frame at a time (there is no
        # writev of records). A short write leaves the head's rest as the
        # next write, as OpenSSL requires.
        cdef ssize_t w
        cdef Py_ssize_t n
        cdef PyObject* head
        if self._tls_state != TLS_OPEN:
            return SEND_QUEUED            # the handshake's end drains it
        while self._bl_len:
            head = self._bl[self._bl_head]
            n = PyBytes_GET_SIZE(<object>head) - self._bl_offset
            FANOUT_ASSERT(n > 0)
            w = fo_tls_send(self._ssl, PyBytes_AS_STRING(<object>head) + self._bl_offset,
                            <size_t>n)
            if w < 0:
                if w == -EAGAIN:
                    self._tls_retry = True
                    return SEND_QUEUED
                return SEND_DEAD
            self.bytes_sent += <unsigned long long>w
            self.backlog_bytes -= w
            if w < n:
                self._bl_offset += w
                self._tls_retry = True
                return SEND_QUEUED
            self._tls_retry = False
            self._pop_head()
        FANOUT_ASSERT(self.backlog_bytes == 0 and self._bl_offset == 0)
        self._disarm_writer()
        if self.state == CONN_CLOSING:
            # As _drain: the last frame is out; close_notify, then half-close.
            fo_tls_close_notify(self._ssl)
            c_shutdown(self.fd, SHUT_WR)
        return SEND_OK

    cdef void _pop_head(self) noexcept:
        # The head frame is fully written: drop it.
        cdef PyObject* head = self._bl[self._bl_head]
        self._bl[self._bl_head] = NULL
        Py_DECREF(<object>head)
        self._bl_head = (self._bl_head + 1) % self._bl_cap
        self._bl_len -= 1
        self._bl_offset = (_wire_start(self, <object>self._bl[self._bl_head])
                           if self._bl_len else 0)
        self.frames_sent += 1

    # ---------------------------------------------------------------- TLS

    cdef int _tls_step(self) except -1:
        # One step of the handshake, on readability or writability.
        cdef char why[256]
        cdef unsigned char first
        cdef ssize_t p
        cdef int r
        global _tls_count_kernel, _tls_count_core
        if not self._tls_peeked:
            # A TLS client's first byte opens a handshake record; anything
            # else is a client speaking plaintext to a TLS port.
            p = c_recv(self.fd, &first, 1, MSG_PEEK | MSG_DONTWAIT)
            if p < 0:
                if errno == EAGAIN or errno == EINTR:
                    return 0
                self.tls_error = "socket error before the handshake"
                self._report(SEND_DEAD)
                if self.state != CONN_CLOSED:
                    self.close()
                return 0
            if p == 0:
                self.tls_error = "closed before the handshake"
                self._report(SEND_DEAD)
                if self.state != CONN_CLOSED:
                    self.close()
                return 0
            self._tls_peeked = True
            if first != TLS_RECORD_HANDSHAKE:
                if first == WIRE_VERSION:
                    # a fanout client without TLS: tell it, best effort
                    c_send(self.fd, PyBytes_AS_STRING(_NOT_TLS_FRAME),
                           <size_t>PyBytes_GET_SIZE(_NOT_TLS_FRAME), MSG_NOSIGNAL | MSG_DONTWAIT)
                self._tls_failed(f"not TLS (plaintext on a TLS port, first byte 0x{first:02x})",
                                 True)
                return 0
        r = fo_tls_handshake(self._ssl, why, sizeof(why))
        if r == FO_TLS_WANT_READ:
            self._disarm_writer()
            return 0
        if r == FO_TLS_WANT_WRITE:
            self._arm_writer()
            return 0
        if r == FO_TLS_FAILED:
            self._tls_failed(why.decode("utf-8", "replace"), False)
            return 0
        self._tls_state = TLS_OPEN
        self.tls_kernel = fo_tls_ktls_send(self._ssl) != 0
        if self.tls_kernel:
            _tls_count_kernel += 1
        else:
            _tls_count_core += 1
        self._disarm_writer()
        if self._bl_len:
            _on_writable(self)            # what was sent during the handshake
            if self._bl_len and self.state != CONN_CLOSED:
                self._arm_writer()
        if self.state == CONN_OPEN and SSL_pending(self._ssl) > 0:
            self._tls_schedule_reread()   # a request that came with the Finished
        return 0

    cdef void _tls_failed(self, str why, bint plaintext) except *:
        # The owner hears why (tls_error) and closes; close anyway.
        global _tls_count_failed, _tls_count_plaintext
        _tls_count_failed += 1
        if plaintext:
            _tls_count_plaintext += 1
        self.tls_error = why
        self._report(SEND_TLS)
        if self.state != CONN_CLOSED:
            self.close()

    cdef void _tls_schedule_reread(self) except *:
        if not self._tls_reread:
            self._tls_reread = True
            self._loop.call_soon(_tls_reread_cb, self)

    cdef void _resume_deferred(self) noexcept:
        # After a write round: the reads a TLS connection put off for it.
        if self._tls_read_deferred:
            self._tls_read_deferred = False
            try:
                self.resume_reading()
            except Exception:
                pass                      # the loop is closed: nothing to read for

    @property
    def tls(self):
        """True for a TLS connection (handshaking or not)."""
        return self._tls_state != TLS_NONE

    @property
    def tls_mode(self):
        """``"kernel"`` or ``"core"``: who encrypts this connection's
        writes, once its handshake is done; None before, and for plaintext."""
        if self._tls_state != TLS_OPEN:
            return None
        return "kernel" if self.tls_kernel else "core"

    @property
    def tls_version(self):
        """The TLS version and cipher agreed (``("TLSv1.3", "TLS_AES_256_GCM_SHA384")``),
        or None."""
        if self._tls_state != TLS_OPEN or self._ssl == NULL:
            return None
        return (SSL_get_version(self._ssl).decode(), SSL_get_cipher_name(self._ssl).decode())

    cdef void _arm_writer(self) except *:
        if not self._writer_armed and self.fd >= 0 and not self._in_round:
            self._loop.add_writer(self.fd, _writable_cb, self)
            self._writer_armed = True

    cdef void _disarm_writer(self) except *:
        if self._writer_armed:
            self._writer_armed = False
            self._loop.remove_writer(self.fd)

    cdef void _release_backlog(self) noexcept:
        cdef PyObject* obj
        while self._bl_len:
            obj = self._bl[self._bl_head]
            self._bl[self._bl_head] = NULL
            Py_DECREF(<object>obj)
            self._bl_head = (self._bl_head + 1) % self._bl_cap
            self._bl_len -= 1
        self._bl_offset = 0
        self.backlog_bytes = 0

    cdef void _report(self, int status) except *:
        owner = self.owner
        if owner is not None and self.state == CONN_OPEN:
            owner.connection_failed(status)

    def send(self, bytes frame, bint force=False):
        """Write one core frame (:func:`core_frame`: control replies,
        replays). Returns the send status; a slow or dead result is also
        reported to the owner.

        ``force`` queues behind a backlog even past its bound: for replies
        whose size the node bounds itself, such as a resume replay.
        """
        cdef int st
        _check_core_frame(frame)
        if force and self.state == CONN_OPEN and self._bl_len:
            self._queue(frame)
            return SEND_OK
        st = self.send_frame(frame)
        if st == SEND_SLOW or st == SEND_DEAD:
            self._report(st)
        return st

    def close_after(self, bytes frame, bint drop_queued=True, int reason=0):
        """Send the core ``frame`` as the last thing on this connection,
        then close. ``reason`` (the frame's Reason, 0 for none) is for a
        kind that says it in its own closing words (a WebSocket Close).

        With ``drop_queued`` (a slow consumer, bad input), queued frames not
        yet started are dropped; a frame already partly written is finished
        so the stream stays parseable. Without it (a drain) everything
        queued goes out first. Input is read and discarded from then on; the
        socket closes once the peer closes or the owner calls close().
        """
        _check_core_frame(frame)
        if self.state != CONN_OPEN:
            return
        if self._tls_state == TLS_HANDSHAKE:
            self.close()                  # nothing can be sent before the handshake
            return
        self.state = CONN_CLOSING
        self._free_carry()             # no more input is parsed
        if drop_queued:
            self._drop_unstarted()
        self._queue(frame)
        self._last_words(reason)
        self.resume_reading()          # in discard mode: see the peer's close
        _on_writable(self)
        if self._bl_len:
            self._arm_writer()

    cdef int _drop_unstarted(self) except -1:
        # Drop queued frames not yet started; a frame already partly written
        # stays, so the stream remains parseable.
        cdef PyObject* obj
        cdef Py_ssize_t started
        if self._bl_len:
            started = (self._bl_offset > _wire_start(self, <object>self._bl[self._bl_head])
                       or self._tls_retry)
            while self._bl_len > (1 if started else 0):
                obj = self._bl[(self._bl_head + self._bl_len - 1) % self._bl_cap]
                self.backlog_bytes -= (PyBytes_GET_SIZE(<object>obj)
                                       - (self._bl_offset if self._bl_len == 1
                                          else _wire_start(self, <object>obj)))
                Py_DECREF(<object>obj)
                self._bl_len -= 1
            if self._bl_len == 0:
                self._bl_offset = 0
        return 0

    def abort(self, bytes last=None):
        """Close now with an RST (SO_LINGER 0): the kernel frees the socket's
        buffers at once instead of holding them for a peer that does not
        read. Tells the owner once, as :meth:`close`.

        ``last`` (a core frame, e.g. a Kick) is a best effort: queued frames
        not yet started are dropped, and what the socket takes right now of
        a partly written frame and then ``last`` is sent; nothing waits.
        """
        cdef linger lg
        if self.state == CONN_CLOSED:
            return
        if last is not None and self.state == CONN_OPEN:
            _check_core_frame(last)
            self._drop_unstarted()
            self._queue(last)
            self._drain()
        lg.l_onoff = 1
        lg.l_linger = 0
        c_setsockopt(self.fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
        self.close()

    def close(self):
        """Close the socket now; tells the owner once."""
        if self.state == CONN_CLOSED:
            return
        self.state = CONN_CLOSED
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.fd)
        self._disarm_writer()
        self.unsent_at_close = self.backlog_bytes     # what the owner may need to report lost
        self._release_backlog()
        self._free_carry()
        self._tls_read_deferred = False
        if self._in_round:
            # A writer thread may still write to fd: closing it now would let
            # a new socket take the number and receive this room's frame.
            # (And it may be in SSL_write on _ssl: that waits too.)
            self._deferred_fd = self.fd
            self._deferred_ssl = self._ssl
        else:
            if self._ssl != NULL:
                SSL_free(self._ssl)
            c_close(self.fd)
        self._ssl = NULL
        self.fd = -1
        self._read_cb = None
        owner = self.owner
        self.owner = None
        if owner is not None:
            owner.connection_lost()

    @property
    def backlog_frames(self):
        return self._bl_len

    @property
    def closing(self):
        """True once a final frame is queued or the socket is closed."""
        return self.state != CONN_OPEN

    @property
    def closed(self):
        return self.state == CONN_CLOSED

    @property
    def max_frame(self):
        """Largest frame body this connection accepts (before and after
        lz4). Settable: a session keeps it small until authenticated."""
        return self._max_frame

    @max_frame.setter
    def max_frame(self, Py_ssize_t value):
        if value <= 0:
            raise ValueError("max_frame must be positive")
        self._max_frame = value

    @property
    def carry_capacity(self):
        """Bytes allocated for the incomplete frame carried to the next read
        (at most its header + body; 0 when none)."""
        return self._carry_cap

    # ---------------------------------------------------------------- reading

    def start_reading(self, callback):
        """Call ``callback()`` whenever the socket is readable; it should
        call :meth:`read`."""
        self._read_cb = callback
        if not self._reading and self.state == CONN_OPEN:
            self._loop.add_reader(self.fd, _readable_cb, self)
            self._reading = True

    def pause_reading(self):
        """Stop calling the read callback until :meth:`resume_reading`: the
        owner is busy with input already read, and the socket backs up. A
        closing connection keeps reading (to see the peer's close)."""
        if self.state == CONN_OPEN:
            self._tls_read_deferred = False
        if self._reading and self.state == CONN_OPEN:
            self._reading = False
            self._loop.remove_reader(self.fd)

    def resume_reading(self):
        if not self._reading and self.state != CONN_CLOSED and self._read_cb is not None:
            self._loop.add_reader(self.fd, _readable_cb, self)
            self._reading = True
            if (self._tls_state == TLS_OPEN and self.state == CONN_OPEN
                    and SSL_pending(self._ssl) > 0):
                self._tls_schedule_reread()   # decrypted already: no readability comes

    def read(self, Py_ssize_t max_frames=PY_SSIZE_T_MAX):
        """Read what the socket has (a bounded share of it per call) and
        return its complete frames as a list of ``(type, flags, body)``,
        bodies inflated, at most ``max_frames`` of them.

        Sets :attr:`eof` when the peer closed. Never raises for bad input:
        the frames before the first frame that breaks the protocol are
        returned and the error is kept in :attr:`read_error` (a
        ``FrameError``), after which nothing more is parsed. More complete
        frames than ``max_frames`` is such an error (TOO_MANY_REQUESTS);
        no body is copied for them.
        """
        cdef list out = []
        cdef ssize_t r
        cdef int turn, err = 0
        if self.read_error is not None:
            return out
        if self._ssl != NULL and (self._tls_state != TLS_OPEN or self._in_round
                                  or self.state == CONN_CLOSED):
            return out                # see connection.pxd, TLS
        if max_frames < 0:
            max_frames = 0
        for turn in range(MAX_READS_PER_WAKE):
            if self._ssl == NULL:
                r = c_recv(self.fd, _scratch, SCRATCH_SIZE, MSG_DONTWAIT)
                if r < 0:
                    err = errno
            else:
                r = fo_tls_recv(self._ssl, _scratch, SCRATCH_SIZE)
                if r < 0:
                    err = <int>-r
            if r == 0:
                self.eof = True
                break
            if r < 0:
                if err == EINTR:
                    continue
                if err != EAGAIN:
                    self.eof = True   # reset by peer: same as a close for us
                break
            self.bytes_received += <unsigned long long>r
            try:
                self._take(_scratch, r, out, max_frames)
            except FrameError as exc:
                self.read_error = exc
                self._free_carry()
                break
            if r < SCRATCH_SIZE and self._ssl == NULL:
                break                 # (TLS gives a record per read: read on)
        if (self._ssl != NULL and not self.eof and self.read_error is None
                and SSL_pending(self._ssl) > 0):
            self._tls_schedule_reread()
        if out or self.eof:
            self.last_recv = self._loop.time()
        return out

    cdef int _take(self, const char* data, Py_ssize_t n, list out,
                   Py_ssize_t max_frames) except -1:
        # Parse n fresh bytes. A carried frame first gets only the bytes it
        # lacks (re-asked after its header completes), so the carry never
        # holds more than that one frame; the rest is parsed in place.
        cdef Py_ssize_t pos = 0, need, step, used
        while self._carry_len:
            need = self._need(self._carry, self._carry_len)
            if self._carry_len < need:
                step = need - self._carry_len
                if step > n - pos:
                    step = n - pos
                if step == 0:
                    return 0
                self._keep(data + pos, step, need)
                pos += step
                continue
            used = self._parse(self._carry, self._carry_len, out, max_frames)
            FANOUT_ASSERT(used == self._carry_len)
            self._free_carry()         # idle connections hold no read memory
        used = self._parse(data + pos, n - pos, out, max_frames)
        pos += used
        if pos < n:
            self._keep(data + pos, n - pos, self._need(data + pos, n - pos))
        return 0

    cdef Py_ssize_t _parse(self, const char* data, Py_ssize_t n, list out,
                           Py_ssize_t max_frames) except -1:
        # A kind splits its input into (type, flags, body) frames and returns
        # the bytes it consumed; the rest is carried to the next read.
        raise NotImplementedError("a connection kind must parse its input")

    cdef Py_ssize_t _need(self, const char* data, Py_ssize_t n) except -1:
        raise NotImplementedError("a connection kind must parse its input")

    cdef int _keep(self, const char* data, Py_ssize_t n, Py_ssize_t need) except -1:
        # Append to the carry. The allocation grows geometrically with what
        # arrives (a frame trickling in costs few reallocs) but never past
        # `need`, the carried frame's whole size as far as it is known.
        cdef Py_ssize_t want = self._carry_len + n, cap
        cdef char* grown
        FANOUT_ASSERT(want <= need)
        if want > self._carry_cap:
            cap = 2 * self._carry_cap
            if cap < want:
                cap = want
            if cap > need:
                cap = need
            grown = <char*>realloc(self._carry, cap)
            if grown == NULL:
                raise MemoryError()
            self._carry = grown
            self._carry_cap = cap
        memcpy(self._carry + self._carry_len, data, n)
        self._carry_len = want
        return 0

    cdef void _free_carry(self) noexcept:
        free(self._carry)
        self._carry = NULL
        self._carry_len = self._carry_cap = 0

    cdef int _discard_input(self) except -1:
        # A closing connection reads only to see the peer's close: a bounded
        # share of the loop per wake, and a bounded amount in all.
        cdef ssize_t r
        cdef int turn = 0
        while turn < MAX_READS_PER_WAKE:
            r = c_recv(self.fd, _scratch, SCRATCH_SIZE, MSG_DONTWAIT)
            if r > 0:
                turn += 1
                self._discarded += r
                if self._discarded > MAX_DISCARD:
                    self.abort()
                    return 0
                continue
            if r < 0 and errno == EINTR:
                continue
            if r == 0 or (errno != EAGAIN):
                self.close()
            return 0
        return 0


cdef int _check_core_frame(bytes frame) except -1:
    # Control frames come from Python: refuse anything that is not a core
    # frame (a bare wire frame would lose its first HEADROOM bytes).
    # The headroom is checked too: a stray length would make a prefixed
    # connection write from before the frame's buffer.
    cdef Py_ssize_t size = PyBytes_GET_SIZE(frame)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(frame)
    if (size < HEADROOM + HEADER_SIZE or p[HEADROOM] != WIRE_VERSION
            or body_length(p + HEADROOM) != size - HEADROOM - HEADER_SIZE
            or p[HR_LEN] > MAX_PREFIX or (p[HR_TAG] == 0) != (p[HR_LEN] == 0)):
        raise ValueError("not a core frame: build it with core_frame()")
    return 0
