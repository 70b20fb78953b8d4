# Life of a viewer, exactly like a real client (docs/protocol.md, 5.1-5.3):
#   connect (non-blocking; EINPROGRESS finishes on EPOLLOUT), at most
#   `connect_window` viewers between connect() and their join Ack, so the
#   node's listen backlog is not overrun
#   (WebSocket: first the HTTP upgrade, wsviewer.pyx)
#   -> Hello (pre-built frame, one token per viewer, from Python)
#   <- AuthOk (ping_interval_ms)   -> Join{req_id 1, room}   <- Ack{seq}
#   then only reads, and sends Ping every ping_interval_ms.
#   Refused before the Ack (connection refused/reset, CONNECTION_RATE_LIMITED,
#   CONNECTION_LIMIT, AUTH_TIMEOUT, connect timeout): retried with the
#   protocol's backoff (full jitter over min(10 s, 0.2 s * 2^n)), at most
#   `max_retries` times. Nothing else is answered and nothing is reconnected
#   once joined: a cut viewer stays cut.


cdef void _connect_more(Viewers self, uint64_t now) except *:
    cdef Viewer* v
    while self.in_flight < self.connect_window and self.next_connect < self.n:
        v = &self.v[self.next_connect]
        self.next_connect += 1
        self.in_flight += 1
        _connect(self, v, now)


cdef void _connect(Viewers self, Viewer* v, uint64_t now) except *:
    cdef int pending = 0
    cdef Py_ssize_t idx = v - self.v
    cdef lg_addr_t* src = NULL
    cdef int fd
    if self.nsrcs:
        src = &self.srcs[idx % self.nsrcs]
    self.connects_started += 1
    fd = lg_connect(&self.dst, src, self.rcvbuf, &pending)
    v.deadline = now + self.connect_timeout_ns
    if fd < 0:
        _count_errno(self, "connect", -fd)
        _retry_or_end(self, v, END_CONNECT, <uint16_t>(-fd), now)
        return
    v.fd = fd
    v.hup = 0
    v.carry_len = v.carry_need = 0
    v.out_len = 0
    v.kick_reason = v.error_reason = 0
    v.ws_close = 0
    if pending:
        v.state = ST_CONNECTING
        _arm(self, v, EPOLL_CTL_ADD)
    else:
        v.state = ST_AUTH
        _arm(self, v, EPOLL_CTL_ADD)
        _established(self, v)


cdef void _arm(Viewers self, Viewer* v, int op) except *:
    cdef epoll_event ev
    memset(&ev, 0, sizeof(ev))
    ev.data.u64 = <uint64_t>(v - self.v)
    # Edge-triggered: a viewer is read until the socket is empty (or put
    # on the next round's list), and is not reported again until new data.
    if v.state == ST_CONNECTING:
        ev.events = EPOLLOUT | EPOLLET
    else:
        ev.events = ((0 if v.paused else EPOLLIN | EPOLLRDHUP)
                     | (EPOLLOUT if v.out_len or v.tls_want_write else 0) | EPOLLET)
    if epoll_ctl(self.ep, op, v.fd, &ev) < 0:
        raise OSError(errno, "epoll_ctl failed")


cdef void _on_connected(Viewers self, Viewer* v) except *:
    cdef int err = lg_sock_error(v.fd)
    if err:
        _count_errno(self, "connect", err)
        _retry_or_end(self, v, END_CONNECT, <uint16_t>err, lg_mono_ns())
        return
    v.state = ST_AUTH
    _arm(self, v, EPOLL_CTL_MOD)
    _established(self, v)


cdef void _established(Viewers self, Viewer* v) except *:
    self.connected += 1
    self.last_connected_ns = lg_mono_ns()
    if self.tls:
        _tls_start(self, v)          # then _session_open (tlsviewer.pyx)
    else:
        _session_open(self, v)


cdef void _session_open(Viewers self, Viewer* v) except *:
    """The byte stream is up: the WebSocket upgrade, or the Hello."""
    if self.ws:
        v.state = ST_UPGRADE
        v.ws_mask = <uint32_t>_rand(self)
        _send(self, v, PyBytes_AS_STRING(self._upgrade), <uint32_t>PyBytes_GET_SIZE(self._upgrade))
    else:
        v.state = ST_AUTH
        _send_hello(self, v)


cdef void _send_hello(Viewers self, Viewer* v) except *:
    cdef bytes hello = self._hellos[v - self.v]
    _send(self, v, PyBytes_AS_STRING(hello), <uint32_t>PyBytes_GET_SIZE(hello))


cdef inline bint _joining(Viewer* v) noexcept nogil:
    """Between connect() and the join Ack: refusals are retried."""
    return (v.state == ST_CONNECTING or v.state == ST_TLS or v.state == ST_UPGRADE
            or v.state == ST_AUTH or v.state == ST_JOINING)


