# Verification: every viewer's rolling hash of its Batch frames, the
# reference each room's decoded viewers build, and the check of one against
# the other (the method: "What is checked" in fanout/_loadgen.pxd). Only
# decoded viewers, and every viewer's first Batch, inflate and walk a body;
# all others hash and count.

# the rolling-hash multiplier (odd, so multiplication is invertible mod 2^64)
cdef uint64_t P = 0x5851F42D4C957F2D


cdef void _batch(Viewers self, Viewer* v, const uint8_t* f, Py_ssize_t whole) except *:
    cdef uint64_t h = lg_hash(f, <size_t>whole)
    cdef uint64_t j = v.bframes
    cdef const uint8_t* body = f + HEADER_SIZE
    cdef const uint8_t* end = f + whole
    cdef object inflated = None
    cdef uint64_t nmsgs = 0, first = 0, last = 0
    self.batch_frames += 1
    self.batch_bytes += <uint64_t>whole
    v.bframes = j + 1
    v.chain = v.chain * P + h
    if not v.decoded and j != 0:
        return                         # the common case: hash and count only
    if f[2] & FLAG_LZ4:
        inflated = _inflate(self, f[2], &body, &end)
        if inflated is None:
            return
    if _walk(self, v, body, end, v.decoded, &nmsgs, &first, &last) < 0:
        self.bad_bodies += 1
        return
    if j == 0:
        v.first_seq = first
        v.first_msgs = nmsgs
        if not v.decoded and first:
            # every viewer's join point: the first message follows the Ack
            if first > v.ack_seq + 1:
                self.join_point_gaps += 1
                self.gaps += 1
                self.missing += first - v.ack_seq - 1
            elif first <= v.ack_seq:
                self.reorders += 1
    if v.decoded:
        self.decoded_frames += 1
        v.msgs += nmsgs
        self.decoded_msgs += nmsgs
        _reference(self, v, j, h, nmsgs, first, last)


cdef int _walk(Viewers self, Viewer* v, const uint8_t* p, const uint8_t* end, bint check,
               uint64_t* nmsgs, uint64_t* first, uint64_t* last) except -2:
    """Walk a Batch body: count records; with ``check``, seq/gap/latency
    checks on every message. -1 when malformed."""
    cdef uint64_t tag, ln, seq, now = 0, count = 0
    cdef const uint8_t* m
    cdef const uint8_t* mend
    cdef const uint8_t* room = NULL
    cdef const uint8_t* payload = NULL
    cdef uint64_t room_len = 0, payload_len = 0
    cdef RoomRef* ref = &self.refs[v.room]
    if check and self.recording:
        now = lg_real_ns()
    while p < end:
        p = get_varint(p, end, &tag)
        if p == NULL:
            return -1
        if tag != 0x0A:
            if tag == 0x10:
                p = get_varint(p, end, &ln)
                if p == NULL:
                    return -1
                if ln:
                    self.sampled_batches += 1
                continue
            p = skip_field(p, end, tag)
            if p == NULL:
                return -1
            continue
        p = get_varint(p, end, &ln)
        if p == NULL or ln > <uint64_t>(end - p):
            return -1
        m = p
        mend = p + ln
        p = mend
        count += 1
        if not check and count > 1:
            continue
        seq = 0
        room = NULL
        room_len = 0
        payload = NULL
        payload_len = 0
        while m < mend:
            m = get_varint(m, mend, &tag)
            if m == NULL:
                return -1
            if tag == 0x10:
                m = get_varint(m, mend, &seq)
            elif tag == 0x0A or tag == 0x32:
                m = get_varint(m, mend, &ln)
                if m == NULL or ln > <uint64_t>(mend - m):
                    return -1
                if tag == 0x0A:
                    room = m
                    room_len = ln
                else:
                    payload = m
                    payload_len = ln
                m += ln
            else:
                m = skip_field(m, mend, tag)
            if m == NULL:
                return -1
        if count == 1:
            first[0] = seq
        last[0] = seq
        if not check:
            continue
        if (<Py_ssize_t>room_len != ref.name_len
                or memcmp(room, ref.name, room_len) != 0):
            self.foreign += 1
            continue
        if seq == v.last_seq + 1:
            v.last_seq = seq
        elif seq > v.last_seq:
            self.gaps += 1
            self.missing += seq - v.last_seq - 1
            v.last_seq = seq
        else:
            self.reorders += 1
        if now and payload_len >= 8:
            _record_latency(self, payload, now)
    nmsgs[0] = count
    return 0


cdef void _reference(Viewers self, Viewer* v, uint64_t j, uint64_t h, uint64_t nmsgs,
                     uint64_t first, uint64_t last) except *:
    """Extend (or check) the room's reference with a decoded viewer's frame."""
    cdef RoomRef* ref = &self.refs[v.room]
    cdef Py_ssize_t k
    if j == 0:
        if ref.known == 0:
            v.k0 = 0
        elif first and first == ref.last[ref.known - 1] + 1:
            v.k0 = ref.known
        else:
            v.k0 = _find(ref, first)
            if v.k0 < 0:
                v.k0 = -2
    if v.k0 < 0:
        return
    k = <Py_ssize_t>(v.k0 + <int64_t>j)
    if k < ref.known:
        if ref.fhash[k] != h:
            ref.mismatches += 1
        return
    if k > ref.known:
        return                          # cannot happen: viewers add in order
    if ref.known == ref.cap:
        _grow(ref)
    ref.fhash[k] = h
    ref.first[k] = first
    ref.last[k] = last
    ref.chain[k + 1] = ref.chain[k] * P + h
    ref.cum[k + 1] = ref.cum[k] + nmsgs
    ref.known = k + 1


