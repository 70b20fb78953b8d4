# Wire protocol v1 framing (docs/protocol.md): an 8-byte header
#   version:u8  type:u8  flags:u8  reserved:u8  length:u32be
# followed by `length` body bytes; flag bit 0 means the body is
# u32le(uncompressed size) + one raw LZ4 block.

from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef enum:
    WIRE_VERSION = 1
    HEADER_SIZE = 8
    FLAG_LZ4 = 0x01

# Reason codes the core itself raises (mirrors fanout.proto's Reason enum).
cdef enum:
    R_BAD_FRAME = 1
    R_FRAME_TOO_LARGE = 2
    R_UNSUPPORTED_VERSION = 5
    R_BAD_COMPRESSION = 6

# Build one frame: header + body (compressed when body_len >= compress_min
# and the result is smaller; level 0 is lz4's fast mode, 1-12 its
# high-compression levels). Returns a new bytes object the caller owns.
cdef bytes build_frame(uint8_t ftype, const char* body, Py_ssize_t body_len,
                       Py_ssize_t compress_min, int level)

# Validate one header. Returns the body length, or -reason when invalid.
cdef Py_ssize_t check_header(const uint8_t* p, Py_ssize_t max_body) noexcept nogil

# Body bytes of a frame, inflated when flagged; raises FrameError.
cdef bytes body_of(uint8_t flags, const char* body, Py_ssize_t n,
                   Py_ssize_t max_body)

# Protobuf varint helpers for the hand-rolled RoomMessage encoder.
cdef Py_ssize_t varint_size(uint64_t v) noexcept nogil
cdef char* put_varint(char* p, uint64_t v) noexcept nogil
