# Reading: epoll is edge-triggered; a readable socket is drained into one
# shared scratch buffer and frames are handled in place. Only the incomplete
# tail of a frame is copied into a per-viewer carry buffer, sized to that one
# frame and freed once the frame is complete, so an idle viewer holds ~200
# bytes (its struct) and no buffer. With `read_interval` > 0, viewers that
# are not decoded are read in rounds that far apart, so one recv() can take
# several frames (decoded viewers are always read at once: they time the
# latency). On loopback most of a reader's cost is the kernel's, per frame
# (the data segment and the ACK it causes), so the default is 0.

from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_READ

import lz4.block as _lz4_block

from fanout.protocol.wire import DICTIONARIES as _DICTIONARIES

_lz4_decompress = _lz4_block.decompress

cdef enum:
    SCRATCH = 256 * 1024
    MAX_READS = 8                      # reads per readiness, for fairness

cdef char _scratch[SCRATCH]


cdef void _defer(Viewers self, Viewer* v) noexcept:
    """Read this viewer at the next round (with read_interval): one recv
    then takes several frames, which saves most of the kernel's per-read
    cost (on loopback the reader also pays for the ACKs it causes)."""
    if not v.queued:
        v.queued = 1
        self.dirty[self.ndirty] = <uint32_t>(v - self.v)
        self.ndirty += 1


cdef void _read_round(Viewers self) except *:
    cdef Py_ssize_t i, count = self.ndirty
    cdef Viewer* v
    self.ndirty = 0
    for i in range(count):
        v = &self.v[self.dirty[i]]
        v.queued = 0
        if v.fd >= 0:
            _on_readable(self, v)


cdef void _on_readable(Viewers self, Viewer* v) except *:
    cdef ssize_t r
    cdef int turn
    for turn in range(MAX_READS + 1):
        if v.fd < 0 or v.paused:
            return
        if turn == MAX_READS:
            _defer(self, v)      # more to read: later, so others get their turn
            return
        r = _io_recv(self, v, _scratch, SCRATCH)
        if r > 0:
            self.wire_bytes += <uint64_t>r
            v.rbytes += <uint64_t>r
            if self.ws:
                _ws_feed(self, v, <const uint8_t*>_scratch, r)
            else:
                _feed(self, v, <const uint8_t*>_scratch, r)
            if r < SCRATCH and not v.hup and v.ssl == NULL:
                # edge-triggered: new data brings a new event (a TLS read
                # returns one record: read on until -EAGAIN)
                return
            continue
        if r == 0:
            _on_eof(self, v)
            return
        if r == -EINTR:
            continue
        if r == -EAGAIN:
            return
        _socket_failed(self, v, <int>-r)
        return


cdef void _feed(Viewers self, Viewer* v, const uint8_t* data, Py_ssize_t n) except *:
    cdef Py_ssize_t pos = 0, take, whole, length
    cdef char* grown
    if v.carry_len:
        # finish the carried frame first, copying only what it lacks
        if v.carry_need == 0:
            take = HEADER_SIZE - v.carry_len
            if take > n:
                take = n
            memcpy(v.carry + v.carry_len, data, take)
            v.carry_len += <uint32_t>take
            pos = take
            if v.carry_len < HEADER_SIZE:
                return
            length = check_header(<const uint8_t*>v.carry, MAX_SERVER_FRAME)
            if length < 0:
                _protocol_error(self, v)
                return
            v.carry_need = <uint32_t>(HEADER_SIZE + length)
            grown = <char*>realloc(v.carry, v.carry_need)
            if grown == NULL:
                raise MemoryError()
            v.carry = grown
        take = v.carry_need - v.carry_len
        if take > n - pos:
            take = n - pos
        memcpy(v.carry + v.carry_len, data + pos, take)
        v.carry_len += <uint32_t>take
        pos += take
        if v.carry_len < v.carry_need:
            return
        _frame(self, v, <const uint8_t*>v.carry, v.carry_need)
        if v.fd < 0:
            return
        free(v.carry)          # idle viewers hold no read memory
        v.carry = NULL
        v.carry_len = v.carry_need = 0
    while n - pos >= HEADER_SIZE:
        length = check_header(data + pos, MAX_SERVER_FRAME)
        if length < 0:
            _protocol_error(self, v)
            return
        whole = HEADER_SIZE + length
        if n - pos < whole:
            break
        _frame(self, v, data + pos, whole)
        if v.fd < 0:
            return
        pos += whole
    if pos < n:
        _keep(self, v, data + pos, n - pos)


