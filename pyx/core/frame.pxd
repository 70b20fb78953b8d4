# Where a frame is built. Wire format and constants: pyx/includes/wireformat.pxd.
#
# A core frame is one bytes object, built once per room flush (or control
# reply) and shared by every recipient. It starts with HEADROOM bytes that
# no plain-TCP reader ever sees, so a transport kind that wraps each frame in
# a header of its own (a WebSocket frame header) can write that header once
# into the shared object instead of copying the frame per recipient:
#
#   [0]                HR_TAG: prefix kind whose header is in the headroom (0: none)
#   [1]                HR_LEN: that header's length, at most MAX_PREFIX
#   [2 .. HEADROOM)    free; a prefix ends exactly at HEADROOM
#   [HEADROOM .. +8)   the wire header (version, type, flags, reserved, length)
#   [HEADROOM+8 .. )   the body, lz4-compressed when that pays (with the
#                      dictionary: u32le size, dictionary id, LZ4 block)
#
# A plain connection writes [HEADROOM, end); a prefixed one writes
# [HEADROOM - HR_LEN, end). The headroom is written at most once, by the
# loop thread, before any write of the frame (connection.pyx), and never
# again, so a backlog holding a half-written frame always sees the same
# bytes. Frames are never hashed or used as keys: Python sees them as
# immutable, and only the headroom ever changes.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from cpython.pyport cimport PY_SSIZE_T_MAX

cdef enum:
    HEADROOM = 16
    HR_TAG = 0
    HR_LEN = 1
    MAX_PREFIX = HEADROOM - 2

# Build one core frame: headroom + header + body (compressed when body_len >=
# compress_min > 0 and the result is smaller; level 0 is lz4's fast mode,
# 1-12 its high-compression levels; with the process's pre-shared dictionary
# when set_compress_dict() set one). A new bytes object the caller owns.
cdef bytes build_frame(uint8_t ftype, const char* body, Py_ssize_t body_len,
                       Py_ssize_t compress_min, int level)

# Body bytes of one frame, inflated when flagged; raises FrameError.
cdef bytes body_of(uint8_t flags, const char* body, Py_ssize_t n,
                   Py_ssize_t max_body)

# Split complete wire frames off data into out as (type, flags, body), bodies
# inflated; returns the bytes consumed. Raises FrameError on the first bad
# one, or TOO_MANY_REQUESTS on a complete frame once out holds max_frames.
cdef Py_ssize_t split_frames(const char* data, Py_ssize_t n, Py_ssize_t max_body,
                             list out, Py_ssize_t max_frames=*) except -1

# Bytes the frame starting at data needs in all: its header's size while
# fewer than HEADER_SIZE bytes are there, else header + body. Raises
# FrameError on a bad header.
cdef Py_ssize_t frame_need(const char* data, Py_ssize_t n, Py_ssize_t max_body) except -1

# The reason text for a header check_header() refused.
cdef str header_problem(int reason, const uint8_t* p, Py_ssize_t max_body)

# The server_ts_ms of one Batch.messages record (unix ms; 0: none or malformed).
cdef uint64_t record_ts_ms(const uint8_t* p, Py_ssize_t n) noexcept nogil
