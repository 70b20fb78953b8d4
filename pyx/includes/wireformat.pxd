# Wire protocol v1 in C: the constants (generated from the Python table) and
# the inline helpers that the core and the load generator share, so both read
# and write frames by the same rules (docs/protocol.md).
#
# A frame is an 8-byte header
#   version:u8  type:u8  flags:u8  reserved:u8  length:u32be
# followed by `length` body bytes; with FLAG_LZ4 the body is
# u32le(uncompressed size) + one raw LZ4 block, and with FLAG_DICT as well
# u32le(uncompressed size) + u8 dictionary id + one raw LZ4 block compressed
# with that pre-shared dictionary (FLAG_DICT alone is undefined).
#
# Header-only module: `from wireformat cimport ...`; nothing here exists at
# run time.

from libc.stdint cimport uint8_t, uint32_t, uint64_t

include "consts.pxi"


cdef inline void write_header(char* p, uint8_t ftype, uint8_t flags,
                              uint32_t length) noexcept nogil:
    p[0] = <char>WIRE_VERSION
    p[1] = <char>ftype
    p[2] = <char>flags
    p[3] = 0
    p[4] = <char>((length >> 24) & 0xFF)
    p[5] = <char>((length >> 16) & 0xFF)
    p[6] = <char>((length >> 8) & 0xFF)
    p[7] = <char>(length & 0xFF)


cdef inline Py_ssize_t body_length(const uint8_t* p) noexcept nogil:
    """The header's length field."""
    # Assembled unsigned: a signed shift of a byte >= 0x80 into bit 31 is
    # undefined (and negative with a 32-bit Py_ssize_t).
    return <Py_ssize_t>((<uint32_t>p[4] << 24) | (<uint32_t>p[5] << 16)
                        | (<uint32_t>p[6] << 8) | <uint32_t>p[7])


cdef inline Py_ssize_t check_header(const uint8_t* p, Py_ssize_t max_body) noexcept nogil:
    """The body length of a valid header, or -reason (R_UNSUPPORTED_VERSION,
    R_BAD_FRAME, R_FRAME_TOO_LARGE). Checked before any body byte is
    awaited, so a reader never buffers more than one frame of max_body."""
    cdef Py_ssize_t length
    if p[0] != WIRE_VERSION:
        return -R_UNSUPPORTED_VERSION
    if (p[2] & ~(FLAG_LZ4 | FLAG_DICT)) or p[2] == FLAG_DICT or p[3] != 0:
        return -R_BAD_FRAME
    length = body_length(p)
    if length > max_body:
        return -R_FRAME_TOO_LARGE
    return length


cdef inline Py_ssize_t lz4_prefix_size(uint8_t flags) noexcept nogil:
    """Bytes before the LZ4 block of a compressed body: the size, and with
    FLAG_DICT the dictionary id."""
    return 5 if flags & FLAG_DICT else 4


cdef inline Py_ssize_t lz4_stored_size(const uint8_t* body) noexcept nogil:
    """The uncompressed size an LZ4 body declares (its u32le prefix); the
    caller checks it against its limit before inflating anything."""
    return <Py_ssize_t>(<uint32_t>body[0] | (<uint32_t>body[1] << 8)
                        | (<uint32_t>body[2] << 16) | (<uint32_t>body[3] << 24))


# ---------------------------------------------------------------- protobuf varints

cdef inline Py_ssize_t varint_size(uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline char* put_varint(char* p, uint64_t v) noexcept nogil:
    while v >= 0x80:
        p[0] = <char>((v & 0x7F) | 0x80)
        v >>= 7
        p += 1
    p[0] = <char>v
    return p + 1


cdef inline const uint8_t* get_varint(const uint8_t* p, const uint8_t* end,
                                      uint64_t* out) noexcept nogil:
    """Decode one varint at p; the position after it, or NULL when it runs
    past end or over 64 bits."""
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef uint8_t b
    while p < end and shift < 64:
        b = p[0]
        p += 1
        v |= <uint64_t>(b & 0x7F) << shift
        if b < 0x80:
            out[0] = v
            return p
        shift += 7
    return NULL


cdef inline const uint8_t* skip_field(const uint8_t* p, const uint8_t* end,
                                      uint64_t tag) noexcept nogil:
    """Skip one field's value; NULL when malformed."""
    cdef uint64_t n
    cdef int wt = <int>(tag & 7)
    if wt == 0:
        return get_varint(p, end, &n)
    if wt == 2:
        p = get_varint(p, end, &n)
        if p == NULL or n > <uint64_t>(end - p):
            return NULL
        return p + n
    if wt == 1:
        return p + 8 if end - p >= 8 else NULL
    if wt == 5:
        return p + 4 if end - p >= 4 else NULL
    return NULL