cdef void _send(Viewers self, Viewer* v, const char* data, uint32_t n) except *:
    """Send a request; a part the socket does not take waits for EPOLLOUT."""
    cdef ssize_t w
    if v.out_len:
        return          # one request at a time; only a Ping can get here, and is skipped
    w = _io_send(self, v, data, n)
    if w == <ssize_t>n:
        return
    if w < 0:
        if w != -EAGAIN and w != -EINTR:
            _socket_failed(self, v, <int>-w)
            return
        w = 0
    v.out = data + w
    v.out_len = n - <uint32_t>w
    _arm(self, v, EPOLL_CTL_MOD)


cdef void _flush_out(Viewers self, Viewer* v) except *:
    cdef ssize_t w
    if not v.out_len:
        _arm(self, v, EPOLL_CTL_MOD)
        return
    w = _io_send(self, v, v.out, v.out_len)
    if w < 0:
        if w != -EAGAIN and w != -EINTR:
            _socket_failed(self, v, <int>-w)
        return
    v.out += w
    v.out_len -= <uint32_t>w
    if not v.out_len:
        _arm(self, v, EPOLL_CTL_MOD)


cdef void _send_ping(Viewers self, Viewer* v) except *:
    # WebSocket: the wire Ping goes after its message header and mask key
    cdef char* p = v.ping + (6 if self.ws else 0)
    cdef uint32_t n
    if v.out_len:
        return
    v.nonce += 1
    p[HEADER_SIZE] = 0x08              # Ping.nonce: field 1, varint
    n = <uint32_t>(put_varint(p + HEADER_SIZE + 1, v.nonce) - p)
    write_header(p, FT_PING, 0, n - HEADER_SIZE)
    if self.ws:
        n = _ws_mask_ping(v, n)
    self.pings_sent += 1
    _send(self, v, v.ping, n)


cdef uint64_t _rand(Viewers self) noexcept:
    # xorshift64*: spreads pings and retries so they do not come in waves,
    # and gives WebSocket mask keys
    self.rng ^= self.rng >> 12
    self.rng ^= self.rng << 25
    self.rng ^= self.rng >> 27
    return self.rng * <uint64_t>0x2545F4914F6CDD1D


cdef uint64_t _jitter(Viewers self, uint64_t span) noexcept:
    cdef uint64_t r = _rand(self)
    if span == 0:
        return 0
    return r % span


cdef void _count_errno(Viewers self, str where, int err) except *:
    key = (where, err)
    self.errnos[key] = self.errnos.get(key, 0) + 1


cdef void _socket_failed(Viewers self, Viewer* v, int err) except *:
    self.socket_errors += 1
    _count_errno(self, "socket", err)
    if _joining(v):
        _retry_or_end(self, v, END_SOCKET, <uint16_t>err, lg_mono_ns())
    else:
        _finish(self, v, END_SOCKET, <uint16_t>err)


cdef void _close_fd(Viewers self, Viewer* v) noexcept:
    lg_tls_free(v.ssl)
    v.ssl = NULL
    if v.fd >= 0:
        c_close(v.fd)      # also leaves the epoll set
        v.fd = -1
    free(v.carry)
    v.carry = NULL
    v.carry_len = v.carry_need = 0
    v.out_len = 0


cdef void _retry_or_end(Viewers self, Viewer* v, uint8_t why, uint16_t code,
                        uint64_t now) except *:
    """A viewer failed before its join Ack: back off and reconnect, or give up."""
    cdef uint64_t backoff
    _close_fd(self, v)
    if v.attempts < self.max_retries:
        v.attempts += 1
        self.retries += 1
        # the protocol's backoff (docs/protocol.md 5.8): full jitter over
        # min(10 s, 0.2 s * 2^n)
        backoff = <uint64_t>10000000000
        if v.attempts <= 6:
            backoff = <uint64_t>200000000 << (v.attempts - 1)
        v.deadline = now + _jitter(self, backoff + 1)
        v.state = ST_RETRY
        return       # stays in flight: it still holds a window slot
    self.connect_failed += 1
    self.in_flight -= 1
    v.state = ST_DONE
    v.end = why
    v.end_code = code
    self.done += 1


cdef void _finish(Viewers self, Viewer* v, uint8_t why, uint16_t code) except *:
    """Close a viewer for good."""
    if v.state == ST_DONE:
        return
    if v.state == ST_LIVE:
        self.live -= 1
    elif v.state != ST_NEW:
        self.in_flight -= 1
        self.connect_failed += 1
    _close_fd(self, v)
    v.state = ST_DONE
    v.end = why
    v.end_code = code
    self.done += 1


