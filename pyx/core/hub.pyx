# Every room on this node and the adaptive flush schedule (see hub.pxd).

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


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
    """

    def __cinit__(self, loop, *, double max_delay=0.05,
                  Py_ssize_t max_batch_bytes=64 * 1024,
                  Py_ssize_t compress_min=256, int compress_level=0,
                  Py_ssize_t ring_size=1024,
                  Py_ssize_t ring_bytes=1 << 20):
        if max_delay < 0 or max_batch_bytes <= 0 or ring_size < 1 or ring_bytes < 1:
            raise ValueError("invalid hub limits")
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

    cpdef Room room(self, str name, str epoch, unsigned long long head_seq):
        """The room ``name``; created (or reset, if its epoch moved on) with
        ``head_seq`` as the newest message published so far."""
        cdef Room room = self.rooms.get(name)
        if room is None:
            room = Room(name, epoch, head_seq, self.ring_size, self.ring_bytes)
            room.last_activity = self._loop.time()
            self.rooms[name] = room
        elif room.epoch != epoch:
            self._flush_isolated(room)
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
            self._flush_isolated(room)
            room.reset(epoch, seq - 1 if seq else 0)
        if room._pend_len and room._pend_len + len(record) > self.max_batch_bytes:
            self._flush_isolated(room)
        now = self._loop.time()
        if room._pend_len == 0:
            room.first_pending = now
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

    cdef void _flush(self, Room room) except *:
        cdef list troubled
        cdef Py_ssize_t messages = room.pending_count, raw = room._pend_len
        cdef Py_ssize_t members = len(room._members)
        cdef unsigned long long wire_before = room.bytes_out
        cdef double now
        if raw == 0:
            return
        now = self._loop.time()
        troubled = room.flush(self.compress_min, self.compress_level)
        self.flushes += 1
        if troubled:
            self._report_all(troubled)
            members -= len(troubled)
        if self.flush_observer is not None and members:
            try:
                self.flush_observer(messages, members, raw, room.bytes_out - wire_before,
                                    now - room.first_pending)
            except Exception as exc:
                self._fault(room, exc)

    cdef void _flush_isolated(self, Room room) except *:
        # Every flush goes through here, timed: a flush that runs inside a
        # client's read callback (a chat that fills a batch) is the node's
        # own work, which overload control must not discount as input.
        cdef double started = _monotonic()
        try:
            self._flush(room)
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

    def broadcast(self, str room_name, bytes frame):
        """Write a ready core frame (:func:`core_frame`; e.g. presence) to
        every member of a room, like a batch: one shared object, written
        from C. Returns the number of members it was handed to."""
        cdef Room room = self.rooms.get(room_name)
        cdef list troubled
        _check_core_frame(frame)
        if room is None or not room._members:
            return 0
        troubled = room.send_all(frame)
        if troubled:
            self._report_all(troubled)
            return len(room._members) - len(troubled)
        return len(room._members)

    def flush(self, str room_name=None):
        """Flush one room, or every room, now (drain, tests)."""
        if room_name is not None:
            room = self.rooms.get(room_name)
            if room is not None:
                self._flush_isolated(room)
            return
        for room in list(self.rooms.values()):
            self._flush_isolated(room)

    def retire(self, str room_name):
        """Forget ``room_name`` now if it has no members and no message was
        ever published to it in its epoch (so a client resuming it has
        nothing to miss). Returns whether it was removed; the caller ends the
        room's bus subscription. A room with history waits for :meth:`sweep`:
        a viewer reconnecting after a drop resumes from it."""
        cdef Room room = self.rooms.get(room_name)
        if room is None or room._members or room.last_seq or room._pend_len:
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
                if not room._members and not room._pend_len
                and room.last_activity < cutoff]
        for name in dead:
            del self.rooms[name]
        return dead
