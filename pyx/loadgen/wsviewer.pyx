# WebSocket viewers (transports T_WS, T_WSS; docs/protocol.md 1.1), as a
# browser does it:
#   connect -> the HTTP upgrade request (the same bytes for every viewer)
#   <- "HTTP/1.1 101", checked against the Sec-WebSocket-Accept of our key;
#      429/503/408 (the node's admission refusals before the upgrade) are
#      retried like CONNECTION_RATE_LIMITED, CONNECTION_LIMIT, AUTH_TIMEOUT
#   -> Hello, then Join, then Pings: each one masked binary message (a
#      client must mask, RFC 6455 5.3). Hello and Join are wrapped and
#      masked once, when the Viewers object is built; a Ping is masked here.
#   <- every server message is one unmasked, unfragmented frame holding
#      exactly ONE wire frame: its header is checked before its payload is
#      read, the wire frame is then handled in place by reader.pyx's _frame,
#      so verification (verify.pyx) is the TCP viewers' to the byte. A
#      partial message waits in the viewer's carry buffer as over TCP.
#      A Close's code is kept: when the Kick/Error frame before it was not
#      seen, 4000 + reason says why the viewer ended.
# The node never pings (its heartbeat is the wire Ping/Pong), so a
# WebSocket Ping from it is counted, not answered.

cdef enum:
    WS_HEAD_MAX = 4096                 # the 101 response head is ~150 bytes
    WS_CARRY_MIN = 16                  # a carry holds at least a whole frame header
    WS_FIN = 0x80
    WS_OP_BINARY = 0x2
    WS_OP_CLOSE = 0x8
    WS_OP_PING = 0x9
    WS_OP_PONG = 0xA
    WS_CLOSE_REASON_BASE = 4000        # a Close's code after a Kick/Error: 4000 + reason