cdef void _sweep(Viewers self, uint64_t now) except *:
    """Pings due, retries due, connect timeouts."""
    cdef Py_ssize_t i
    cdef Viewer* v
    for i in range(self.next_connect):
        v = &self.v[i]
        if now < v.deadline:
            continue
        if v.state == ST_LIVE:
            if v.ping_ms:
                v.deadline = now + <uint64_t>v.ping_ms * <uint64_t>1000000
                _send_ping(self, v)
            else:
                v.deadline = <uint64_t>-1
        elif v.state == ST_RETRY:
            _connect(self, v, now)
        elif _joining(v):
            _count_errno(self, "timeout", 0)
            _retry_or_end(self, v, END_TIMEOUT, 0, now)


cdef void _on_eof(Viewers self, Viewer* v) except *:
    cdef uint8_t reason
    if v.kick_reason:
        _finish(self, v, END_KICK, v.kick_reason)
        return
    reason = v.error_reason
    if reason == 0 and v.ws_close > WS_CLOSE_REASON_BASE:
        # the Kick/Error frame was lost: the WebSocket Close's code says why
        reason = <uint8_t>(v.ws_close - WS_CLOSE_REASON_BASE)
    if _joining(v) and (reason == 0 or reason == R_CONNECTION_LIMIT
                              or reason == R_CONNECTION_RATE_LIMITED
                              or reason == R_AUTH_TIMEOUT):
        if reason == 0:
            self.eofs += 1
        _retry_or_end(self, v, END_ERROR if reason else END_EOF, reason, lg_mono_ns())
        return
    if reason:
        _finish(self, v, END_ERROR, reason)
    else:
        self.eofs += 1
        _finish(self, v, END_EOF, 0)


cdef void _on_reply(Viewers self, Viewer* v, uint8_t ftype, const uint8_t* body,
                    const uint8_t* end) except *:
    """A frame that moves a viewer along: AuthOk (send its Join), Ack (live),
    Kick or Error (why the node is closing it, or a refused Join)."""
    cdef uint64_t val
    if ftype == FT_AUTH_OK:
        self.auth_oks += 1
        if v.state == ST_AUTH:
            self.authed += 1
            if _uint_field(body, end, 3, &val) < 0:
                self.bad_bodies += 1
            v.ping_ms = <uint32_t>val
            v.state = ST_JOINING
            j = self._joins[v.room]
            _send(self, v, PyBytes_AS_STRING(j), <uint32_t>PyBytes_GET_SIZE(j))
    elif ftype == FT_ACK:
        self.acks += 1
        if v.state == ST_JOINING:
            if _uint_field(body, end, 3, &val) < 0:
                self.bad_bodies += 1
            v.ack_seq = val
            v.last_seq = val
            v.state = ST_LIVE
            v.was_live = 1
            self.joined += 1
            self.live += 1
            self.in_flight -= 1
            self.last_join_ns = lg_mono_ns()
            # first ping at a random point of the interval: no waves of pings
            v.deadline = self.last_join_ns + (_jitter(self, <uint64_t>v.ping_ms * <uint64_t>1000000)
                                               if v.ping_ms else <uint64_t>-1)
    elif ftype == FT_KICK:
        val = _reason(self, body, end)
        self.kicks[val] += 1
        v.kick_reason = <uint8_t>val if val else NREASONS - 1
    elif ftype == FT_ERROR:
        val = _reason(self, body, end)
        self.errors[val] += 1
        if val < 20 or val >= 30:
            v.error_reason = <uint8_t>val       # closing: the EOF follows
        elif v.state == ST_JOINING:
            self.join_failed += 1
            _finish(self, v, END_JOIN, <uint16_t>val)


cdef uint64_t _reason(Viewers self, const uint8_t* body, const uint8_t* end) noexcept:
    """A Kick's or Error's reason (field 1), as a counter slot (see NREASONS)."""
    cdef uint64_t val
    if _uint_field(body, end, 1, &val) < 0:
        self.bad_bodies += 1
    return val if val < NREASONS else NREASONS - 1


cdef int _uint_field(const uint8_t* p, const uint8_t* end, uint64_t field,
                     uint64_t* out) noexcept nogil:
    """The varint field `field` of a message body (0 when absent); -1 when malformed."""
    cdef uint64_t tag, v
    out[0] = 0
    while p < end:
        p = get_varint(p, end, &tag)
        if p == NULL:
            return -1
        if tag == (field << 3):
            p = get_varint(p, end, &v)
            if p == NULL:
                return -1
            out[0] = v
        else:
            p = skip_field(p, end, tag)
            if p == NULL:
                return -1
    return 0