cdef void _grow(RoomRef* ref) except *:
    cdef Py_ssize_t cap = 1024 if ref.cap == 0 else ref.cap * 2
    ref.fhash = _realloc_u64(ref.fhash, cap)
    ref.first = _realloc_u64(ref.first, cap)
    ref.last = _realloc_u64(ref.last, cap)
    ref.chain = _realloc_u64(ref.chain, cap + 1)
    if ref.cap == 0:
        ref.chain[0] = 0                # G[0]: the empty prefix
    ref.cum = _realloc_u64(ref.cum, cap + 1)
    if ref.cap == 0:
        ref.cum[0] = 0                  # C[0]
    ref.cap = cap


cdef uint64_t* _realloc_u64(uint64_t* a, Py_ssize_t n) except NULL:
    """``a`` resized to ``n`` entries; on failure ``a`` is left as it was."""
    a = <uint64_t*>realloc(a, n * sizeof(uint64_t))
    if a == NULL:
        raise MemoryError()
    return a


cdef void _free_ref(RoomRef* ref) noexcept:
    free(ref.fhash)
    free(ref.first)
    free(ref.last)
    free(ref.chain)
    free(ref.cum)


cdef Py_ssize_t _find(RoomRef* ref, uint64_t first) noexcept:
    """Reference frame index whose first seq is ``first``; -1 if none."""
    cdef Py_ssize_t lo = 0, hi = ref.known, mid
    if first == 0:
        return -1
    while lo < hi:
        mid = (lo + hi) // 2
        if ref.first[mid] < first:
            lo = mid + 1
        else:
            hi = mid
    if lo < ref.known and ref.first[lo] == first:
        return lo
    return -1


cdef int64_t _resolve(Viewers self, Viewer* v) noexcept:
    """A viewer's start in its room's reference: >= 0, -1 not yet, -2 never."""
    cdef RoomRef* ref
    cdef Py_ssize_t k
    if v.k0 != -1 or v.bframes == 0 or v.first_seq == 0:
        return v.k0
    ref = &self.refs[v.room]
    if ref.known == 0:
        return -1
    k = _find(ref, v.first_seq)
    if k >= 0:
        v.k0 = k
    elif v.first_seq < ref.first[0]:
        v.k0 = -2                       # started before the reference: never covered
    return v.k0


cdef uint64_t _deliveries(Viewers self, uint64_t* unresolved) noexcept:
    """Messages delivered to all viewers: counted by decoded ones, C[k0+n] - C[k0]
    for the others; ``unresolved``: their frames the reference has not seen yet."""
    cdef Py_ssize_t i, end
    cdef Viewer* v
    cdef RoomRef* ref
    cdef int64_t k0
    cdef uint64_t total = 0, pending = 0
    for i in range(self.n):
        v = &self.v[i]
        if v.bframes == 0:
            continue
        if v.decoded:
            total += v.msgs
            continue
        k0 = _resolve(self, v)
        if k0 < 0:
            total += v.first_msgs
            pending += v.bframes - 1
            continue
        ref = &self.refs[v.room]
        end = <Py_ssize_t>(k0 + <int64_t>v.bframes)
        if end > ref.known:
            pending += <uint64_t>(end - ref.known)
            end = ref.known
        total += ref.cum[end] - ref.cum[k0]
    unresolved[0] = pending
    return total


cdef dict _verify_viewers(Viewers self):
    """Viewers.verify(): every viewer's chain against its room's reference."""
    cdef Py_ssize_t i, end
    cdef Viewer* v
    cdef RoomRef* ref
    cdef int64_t k0
    cdef uint64_t expect
    cdef long divergences = 0, verified = 0, unverified = 0, cut = 0, silent = 0
    bad = []
    for i in range(self.n):
        v = &self.v[i]
        if not v.was_live:
            continue
        if v.state == ST_DONE and v.end != END_CLOSED:
            cut += 1
        ref = &self.refs[v.room]
        if v.bframes == 0:
            if ref.known and v.state == ST_LIVE:
                silent += 1          # its room got frames, it got none
                unverified += 1
            continue
        k0 = _resolve(self, v)
        if k0 < 0:
            unverified += 1
            continue
        end = <Py_ssize_t>(k0 + <int64_t>v.bframes)
        if end > ref.known:
            unverified += 1
            continue
        expect = ref.chain[end] - ref.chain[k0] * _pow(P, v.bframes)
        if expect == v.chain:
            verified += 1
        else:
            divergences += 1
            if len(bad) < 20:
                bad.append(i)
    rooms = []
    for i in range(self.nrooms):
        ref = &self.refs[i]
        rooms.append({
            "room": self._names[i].decode("utf-8", "replace"),
            "frames": ref.known,
            "chain": ref.chain[ref.known] if ref.known else 0,
            "messages": ref.cum[ref.known] if ref.known else 0,
            "first_seq": ref.first[0] if ref.known else 0,
            "last_seq": ref.last[ref.known - 1] if ref.known else 0,
            "mismatches": ref.mismatches,
        })
    return {"divergences": divergences, "verified": verified, "unverified": unverified,
            "silent": silent, "cut": cut, "divergent_viewers": bad, "rooms": rooms}


cdef uint64_t _pow(uint64_t base, uint64_t n) noexcept nogil:
    cdef uint64_t r = 1
    while n:
        if n & 1:
            r *= base
        base *= base
        n >>= 1
    return r