cdef void _keep(Viewers self, Viewer* v, const uint8_t* data, Py_ssize_t n) except *:
    """Start a carry with the incomplete frame at the end of a read."""
    cdef Py_ssize_t cap = n if n > HEADER_SIZE else HEADER_SIZE
    cdef Py_ssize_t length = 0
    if n >= HEADER_SIZE:
        length = check_header(data, MAX_SERVER_FRAME)
        if length < 0:
            _protocol_error(self, v)
            return
        if HEADER_SIZE + length > cap:
            cap = HEADER_SIZE + length
    v.carry = <char*>realloc(v.carry, cap)
    if v.carry == NULL:
        raise MemoryError()
    memcpy(v.carry, data, n)
    v.carry_len = <uint32_t>n
    v.carry_need = <uint32_t>(HEADER_SIZE + length) if n >= HEADER_SIZE else 0


cdef void _protocol_error(Viewers self, Viewer* v) except *:
    self.protocol_errors += 1
    _finish(self, v, END_PROTOCOL, 0)


cdef void _frame(Viewers self, Viewer* v, const uint8_t* f, Py_ssize_t whole) except *:
    cdef uint8_t ftype = f[1]
    cdef const uint8_t* body = f + HEADER_SIZE
    cdef const uint8_t* end = f + whole
    cdef object inflated = None
    self.frames += 1
    v.frames += 1
    if ftype == FT_BATCH:
        _batch(self, v, f, whole)
        return
    if f[2] & FLAG_LZ4:
        inflated = _inflate(self, f[2], &body, &end)
        if inflated is None:
            return
    if ftype == FT_PRESENCE:
        self.presence += 1
    elif ftype == FT_PONG:
        self.pongs += 1
    elif ftype == FT_GAP:
        self.node_gaps += 1
    elif ftype == FT_AUTH_OK or ftype == FT_ACK or ftype == FT_KICK or ftype == FT_ERROR:
        _on_reply(self, v, ftype, body, end)
    else:
        self.other_frames += 1


cdef object _inflate(Viewers self, uint8_t flags, const uint8_t** body, const uint8_t** end):
    """Inflate the lz4 body [body, end) of a frame (``flags`` from its
    header: FLAG_DICT names a pre-shared dictionary): returns the bytes and
    points body and end into them (keep the bytes while they are used);
    None (counted) when the body is corrupt or its dictionary unknown."""
    cdef Py_ssize_t n = end[0] - body[0]
    cdef Py_ssize_t size
    cdef object inflated, dct
    if n < lz4_prefix_size(flags):
        self.bad_bodies += 1
        return None
    size = lz4_stored_size(body[0])
    if size > MAX_SERVER_FRAME:
        self.bad_bodies += 1
        return None
    try:
        if flags & FLAG_DICT:
            dct = _DICTIONARIES.get(body[0][4])
            if dct is None:
                self.bad_bodies += 1
                return None
            inflated = _lz4_decompress(
                PyMemoryView_FromMemory(<char*>body[0] + 5, n - 5, PyBUF_READ),
                uncompressed_size=size, dict=dct)
            if PyBytes_GET_SIZE(inflated) != size:   # the size given is only a limit
                self.bad_bodies += 1
                return None
        else:
            inflated = _lz4_decompress(PyMemoryView_FromMemory(<char*>body[0], n, PyBUF_READ))
    except Exception:
        self.bad_bodies += 1
        return None
    body[0] = <const uint8_t*>PyBytes_AS_STRING(inflated)
    end[0] = body[0] + PyBytes_GET_SIZE(inflated)
    return inflated