cdef bytes _ws_wrap(bytes payload, uint32_t key):
    """A client's binary message: FIN|binary, MASK|length, the key, the
    payload masked with it."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload), h, i
    cdef bytes out
    cdef uint8_t* p
    cdef const uint8_t* src = <const uint8_t*>PyBytes_AS_STRING(payload)
    cdef uint8_t k[4]
    h = 2 if n < 126 else (4 if n <= 0xFFFF else 10)
    out = PyBytes_FromStringAndSize(NULL, h + 4 + n)
    p = <uint8_t*>PyBytes_AS_STRING(out)
    p[0] = WS_FIN | WS_OP_BINARY
    if h == 2:
        p[1] = 0x80 | <uint8_t>n
    elif h == 4:
        p[1] = 0x80 | 126
        p[2] = <uint8_t>(n >> 8)
        p[3] = <uint8_t>n
    else:
        p[1] = 0x80 | 127
        for i in range(8):
            p[2 + i] = <uint8_t>((<uint64_t>n) >> (56 - 8 * i))
    memcpy(k, &key, 4)
    memcpy(p + h, k, 4)
    p += h + 4
    for i in range(n):
        p[i] = src[i] ^ k[i & 3]
    return out


cdef uint32_t _ws_mask_ping(Viewer* v, uint32_t wire_len) noexcept nogil:
    """Wrap the wire Ping at v.ping + 6 in its masked message (header at
    v.ping); returns the message's length. wire_len < 126 always (a Ping is
    at most 19 bytes)."""
    cdef uint8_t* p = <uint8_t*>v.ping
    cdef uint8_t k[4]
    cdef uint32_t i
    memcpy(k, &v.ws_mask, 4)
    p[0] = WS_FIN | WS_OP_BINARY
    p[1] = 0x80 | <uint8_t>wire_len
    memcpy(p + 2, k, 4)
    for i in range(wire_len):
        p[6 + i] ^= k[i & 3]
    return wire_len + 6


cdef Py_ssize_t _ws_need(const uint8_t* p, Py_ssize_t avail, Py_ssize_t* hlen) noexcept nogil:
    """The server frame header at p: returns the whole frame's length and
    sets *hlen to its header's length; while the header is incomplete,
    returns how long the header will be (at least 2) and sets *hlen to 0;
    -1 when the header breaks the mapping's rules (masked, fragmented, RSV
    bits, an opcode the node never sends, a message over the frame limit)."""
    cdef uint8_t op, len7
    cdef Py_ssize_t h
    cdef uint64_t plen = 0
    cdef int i
    hlen[0] = 0
    if avail < 2:
        return 2
    op = p[0] & 0x0F
    if (p[0] & 0xF0) != WS_FIN or p[1] & 0x80:
        return -1                       # fragmented, an extension's bits, or masked
    len7 = p[1] & 0x7F
    h = 2 if len7 < 126 else (4 if len7 == 126 else 10)
    if avail < h:
        return h
    if len7 < 126:
        plen = len7
    elif len7 == 126:
        plen = (<uint64_t>p[2] << 8) | p[3]
    else:
        for i in range(8):
            plen = (plen << 8) | p[2 + i]
    if op == WS_OP_BINARY:
        if plen > <uint64_t>(HEADER_SIZE + MAX_SERVER_FRAME):
            return -1
    elif op == WS_OP_CLOSE or op == WS_OP_PING or op == WS_OP_PONG:
        if plen > 125:
            return -1
    else:
        return -1                       # text or a continuation: never from the node
    hlen[0] = h
    return h + <Py_ssize_t>plen


cdef void _ws_feed(Viewers self, Viewer* v, const uint8_t* data, Py_ssize_t n) except *:
    """Bytes read from a WebSocket viewer's socket: the response head while
    upgrading, then whole messages in place, a partial one carried."""
    cdef Py_ssize_t pos = 0, need, hlen, take, cap
    cdef char* grown
    if v.state == ST_UPGRADE:
        pos = _ws_head(self, v, data, n)
        if pos < 0 or v.fd < 0:
            return
    if v.carry_len:
        while True:
            if v.carry_need == 0:
                # the header is not all in yet; the carry holds WS_CARRY_MIN
                need = _ws_need(<const uint8_t*>v.carry, v.carry_len, &hlen)
                if need < 0:
                    _protocol_error(self, v)
                    return
                if hlen:
                    cap = need if need > WS_CARRY_MIN else WS_CARRY_MIN
                    grown = <char*>realloc(v.carry, cap)
                    if grown == NULL:
                        raise MemoryError()
                    v.carry = grown
                    v.carry_need = <uint32_t>need
                    continue
            else:
                need = v.carry_need
            take = need - v.carry_len
            if take > n - pos:
                take = n - pos
            memcpy(v.carry + v.carry_len, data + pos, take)
            v.carry_len += <uint32_t>take
            pos += take
            if v.carry_len < need:
                return
            if v.carry_need:
                break
        _ws_message(self, v, <const uint8_t*>v.carry, v.carry_need)
        if v.fd < 0:
            return
        free(v.carry)          # idle viewers hold no read memory
        v.carry = NULL
        v.carry_len = v.carry_need = 0
    while pos < n:
        need = _ws_need(data + pos, n - pos, &hlen)
        if need < 0:
            _protocol_error(self, v)
            return
        if hlen == 0 or n - pos < need:
            break
        _ws_message(self, v, data + pos, need)
        if v.fd < 0:
            return
        pos += need
    if pos < n:
        # the incomplete message at the end of the read
        take = n - pos
        need = _ws_need(data + pos, take, &hlen)
        cap = take if take > WS_CARRY_MIN else WS_CARRY_MIN
        if hlen and need > cap:
            cap = need
        v.carry = <char*>realloc(v.carry, cap)
        if v.carry == NULL:
            raise MemoryError()
        memcpy(v.carry, data + pos, take)
        v.carry_len = <uint32_t>take
        v.carry_need = <uint32_t>need if hlen else 0


cdef void _ws_message(Viewers self, Viewer* v, const uint8_t* p, Py_ssize_t whole) except *:
    """One whole server message (its header passed _ws_need)."""
    cdef uint8_t op = p[0] & 0x0F
    cdef Py_ssize_t hlen = 2 if (p[1] & 0x7F) < 126 else (4 if (p[1] & 0x7F) == 126 else 10)
    cdef const uint8_t* payload = p + hlen
    cdef Py_ssize_t plen = whole - hlen
    if op == WS_OP_BINARY:
        # exactly one wire frame per message: a frame split over messages,
        # or two in one, is the node's bug and must not pass unseen
        if plen < HEADER_SIZE or check_header(payload, MAX_SERVER_FRAME) != plen - HEADER_SIZE:
            _protocol_error(self, v)
            return
        _frame(self, v, payload, plen)
    elif op == WS_OP_CLOSE:
        self.ws_closes += 1
        v.ws_close = <uint16_t>(((<uint16_t>payload[0]) << 8) | payload[1]) if plen >= 2 else 1005
    elif op == WS_OP_PONG:
        self.ws_pongs += 1
    else:
        self.ws_pings += 1


cdef Py_ssize_t _ws_head(Viewers self, Viewer* v, const uint8_t* data, Py_ssize_t n) except -2:
    """Collect the upgrade response head in the carry buffer; once whole,
    act on it. Returns the bytes of ``data`` it took, or -1 while the head
    is incomplete or when the viewer was refused."""
    cdef Py_ssize_t old = v.carry_len, take = n, end
    cdef const char* hit
    cdef const char* head
    cdef int status
    cdef bytes accept = self._accept
    if v.carry == NULL:
        v.carry = <char*>malloc(WS_HEAD_MAX)
        if v.carry == NULL:
            raise MemoryError()
    if take > WS_HEAD_MAX - old:
        take = WS_HEAD_MAX - old
    memcpy(v.carry + old, data, take)
    v.carry_len = <uint32_t>(old + take)
    hit = <const char*>memmem(v.carry, v.carry_len, b"\r\n\r\n", 4)
    if hit == NULL:
        if v.carry_len >= WS_HEAD_MAX:
            _protocol_error(self, v)
        return -1
    end = hit + 4 - v.carry
    head = v.carry
    if end >= 13 and memcmp(head, b"HTTP/1.1 101 ", 13) == 0:
        if memmem(head, end, PyBytes_AS_STRING(accept), PyBytes_GET_SIZE(accept)) == NULL:
            _protocol_error(self, v)     # not an answer to our key
            return -1
        free(v.carry)
        v.carry = NULL
        v.carry_len = v.carry_need = 0
        self.upgrades += 1
        v.state = ST_AUTH
        _send_hello(self, v)
        return end - old
    if end < 12 or memcmp(head, b"HTTP/1.", 7) != 0:
        _protocol_error(self, v)
        return -1
    status = (head[9] - 48) * 100 + (head[10] - 48) * 10 + (head[11] - 48)
    self.upgrade_refused += 1
    _count_errno(self, "http", status)
    if status == 408 or status == 429 or status == 503:
        # admission refusals (AUTH_TIMEOUT, *_RATE_LIMITED/ADDRESS_LIMIT,
        # CONNECTION_LIMIT/SERVER_SHUTDOWN): back off and try again
        _retry_or_end(self, v, END_UPGRADE, <uint16_t>status, lg_mono_ns())
    else:
        _finish(self, v, END_UPGRADE, <uint16_t>status)
    return -1


def ws_client_message(bytes payload, uint32_t key):
    """A client's masked binary message holding ``payload`` (for tests)."""
    return _ws_wrap(payload, key)
