# Every room on this node and the adaptive flush schedule (see hub.pxd).

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC, CLOCK_REALTIME
from libc.math cimport NAN
from cpython.ref cimport Py_INCREF, Py_DECREF
from libc.errno cimport errno as c_errno


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline double _transit(bytes record) noexcept:
    # Wall-clock seconds since the record's acceptance (its server_ts_ms, set
    # with the seq by the logic: this node's sequencer, or a router on
    # another host), NAN without one. Read once per batch, for its first
    # record: the batch's oldest message.
    cdef uint64_t ts_ms = record_ts_ms(<const uint8_t*>PyBytes_AS_STRING(record),
                                       PyBytes_GET_SIZE(record))
    cdef timespec ts
    if ts_ms == 0:
        return NAN
    clock_gettime(CLOCK_REALTIME, &ts)
    return (ts.tv_sec - <double>(ts_ms // 1000)) + (ts.tv_nsec * 1e-9 - (ts_ms % 1000) * 1e-3)


# A connection whose owner's callback raised gets this, then is closed.
_INTERNAL_ERROR_BODY = bytes([0x08, R_INTERNAL_ERROR, 0x12, 14]) + b"internal error"
# How long such a connection may take to read it before the socket closes.
FAULT_CLOSE_GRACE = 2.0


def _flush_soon(Hub hub):
    cdef list due = hub._soon
    cdef Room room
    hub._soon = []
    hub._soon_scheduled = False
    for room in due:                   # none stays marked, whatever happens
        room._scheduled = False
    for room in due:
        hub._flush_isolated(room)


def _rounds_done(Hub hub):
    hub._reconcile()


def _flush_timer(Hub hub, Room room):
    room._scheduled = False
    hub._flush_isolated(room)


cdef class Hub:
    """The broadcast engine of one node.

    :param loop: the event loop whose timers drive flushes.
    :param max_delay: seconds a hot room may hold a message (default 0.05).
    :param max_batch_bytes: a room's batch is flushed when it reaches this.
    :param compress_min: smallest batch body worth lz4 (0 disables).
    :param compress_level: 0 lz4 fast mode, 1-12 lz4 high compression.
    :param ring_size: messages per room kept for resume.
    :param ring_bytes: bytes per room kept for resume.
    :param write_threads: writer threads for large rooms (0: every write on
        the loop thread). Call :meth:`close` when done with a hub that has
        them.
    :param thread_min_members: smallest room the writer threads write.
    """

    def __cinit__(self, loop, *, double max_delay=0.05,
                  Py_ssize_t max_batch_bytes=64 * 1024,
                  Py_ssize_t compress_min=256, int compress_level=0,
                  Py_ssize_t ring_size=1024,
                  Py_ssize_t ring_bytes=1 << 20,
                  int write_threads=0, Py_ssize_t thread_min_members=256):
        if max_delay < 0 or max_batch_bytes <= 0 or ring_size < 1 or ring_bytes < 1:
            raise ValueError("invalid hub limits")
        if not 0 <= write_threads <= 64 or thread_min_members < 1:
            raise ValueError("write_threads must be 0-64, thread_min_members >= 1")
        self._loop = loop
        self.rooms = {}
        self.max_delay = max_delay
        self.max_batch_bytes = max_batch_bytes
        self.compress_min = compress_min
        if not 0 <= compress_level <= 12:
            raise ValueError("compress_level must be 0-12")
        self.compress_level = compress_level
        self.ring_size = ring_size
        self.ring_bytes = ring_bytes
        self._soon = []
        self.thread_min_members = thread_min_members
        if write_threads:
            self._pool = fo_pool_start(write_threads)
            if self._pool == NULL:
                raise OSError(c_errno, f"cannot start {write_threads} writer threads")
            self.write_threads = write_threads
            loop.add_reader(fo_pool_fd(self._pool), _rounds_done, self)

    def __dealloc__(self):
        # Not closed: let the threads finish, then let go of what the rounds
        # hold without telling anyone (nobody is left to tell).
        cdef fo_round* r
        cdef fo_round* nxt
        if self._pool != NULL:
            with nogil:
                fo_pool_wait(self._pool)
            r = fo_pool_take_done(self._pool)
            while r != NULL:
                nxt = r.next
                (<WriteRound>r.owner).release()
                Py_DECREF(<object>r.owner)
                r = nxt
            fo_pool_stop(self._pool)
            self._pool = NULL

    def settle(self):
        """Wait until every write round in flight is written, and
        reconcile it (and any round that starts from it) now. For a drain's
        last word, tests and benchmarks; the loop does this by itself."""
        while self.rounds_in_flight:
            with nogil:
                fo_pool_wait(self._pool)
            self._reconcile()

    def close(self):
        """Settle every round and stop the writer threads. The hub still
        works afterwards, writing on the loop thread."""
        if self._pool == NULL:
            return
        self.settle()
        try:
            self._loop.remove_reader(fo_pool_fd(self._pool))
        except Exception:
            pass                        # the loop is closed already
        fo_pool_stop(self._pool)
        self._pool = NULL
        self.write_threads = 0

    cpdef Room room(self, str name, str epoch, unsigned long long head_seq):
        """The room ``name``; created (or reset, if its epoch moved on) with
        ``head_seq`` as the newest message published so far."""
        cdef Room room = self.rooms.get(name)
        if room is None:
            room = Room(name, epoch, head_seq, self.ring_size, self.ring_bytes)
            room.last_activity = self._loop.time()
            self.rooms[name] = room
        elif room.epoch != epoch:
            self._flush_isolated(room, True)
            room.reset(epoch, head_seq)
        return room

    def publish(self, str room_name, str epoch, unsigned long long seq,
                bytes record, bint sampled=False):
        """Queue one pre-encoded record (see ``encode_room_message``) for the
        room's next frame. Returns False when the record is not taken: a
        duplicate ``seq``, or a room this hub does not hold (the bus is
        scoped by room, so that is a message that raced a retirement).

        ``sampled``: overload control dropped chat of this room just before
        this record; the batch carrying it will say so."""
        cdef Room room = self.rooms.get(room_name)
        if room is None:
            return False
        if room.epoch != epoch:
            self._flush_isolated(room, True)
            room.reset(epoch, seq - 1 if seq else 0)
        if room._pend_len and room._pend_len + len(record) > self.max_batch_bytes:
            self._flush_isolated(room, True)
        now = self._loop.time()
        if room._pend_len == 0:
            room.first_pending = now
            # Only when counted (a node does): the read costs ~350 instructions
            # per batch (bench/callgrind_engine.py).
            room.first_transit = _transit(record) if self._lat_n else NAN
        if not room.append(seq, record):
            return False
        if sampled:
            room.sampled = True
        room.last_activity = now
        if room._pend_len >= self.max_batch_bytes:
            self._flush_isolated(room)         # the record is taken: say so
        else:
            self._schedule(room)
        return True

    cdef void _schedule(self, Room room) except *:
        cdef double now, tokens
        if room._scheduled:
            return
        room._scheduled = True
        now = self._loop.time()
        if self.max_delay > 0:
            tokens = room._flush_tokens + (now - room._tokens_at) / self.max_delay
            tokens = min(tokens, <double>FLUSH_BURST)
        else:
            tokens = FLUSH_BURST
        # Spend the token now; below zero is the wait for the next one (at
        # most one schedule is outstanding per room, so never below -1).
        room._flush_tokens = tokens - 1
        room._tokens_at = now
        if room._flush_tokens >= 0:
            # Quiet room: out at the end of this loop iteration.
            self._soon.append(room)
            if not self._soon_scheduled:
                self._soon_scheduled = True
                self._loop.call_soon(_flush_soon, self)
        else:
            self._loop.call_at(now - room._flush_tokens * self.max_delay,
                               _flush_timer, self, room)

    cdef void _flush(self, Room room, bint now=False) except *:
        # now: the batch must be out of the pending buffer on return (an
        # epoch change, drain), so it is built even while a round is out.
        cdef Py_ssize_t messages = room.pending_count, raw = room._pend_len
        cdef unsigned long long seq = room.last_seq
        cdef bytes frame
        if raw == 0:
            return
        if room._round is not None and raw < self.max_batch_bytes and not now:
            # The room's round is still out: flush when it is back, with
            # whatever came meanwhile in the same frame.
            room._flush_after_round = True
            return
        if not room._members and room._round is None and not room._waiting:
            room.discard_pending()
            return
        frame = room.take_frame(self.compress_min, self.compress_level)
        self.flushes += 1
        # wire: the body as sent, like raw, so that wire / raw is the
        # compression ratio (the headroom and the frame header are not body).
        self._deliver(room, frame, seq, messages, raw,
                      PyBytes_GET_SIZE(frame) - HEADROOM - HEADER_SIZE, room.first_pending,
                      room.first_transit)

    cdef void _deliver(self, Room room, bytes frame, unsigned long long seq,
                       Py_ssize_t messages, Py_ssize_t raw, Py_ssize_t wire,
                       double first_pending, double first_transit) except *:
        # Write a room's frame to its members now, or start a round for it,
        # or (a round is out) queue it behind. seq: the newest record in it
        # (0: a control frame), which replays may serve once it is out.
        cdef list troubled
        cdef Py_ssize_t members
        if room._round is not None:
            room._waiting.append((frame, seq, room.epoch, messages, raw, wire, first_pending,
                                  first_transit))
            self.waiting_bytes += PyBytes_GET_SIZE(frame)
            return
        if seq:
            room.flushed_seq = seq
        members = len(room._members)
        if members == 0:
            return
        if self._pool != NULL and members >= self.thread_min_members:
            self._start_round(room, frame, messages, raw, wire, first_pending, first_transit)
            return
        troubled = room.send_all(frame)
        if troubled:
            self._report_all(troubled)
            members -= len(troubled)
        self._delivered(room, messages, members, raw, wire, first_pending, first_transit)

    cdef void _delivered(self, Room room, Py_ssize_t messages, Py_ssize_t reached,
                         Py_ssize_t raw, Py_ssize_t wire, double first_pending,
                         double first_transit) except *:
        cdef double delay, latency
        cdef int i
        if messages == 0 or reached <= 0:
            return
        room.deliveries += <unsigned long long>(messages * reached)
        delay = self._loop.time() - first_pending
        self.delay_seconds += delay * messages
        self.delayed_messages += <unsigned long long>messages
        if self._lat_n and first_transit == first_transit:      # NAN: no ts
            # The trip to this node plus the wait here: the loop's clock for
            # the wait, the wall clock only for the trip, which starts on
            # another host's clock in a cluster (skew can make it negative:
            # counted as 0). Counted here, in C: no Python per frame.
            latency = first_transit + delay
            if latency < 0:
                latency = 0
            i = 0
            while i < self._lat_n and latency > self._lat_bounds[i]:
                i += 1
            self._lat_counts[i] += 1
            self.latency_sum += latency
        if self.flush_observer is not None:
            try:
                self.flush_observer(messages, reached, raw, wire, delay)
            except Exception as exc:
                self._fault(room, exc)

    cdef void _start_round(self, Room room, bytes frame, Py_ssize_t messages,
                           Py_ssize_t raw, Py_ssize_t wire, double first_pending,
                           double first_transit) except *:
        # Snapshot the members into a round for the writer threads. Nothing
        # here makes a system call: members behind a backlog (or in another
        # room's round) get the frame queued, the rest become items.
        cdef list members = room._members
        cdef Py_ssize_t i, n = PyList_GET_SIZE(members)
        cdef Connection conn
        cdef PyObject* obj
        cdef Py_ssize_t start
        cdef int st
        cdef list troubled = None
        cdef WriteRound rnd = WriteRound(n)
        rnd.room = room
        rnd.frame = frame
        rnd.messages, rnd.raw, rnd.wire = messages, raw, wire
        rnd.first_pending = first_pending
        rnd.first_transit = first_transit
        for i in range(n):
            conn = <Connection>PyList_GET_ITEM(members, i)
            if conn.state != CONN_OPEN:
                continue
            if conn._bl_len or conn._in_round or conn._tls_state == TLS_HANDSHAKE:
                st = conn.send_frame(frame)
                if st > SEND_QUEUED and st != SEND_CLOSED:
                    if troubled is None:
                        troubled = []
                    troubled.append((conn, st))
                elif st != SEND_CLOSED:
                    rnd.queued += 1
                continue
            obj = <PyObject*>frame
            start = HEADROOM
            if conn._prefix_tag:
                obj = conn._prefixed(frame)
                start -= (<const uint8_t*>PyBytes_AS_STRING(<object>obj))[HR_LEN]
            rnd.add(conn, obj, start)
        if rnd._r.n:
            Py_INCREF(rnd)                  # the pool's reference, until reconciled
            room._round = rnd
            self.rounds_in_flight += 1
            fo_pool_submit(self._pool, &rnd._r)
        if troubled:
            self._report_all(troubled)
        if not rnd._r.n:
            self._delivered(room, messages, rnd.queued, raw, wire, first_pending,
                            first_transit)

    cdef void _reconcile(self) except *:
        # Take back every finished round (see rounds.pxd), oldest first.
        cdef fo_round* r
        cdef fo_round* nxt
        cdef WriteRound rnd
        cdef double started = _monotonic()
        if self._pool == NULL:
            return
        r = fo_pool_take_done(self._pool)
        try:
            while r != NULL:
                nxt = r.next
                rnd = <WriteRound>r.owner
                Py_DECREF(rnd)              # the pool's; `rnd` holds one
                self.rounds_in_flight -= 1
                self.rounds += 1
                r = nxt
                try:
                    self._finish_round(rnd)
                except Exception as exc:
                    self._fault(rnd.room, exc)
        finally:
            self.flush_seconds += _monotonic() - started

    cdef void _finish_round(self, WriteRound rnd) except *:
        cdef Room room = <Room>rnd.room
        cdef Py_ssize_t i, n = <Py_ssize_t>rnd._r.n, ok = 0
        cdef Connection conn
        cdef PyObject* obj
        cdef int st
        cdef list troubled = None
        cdef tuple nxt
        try:
            for i in range(n):
                conn = <Connection>rnd._conns[i]
                obj = <PyObject*>rnd.frame
                if rnd._objs != NULL and rnd._objs[i] != NULL:
                    obj = rnd._objs[i]
                st = conn._after_round(
                    obj, rnd._r.items[i].buf - PyBytes_AS_STRING(<object>obj),
                    <Py_ssize_t>rnd._r.items[i].len, rnd._r.items[i].result)
                if st == SEND_SLOW or st == SEND_DEAD:
                    if troubled is None:
                        troubled = []
                    troubled.append((conn, st))
                elif st != SEND_CLOSED:
                    ok += 1
        finally:
            # Whatever happened above, no member stays marked as in a round
            # (it would never be written to again) and the room moves on.
            rnd.release()
            room._round = None
        if troubled:
            self._report_all(troubled)
        self._delivered(room, rnd.messages, ok + rnd.queued, rnd.raw, rnd.wire,
                        rnd.first_pending, rnd.first_transit)
        # What waited for this round, in order.
        while room._round is None and room._waiting:
            nxt = room._waiting.pop(0)
            self.waiting_bytes -= PyBytes_GET_SIZE(<bytes>nxt[0])
            self._deliver(room, <bytes>nxt[0],
                          <unsigned long long>nxt[1] if nxt[2] == room.epoch else 0,
                          nxt[3], nxt[4], nxt[5], nxt[6], nxt[7])
        if room._round is None and room._flush_after_round:
            room._flush_after_round = False
            self._flush_isolated(room)

    cdef void _flush_isolated(self, Room room, bint now=False) except *:
        # Every flush goes through here, timed: a flush that runs inside a
        # client's read callback (a chat that fills a batch) is the node's
        # own work, which overload control must not discount as input.
        cdef double started = _monotonic()
        try:
            self._flush(room, now)
        except Exception as exc:
            self._fault(room, exc)
        finally:
            self.flush_seconds += _monotonic() - started

    cdef void _report_all(self, list troubled) except *:
        # After the write loop: cutting a member changes the member list.
        # Each owner's callback is isolated: a failing one costs its own
        # connection, never the rest of the list or the caller (a publish).
        cdef Connection conn
        for conn, st in troubled:
            try:
                conn._report(st)
            except Exception as exc:
                self._fault(conn, exc)
                if conn.state == CONN_OPEN:
                    conn.close_after(_core_frame(FT_ERROR, _INTERNAL_ERROR_BODY, 0, 0))
                    if conn.state != CONN_CLOSED:
                        self._loop.call_later(FAULT_CLOSE_GRACE, conn.close)

    cdef void _fault(self, object where, object exc) except *:
        handler = self.error_handler
        if handler is not None:
            try:
                handler(where, exc)
                return
            except Exception as exc2:
                exc = exc2
        self._loop.call_exception_handler({
            "message": f"fanout core: error in a callback of {where!r}",
            "exception": exc})

    def track_latency(self, bounds):
        """Count every frame's end-to-end delivery latency from now on:
        seconds from its oldest message's acceptance (``server_ts_ms``) to
        the frame handed to every member, into a histogram with these
        ascending upper bounds (at most LATENCY_BOUNDS_MAX; +Inf is added).
        Frames whose records have no ``server_ts_ms`` are not counted."""
        cdef list values = [float(b) for b in bounds]
        cdef Py_ssize_t i
        if not 0 < len(values) <= LATENCY_BOUNDS_MAX or values != sorted(set(values)):
            raise ValueError(f"need 1-{LATENCY_BOUNDS_MAX} ascending distinct bounds")
        for i in range(len(values)):
            self._lat_bounds[i] = values[i]
        for i in range(LATENCY_BOUNDS_MAX + 1):
            self._lat_counts[i] = 0
        self.latency_sum = 0.0
        self._lat_n = len(values)

    def latency_histogram(self):
        """``(bounds, cumulative counts, sum)`` of :meth:`track_latency`'s
        histogram, the last count the +Inf bucket's (every frame counted)."""
        cdef int i
        cdef unsigned long long total = 0
        counts = []
        for i in range(self._lat_n + 1):
            total += self._lat_counts[i]
            counts.append(total)
        return [self._lat_bounds[i] for i in range(self._lat_n)], counts, self.latency_sum

    def broadcast(self, str room_name, bytes frame):
        """Write a ready core frame (:func:`core_frame`; e.g. presence) to
        every member of a room, like a batch: one shared object, written
        from C. Returns the number of members it was handed to."""
        cdef Room room = self.rooms.get(room_name)
        cdef Py_ssize_t members
        _check_core_frame(frame)
        if room is None or not room._members:
            return 0
        members = len(room._members)
        self._deliver(room, frame, 0, 0, 0, 0, 0.0, NAN)
        return members

    def flush(self, str room_name=None):
        """Flush one room, or every room, now (drain, tests)."""
        if room_name is not None:
            room = self.rooms.get(room_name)
            if room is not None:
                self._flush_isolated(room, True)
            return
        for room in list(self.rooms.values()):
            self._flush_isolated(room, True)

    def retire(self, str room_name):
        """Forget ``room_name`` now if it has no members and no message was
        ever published to it in its epoch (so a client resuming it has
        nothing to miss). Returns whether it was removed; the caller ends the
        room's bus subscription. A room with history waits for :meth:`sweep`:
        a viewer reconnecting after a drop resumes from it."""
        cdef Room room = self.rooms.get(room_name)
        if (room is None or room._members or room.last_seq or room._pend_len
                or room._round is not None or room._waiting):
            return False
        del self.rooms[room_name]
        return True

    def drop(self, str room_name):
        """Forget a room with no members now, whatever its history (a
        cluster node: the history stays in JetStream and is loaded again
        when a member comes back). A flush still scheduled for it runs on
        the detached room and writes nothing. Returns whether it was
        removed; the caller ends the room's bus subscription."""
        cdef Room room = self.rooms.get(room_name)
        if room is None or room._members:
            return False
        del self.rooms[room_name]
        return True

    def sweep(self, double idle_ttl):
        """Forget rooms with no members, nothing pending and no message for
        ``idle_ttl`` seconds. Returns the names removed; the caller ends
        their bus subscriptions."""
        cdef double cutoff = self._loop.time() - idle_ttl
        cdef Room room
        dead = [name for name, room in self.rooms.items()
                if not room._members and not room._pend_len and room._round is None
                and not room._waiting and room.last_activity < cutoff]
        for name in dead:
            del self.rooms[name]
        return dead
