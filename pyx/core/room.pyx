# One room's members, pending batch and resume ring (see room.pxd).

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy


cdef class Room:
    """A room on this node. Created by :class:`Hub`, not directly."""

    def __cinit__(self, str name, str epoch, unsigned long long head_seq,
                  Py_ssize_t ring_size, Py_ssize_t ring_bytes):
        if ring_size < 1:
            raise ValueError("ring_size must be >= 1")
        self.name = name
        self.epoch = epoch
        self._members = []
        self._slot = {}
        self.last_seq = head_seq
        self.flushed_seq = head_seq
        self._ring_cap = ring_size
        self._ring_max_bytes = ring_bytes
        self._waiting = []
        self._flush_tokens = FLUSH_BURST
        self.last_activity = 0.0

    def __dealloc__(self):
        self._ring_clear()
        free(self._ring)
        free(self._pend)

    # ---------------------------------------------------------------- members

    def add(self, Connection conn):
        """Make ``conn`` a member; False if it already was."""
        if conn in self._slot:
            return False
        self._slot[conn] = len(self._members)
        self._members.append(conn)
        return True

    def discard(self, Connection conn):
        """Remove ``conn``; False if it was not a member. O(1): the last
        member takes the leaver's slot (member order carries no meaning)."""
        cdef Py_ssize_t i = self._slot.pop(conn, -1)
        if i < 0:
            return False
        last = self._members.pop()
        if last is not conn:
            self._members[i] = last
            self._slot[last] = i
        return True

    def __len__(self):
        return len(self._members)

    def __contains__(self, conn):
        return conn in self._slot

    # ---------------------------------------------------------------- batching

    cdef int append(self, unsigned long long seq, bytes record) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(record)
        if seq <= self.last_seq:
            return 0                       # already have it: drop the duplicate
        if seq != self.last_seq + 1:
            # The feed skipped numbers (history lost upstream). Old records
            # cannot be contiguous with new ones, so start the ring afresh;
            # clients see the jump in seq and report a gap.
            self._ring_clear()
        self._reserve(n)
        memcpy(self._pend + self._pend_len, PyBytes_AS_STRING(record), n)
        self._pend_len += n
        self.pending_count += 1
        self.last_seq = seq
        self._ring_push(seq, record)
        return 1

    cdef bytes take_frame(self, Py_ssize_t compress_min, int level):
        # The pending batch as one frame, or None; the batch starts afresh.
        # The Hub delivers it and moves flushed_seq when it goes out.
        cdef bytes frame
        if self._pend_len == 0:
            return None
        if self.sampled:
            # Batch.sampled = true (field 2, varint 1): two bytes after the
            # records keep the body a valid Batch.
            self._reserve(2)
            self._pend[self._pend_len] = <char>0x10
            self._pend[self._pend_len + 1] = <char>0x01
            self._pend_len += 2
            self.sampled = False
        frame = build_frame(FT_BATCH, self._pend, self._pend_len, compress_min, level)
        self.bytes_in += <unsigned long long>self._pend_len
        self.bytes_out += <unsigned long long>PyBytes_GET_SIZE(frame)
        self.frames_built += 1
        self._pend_len = 0
        self.pending_count = 0
        return frame

    cdef void discard_pending(self) noexcept:
        # No member to write to: the batch is flushed to nobody.
        self.flushed_seq = self.last_seq
        self._pend_len = 0
        self.pending_count = 0
        self.sampled = False

    cdef list send_all(self, bytes frame):
        # The hot loop: the same frame object to every member, from C.
        # Returns (connection, status) for members that need the owner's
        # attention; the caller reports them after the loop.
        cdef list troubled = None
        cdef list members = self._members
        cdef Py_ssize_t i = 0
        cdef int st
        cdef Connection member
        # Members are Connections by construction (add() takes only those):
        # an unchecked cast, as a checked one walks the kind's MRO per member.
        while i < PyList_GET_SIZE(members):
            member = <Connection>PyList_GET_ITEM(members, i)
            i += 1
            st = member.send_frame(frame)
            if st > SEND_QUEUED and st != SEND_CLOSED:
                if troubled is None:
                    troubled = []
                troubled.append((member, st))
        return troubled

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self._pend_len + extra
        cdef char* grown
        if need > self._pend_cap:
            need = max(need, 2 * self._pend_cap, 4096)
            grown = <char*>realloc(self._pend, need)
            if grown == NULL:
                raise MemoryError()
            self._pend = grown
            self._pend_cap = need
        return 0

    # ---------------------------------------------------------------- resume

    cdef void _ring_push(self, unsigned long long seq, bytes record) noexcept:
        cdef PyObject* old
        if self._ring == NULL:
            self._ring = <PyObject**>malloc(self._ring_cap * sizeof(PyObject*))
            if self._ring == NULL:
                return                      # no history beats no service
        if self._ring_count == 0:
            self._ring_first = seq
        elif self._ring_count == self._ring_cap:
            self._ring_pop()
        Py_INCREF(record)
        self._ring[seq % self._ring_cap] = <PyObject*>record
        self._ring_count += 1
        self._ring_bytes += PyBytes_GET_SIZE(record)
        while self._ring_bytes > self._ring_max_bytes and self._ring_count > 1:
            self._ring_pop()

    cdef void _ring_pop(self) noexcept:
        cdef Py_ssize_t i = self._ring_first % self._ring_cap
        cdef PyObject* old = self._ring[i]
        cdef tuple chunk
        if self._chunks and (self._ring_first - 1) % REPLAY_CHUNK == 0:
            # The chunk's first seq leaves: no replay can start there again.
            chunk = self._chunks.pop((self._ring_first - 1) // REPLAY_CHUNK, None)
            if chunk is not None:
                self._chunk_bytes -= <Py_ssize_t>chunk[0]
        self._ring[i] = NULL
        self._ring_bytes -= PyBytes_GET_SIZE(<object>old)
        Py_DECREF(<object>old)
        self._ring_count -= 1
        self._ring_first += 1

    cdef void _ring_clear(self) noexcept:
        self._drop_replays()
        while self._ring_count:
            self._ring_pop()
        self._ring_first = 0

    cdef void _drop_replays(self) noexcept:
        self._chunks = None
        self._pieces = None
        self._chunk_bytes = self._piece_bytes = 0

    def reset(self, str epoch, unsigned long long head_seq):
        """The room's history restarted upstream (new epoch): forget it."""
        self._ring_clear()
        self._pend_len = 0
        self.pending_count = 0
        self.sampled = False
        self.epoch = epoch
        self.last_seq = self.flushed_seq = head_seq

    @property
    def oldest_seq(self):
        """Oldest seq that can still be replayed, 0 if none."""
        return self._ring_first if self._ring_count else 0

    def records(self, unsigned long long after_seq=0):
        """The ring's records after ``after_seq``, oldest first, as
        ``(seq, record)`` (the admin API's history on a single node)."""
        cdef list out = []
        cdef unsigned long long seq, last
        if not self._ring_count:
            return out
        last = self._ring_first + <unsigned long long>self._ring_count - 1
        seq = after_seq + 1 if after_seq + 1 > self._ring_first else self._ring_first
        while seq <= last:
            out.append((seq, <object>self._ring[seq % <unsigned long long>self._ring_cap]))
            seq += 1
        return out

    def replay(self, unsigned long long after_seq, Py_ssize_t max_frame_bytes,
               Py_ssize_t compress_min=0, int level=0):
        """Frames for a client that has seen everything up to ``after_seq``.

        Returns ``(gap_from, gap_to, frames)``: ``gap_*`` are 0 unless the
        range ``after_seq+1 .. gap_to`` has left the ring, in which case the
        client must be told before the replayed batches. Replay ends at
        ``flushed_seq``; later messages reach the client with the next flush.
        The frames are shared, cached objects (see room.pxd): built once per
        range, whoever asks.
        """
        cdef unsigned long long start = after_seq + 1
        cdef unsigned long long end = self.flushed_seq
        cdef unsigned long long first, seq, k, cfirst, clast, last
        cdef unsigned long long gap_from = 0, gap_to = 0
        cdef list frames = []
        cdef tuple piece
        if after_seq >= end:
            return 0, 0, frames
        first = self._ring_first if self._ring_count else end + 1
        if start < first:
            gap_from = start
            gap_to = min(first - 1, end)
            start = gap_to + 1
        if start > end:
            return gap_from, gap_to, frames
        if (self._chunks is None or max_frame_bytes != self._rp_max_frame
                or compress_min != self._rp_compress_min or level != self._rp_level):
            self._drop_replays()
            self._chunks = {}
            self._pieces = {}
            self._rp_max_frame = max_frame_bytes
            self._rp_compress_min = compress_min
            self._rp_level = level
        seq = start
        while seq <= end:
            k = (seq - 1) // REPLAY_CHUNK
            cfirst = k * REPLAY_CHUNK + 1
            clast = cfirst + REPLAY_CHUNK - 1
            if seq == cfirst and clast <= end:
                piece = self._chunks.get(k)
                if piece is None:
                    piece = self._build_replay(cfirst, clast, level)
                    self._chunks[k] = piece
                    self._chunk_bytes += <Py_ssize_t>piece[0]
                else:
                    self.replay_hits += 1
                seq = clast + 1
            else:
                last = clast if clast < end else end
                piece = self._cached_piece(seq, last)
                seq = last + 1
            frames.extend(<tuple>piece[1])
        return gap_from, gap_to, frames

    cdef tuple _cached_piece(self, unsigned long long first, unsigned long long last):
        # A head or tail piece, from the LRU or built (lz4 fast mode) and kept.
        cdef tuple piece
        key = (first, last)
        piece = self._pieces.pop(key, None)
        if piece is not None:
            self._pieces[key] = piece          # most recently used
            self.replay_hits += 1
            return piece
        piece = self._build_replay(first, last, 0)
        if <Py_ssize_t>piece[0] <= self._ring_max_bytes // 2:
            self._pieces[key] = piece
            self._piece_bytes += <Py_ssize_t>piece[0]
            while (len(self._pieces) > REPLAY_PIECES
                   or self._piece_bytes > self._ring_max_bytes // 2):
                self._piece_bytes -= <Py_ssize_t>self._pieces.pop(next(iter(self._pieces)))[0]
        return piece

    cdef tuple _build_replay(self, unsigned long long first, unsigned long long last,
                             int level):
        # (bytes, frames) of ring records first..last, cut into frames of at
        # most _rp_max_frame body bytes counted from `first`.
        cdef list frames = []
        cdef bytearray buf = bytearray()
        cdef Py_ssize_t total = 0
        cdef unsigned long long seq = first
        cdef object rec
        cdef bytes frame
        self.replay_builds += 1
        while True:
            rec = <object>self._ring[seq % self._ring_cap]
            if buf and len(buf) + len(rec) > self._rp_max_frame:
                frame = build_frame(FT_BATCH, buf, len(buf), self._rp_compress_min, level)
                total += PyBytes_GET_SIZE(frame)
                frames.append(frame)
                buf = bytearray()
            buf += rec
            if seq == last:
                break
            seq += 1
        frame = build_frame(FT_BATCH, buf, len(buf), self._rp_compress_min, level)
        total += PyBytes_GET_SIZE(frame)
        frames.append(frame)
        return (total, tuple(frames))

    @property
    def replay_cache_bytes(self):
        """Bytes of replay frames the room keeps (chunks and pieces)."""
        return self._chunk_bytes + self._piece_bytes

    def stats(self):
        return {
            "members": len(self._members),
            "last_seq": self.last_seq,
            "flushed_seq": self.flushed_seq,
            "oldest_seq": self.oldest_seq,
            "pending": self.pending_count,
            "frames": self.frames_built,
            "deliveries": self.deliveries,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
