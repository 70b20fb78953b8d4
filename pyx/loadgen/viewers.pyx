# The Viewers object: construction and teardown, the epoll loop that drives
# every piece (fanout/_loadgen.pxd shows the data flow), and the Python API
# the worker process calls between polls.

cdef enum:
    MAX_EVENTS = 1024                  # epoll events taken per poll()

_END_NAMES = {END_KICK: "kick", END_ERROR: "error", END_EOF: "eof", END_SOCKET: "socket",
              END_PROTOCOL: "protocol", END_CONNECT: "connect", END_TIMEOUT: "timeout",
              END_JOIN: "join", END_CLOSED: "closed", END_UPGRADE: "upgrade",
              END_TLS: "tls"}
_TRANSPORTS = {"tcp": T_TCP, "ws": T_WS, "tls": T_TLS, "wss": T_WSS}
# RFC 6455's GUID and the key every WebSocket viewer sends: one upgrade
# request for all (the node checks the key's form, not that it is fresh).
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_WS_KEY = b"ZmFub3V0LWxvYWQtdmlldw=="      # base64 of b"fanout-load-view"


cdef class Viewers:
    """N viewer connections driven by one epoll loop (see fanout/_loadgen.pxd).

    :param host: numeric IPv4 or IPv6 address of the node.
    :param port: its client port.
    :param hellos: one complete Hello frame (bytes) per viewer.
    :param rooms: the room index of each viewer.
    :param joins: one complete Join frame per room index.
    :param room_names: the room name (str) per room index.
    :param decode_every: viewers with ``index % decode_every == 0`` (and the
        first viewer of each room) inflate and walk every Batch.
    :param connect_window: most viewers between ``connect()`` and their join Ack.
    :param source_addrs: numeric addresses to bind, round-robin per viewer
        (spreads the node's per-address connection limits and the ephemeral
        ports); empty: the kernel picks.
    :param rcvbuf: SO_RCVBUF per socket, 0 for the default.
    :param latency_every: record the latency of every n-th decoded message.
    :param max_retries: reconnects of a viewer refused before its join Ack.
    :param connect_timeout: seconds from connect() to the join Ack.
    :param read_interval: seconds between read rounds of viewers that are not
        decoded; 0 reads every viewer as soon as data arrives.
    :param transport: ``"tcp"`` (wire frames on the socket), ``"ws"``
        (the node's WebSocket port: an HTTP upgrade to ``ws_path``, then
        masked messages; ``hellos`` and ``joins`` are still plain wire
        frames: they are wrapped here, once), ``"tls"`` (TLS, then as tcp:
        the node's tls_port) or ``"wss"`` (TLS, then as ws: its wss_port).
    :param tls_ca: TLS: a PEM file of the CA the node's certificate must
        chain to; "" does not check the certificate.
    :param tls_server_name: TLS: the name sent as SNI and, with
        ``tls_ca``, checked against the certificate (default: ``host``).
    """

    def __cinit__(self, str host, int port, list hellos, list rooms, list joins,
                  list room_names, *, int decode_every=50, int connect_window=256,
                  source_addrs=(), int rcvbuf=0, int latency_every=1,
                  int max_retries=8, double connect_timeout=10.0,
                  double read_interval=0.0, str transport="tcp", str ws_path="/ws",
                  str tls_ca="", str tls_server_name=""):
        cdef char why[256]
        cdef Py_ssize_t i, r
        cdef bytes b
        self.ep = -1
        n = len(hellos)
        if len(rooms) != n:
            raise ValueError("one room index per viewer")
        if len(joins) != len(room_names) or not joins:
            raise ValueError("one Join frame per room name, at least one room")
        if decode_every < 1 or connect_window < 1 or latency_every < 1:
            raise ValueError("decode_every, connect_window and latency_every must be >= 1")
        if lg_addr(host.encode(), port, &self.dst) != 0:
            raise ValueError(f"host must be a numeric IPv4/IPv6 address, got {host!r}")
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(_TRANSPORTS)}, "
                             f"got {transport!r}")
        self.transport = _TRANSPORTS[transport]
        self.ws = self.transport == T_WS or self.transport == T_WSS
        self.tls = self.transport == T_TLS or self.transport == T_WSS
        self.tls_errors = {}
        if self.tls:
            self.ssl_ctx = lg_tls_ctx(tls_ca.encode(), why, sizeof(why))
            if self.ssl_ctx == NULL:
                raise ValueError(f"TLS context: {why.decode('utf-8', 'replace')}")
            self.tls_verify = bool(tls_ca)
            self._server_name = (tls_server_name or host).encode()
        self.rng = 0x4D595DF4D0F33173 ^ <uint64_t>n
        self._hellos = [bytes(h) for h in hellos]
        self._joins = [bytes(j) for j in joins]
        if self.ws:
            self._hellos = [_ws_wrap(h, <uint32_t>_rand(self)) for h in self._hellos]
            self._joins = [_ws_wrap(j, <uint32_t>_rand(self)) for j in self._joins]
            hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self._upgrade = (f"GET {ws_path} HTTP/1.1\r\nHost: {hostport}\r\n"
                             "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                             f"Sec-WebSocket-Key: {_WS_KEY.decode()}\r\n"
                             "Sec-WebSocket-Version: 13\r\n"
                             "Sec-WebSocket-Protocol: fanout.v1\r\n\r\n").encode("ascii")
            self._accept = base64.b64encode(hashlib.sha1(_WS_KEY + _WS_GUID).digest())
        self._names = [s.encode("utf-8") for s in room_names]
        self.nrooms = len(joins)
        self.n = n
        self.v = <Viewer*>calloc(n if n else 1, sizeof(Viewer))
        self.refs = <RoomRef*>calloc(self.nrooms, sizeof(RoomRef))
        self.hist = <uint64_t*>calloc(LG_HIST_BUCKETS, sizeof(uint64_t))
        self.dirty = <uint32_t*>calloc(n if n else 1, sizeof(uint32_t))
        src_list = [s for s in source_addrs]
        self.nsrcs = len(src_list)
        self.srcs = <lg_addr_t*>calloc(self.nsrcs if self.nsrcs else 1, sizeof(lg_addr_t))
        if (self.v == NULL or self.refs == NULL or self.hist == NULL or self.srcs == NULL
                or self.dirty == NULL):
            raise MemoryError()
        for i in range(self.nsrcs):
            if lg_addr(str(src_list[i]).encode(), 0, &self.srcs[i]) != 0:
                raise ValueError(f"source address must be numeric, got {src_list[i]!r}")
        for r in range(self.nrooms):
            b = self._names[r]
            self.refs[r].name = PyBytes_AS_STRING(b)
            self.refs[r].name_len = PyBytes_GET_SIZE(b)
        seen = set()
        for i in range(n):
            r = rooms[i]
            if r < 0 or r >= self.nrooms:
                raise ValueError(f"viewer {i}: room index {r} out of range")
            self.v[i].fd = -1
            self.v[i].room = <int32_t>r
            self.v[i].k0 = -1
            self.v[i].decoded = (i % decode_every == 0) or (r not in seen)
            seen.add(r)
        self.rcvbuf = rcvbuf
        self.connect_window = connect_window
        self.latency_every = latency_every
        self.max_retries = max_retries
        self.connect_timeout_ns = <uint64_t>(connect_timeout * 1e9)
        if read_interval < 0:
            raise ValueError("read_interval must be >= 0")
        self.read_interval_ns = <uint64_t>(read_interval * 1e9)
        self.recording = True
        self.errnos = {}
        self.ep = epoll_create1(EPOLL_CLOEXEC)
        if self.ep < 0:
            raise OSError(errno, "epoll_create1 failed")

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.v != NULL:
            for i in range(self.n):
                lg_tls_free(self.v[i].ssl)
                if self.v[i].fd >= 0:
                    c_close(self.v[i].fd)
                free(self.v[i].carry)
            free(self.v)
        if self.refs != NULL:
            for i in range(self.nrooms):
                _free_ref(&self.refs[i])
            free(self.refs)
        free(self.hist)
        free(self.srcs)
        free(self.dirty)
        if self.ssl_ctx != NULL:
            lg_tls_ctx_free(self.ssl_ctx)
        if self.ep >= 0:
            c_close(self.ep)

    # ------------------------------------------------------------ driving

    def start(self):
        """Begin connecting (in windows of ``connect_window``)."""
        if not self.started:
            self.started = True
            self.first_connect_ns = lg_mono_ns()
            _connect_more(self, self.first_connect_ns)

    def poll(self, int timeout_ms=0):
        """One epoll round (waits up to ``timeout_ms``), then timers. Returns
        the number of socket events handled."""
        cdef epoll_event evs[MAX_EVENTS]
        cdef int k, nev
        cdef uint32_t e
        cdef Viewer* v
        cdef uint64_t now
        if self.ndirty:
            now = lg_mono_ns()
            if now >= self.next_round:
                timeout_ms = 0
            elif <uint64_t>timeout_ms * 1000000 > self.next_round - now:
                timeout_ms = <int>((self.next_round - now) // 1000000)
        nev = epoll_wait(self.ep, evs, MAX_EVENTS, timeout_ms)
        if nev < 0:
            if errno == EINTR:
                nev = 0
            else:
                raise OSError(errno, "epoll_wait failed")
        for k in range(nev):
            v = &self.v[evs[k].data.u64]
            e = evs[k].events
            if v.fd < 0:
                continue
            if v.state == ST_CONNECTING:
                _on_connected(self, v)
            elif v.state == ST_TLS:
                _tls_step(self, v)
                if v.state == ST_TLS or v.fd < 0:
                    continue
            elif e & EPOLLOUT:
                _flush_out(self, v)
            if e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                v.hup = 1
            if v.fd >= 0 and (e & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) and v.state != ST_CONNECTING:
                if v.decoded or v.state != ST_LIVE or self.read_interval_ns == 0:
                    _on_readable(self, v)
                else:
                    _defer(self, v)
        now = lg_mono_ns()
        if now >= self.next_round:
            self.next_round = now + self.read_interval_ns
            if self.ndirty:
                _read_round(self)
        if self.started:
            if self.in_flight < self.connect_window and self.next_connect < self.n:
                _connect_more(self, now)
            if now >= self.next_sweep:
                self.next_sweep = now + 20000000     # every 20 ms
                _sweep(self, now)
        return nev

    def run_for(self, double seconds):
        """Run the loop for ``seconds``; returns the socket events handled."""
        cdef uint64_t end = lg_mono_ns() + <uint64_t>(seconds * 1e9) if seconds > 0 else 0
        cdef uint64_t now
        cdef long total = 0
        cdef int wait
        while True:
            now = lg_mono_ns()
            if now >= end:
                break
            wait = <int>((end - now) // 1000000)
            total += self.poll(wait if wait < 20 else 20)
        return total

    def pause(self, Py_ssize_t i, bint paused=True):
        """Stop (or resume) reading viewer ``i``, e.g. to make it a slow consumer."""
        cdef Viewer* v
        if i < 0 or i >= self.n:
            raise IndexError(i)
        v = &self.v[i]
        v.paused = paused
        if v.fd >= 0 and v.state != ST_CONNECTING:
            _arm(self, v, EPOLL_CTL_MOD)

    def close(self):
        """Close every connection."""
        cdef Py_ssize_t i
        for i in range(self.n):
            if self.v[i].fd >= 0:
                _finish(self, &self.v[i], END_CLOSED, 0)

    # ------------------------------------------------------------ results

    def stats(self):
        """Counters as a dict (cheap: one pass over the viewers for deliveries)."""
        cdef uint64_t pending = 0
        cdef uint64_t deliveries = _deliveries(self, &pending)
        cdef int i
        kicks = {i: self.kicks[i] for i in range(NREASONS) if self.kicks[i]}
        errors = {i: self.errors[i] for i in range(NREASONS) if self.errors[i]}
        return {
            "viewers": self.n,
            "connects_started": self.connects_started,
            "connected": self.connected,
            "authed": self.authed,
            "joined": self.joined,
            "join_failed": self.join_failed,
            "connect_failed": self.connect_failed,
            "retries": self.retries,
            "in_flight": self.in_flight,
            "live": self.live,
            "done": self.done,
            "frames": self.frames,
            "wire_bytes": self.wire_bytes,
            "batch_frames": self.batch_frames,
            "batch_bytes": self.batch_bytes,
            "decoded_frames": self.decoded_frames,
            "decoded_msgs": self.decoded_msgs,
            "deliveries": deliveries,
            "unresolved_frames": pending,    # frames its room's reference has not seen yet
            "pongs": self.pongs,
            "ws_upgrades": self.upgrades,
            "ws_upgrades_refused": self.upgrade_refused,
            "ws_closes": self.ws_closes,
            "ws_pongs": self.ws_pongs,
            "ws_pings": self.ws_pings,
            "tls_handshakes": self.tls_handshakes,
            "tls_failures": self.tls_failures,
            "tls_errors": dict(self.tls_errors),
            "pings_sent": self.pings_sent,
            "presence": self.presence,
            "acks": self.acks,
            "auth_oks": self.auth_oks,
            "other_frames": self.other_frames,
            "gaps": self.gaps,
            "missing": self.missing,
            "reorders": self.reorders,
            "join_point_gaps": self.join_point_gaps,
            "foreign": self.foreign,
            "node_gaps": self.node_gaps,
            "sampled_batches": self.sampled_batches,
            "bad_bodies": self.bad_bodies,
            "protocol_errors": self.protocol_errors,
            "eofs": self.eofs,
            "socket_errors": self.socket_errors,
            "slow_cuts": self.kicks[R_SLOW_CONSUMER],
            "kicks": kicks,
            "errors": errors,
            "errnos": {f"{w}:{e}": c for (w, e), c in self.errnos.items()},
            "latency_samples": self.lat_count,
            "latency_negative": self.lat_negative,
            "latency_sum_ns": self.lat_sum_ns,
            "latency_max_ns": self.lat_max_ns,
            "first_connect_ns": self.first_connect_ns,
            "last_connected_ns": self.last_connected_ns,
            "last_join_ns": self.last_join_ns,
        }

    def verify(self):
        """Check every viewer's Batch stream against its room's reference.

        Returns a dict: ``divergences`` (viewers whose frames are not an exact
        run of the reference), ``verified``, ``unverified`` (not coverable:
        started before the reference, got frames it did not, or never got a
        Batch while the room did), ``cut`` (viewers that ended early), the
        first divergent viewer indices, and per room the reference
        ``(known frames, chain, messages, first seq, mismatches)``.
        """
        return _verify_viewers(self)

    def viewer(self, Py_ssize_t i):
        """One viewer's state, for tests and debugging."""
        cdef Viewer* v
        if i < 0 or i >= self.n:
            raise IndexError(i)
        v = &self.v[i]
        return {"state": v.state, "decoded": bool(v.decoded), "room": v.room,
                "end": _END_NAMES.get(v.end, ""), "end_code": v.end_code,
                "frames": v.frames, "batch_frames": v.bframes, "bytes": v.rbytes,
                "ack_seq": v.ack_seq, "last_seq": v.last_seq, "first_seq": v.first_seq,
                "messages": v.msgs, "attempts": v.attempts, "carry": v.carry_len,
                "ws_close": v.ws_close}

    def ends(self):
        """How viewers that are done ended: ``{"kick:31": n, "connect:111": n, ...}``."""
        cdef Py_ssize_t i
        out = {}
        for i in range(self.n):
            if self.v[i].state == ST_DONE:
                key = f"{_END_NAMES.get(self.v[i].end, '?')}:{self.v[i].end_code}"
                out[key] = out.get(key, 0) + 1
        return out

    def room_members(self):
        """Live viewers per room index."""
        cdef Py_ssize_t i
        out = [0] * self.nrooms
        for i in range(self.n):
            if self.v[i].state == ST_LIVE:
                out[self.v[i].room] += 1
        return out

    # ------------------------------------------------------------ latency

    def latency_buckets(self):
        """Non-empty histogram buckets as ``[(index, count), ...]`` (ns values:
        see :func:`bucket_value`)."""
        cdef int i
        return [(i, self.hist[i]) for i in range(LG_HIST_BUCKETS) if self.hist[i]]

    def latency_percentiles(self, percentiles=(50.0, 99.0, 99.9)):
        """Percentiles (ns) of the latency recorded so far; None when empty."""
        return percentiles_of(self.latency_buckets(), percentiles)

    def reset_latency(self):
        """Forget the latency recorded so far (end of the warm-up)."""
        memset(self.hist, 0, LG_HIST_BUCKETS * sizeof(uint64_t))
        self.lat_count = self.lat_negative = self.lat_sum_ns = self.lat_max_ns = 0
