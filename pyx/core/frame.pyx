# Where a frame is built: core frames with headroom, and the once-encoded
# RoomMessage records that batches concatenate (see frame.pxd).

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_READ
from cpython.list cimport PyList_GET_SIZE
from libc.string cimport memcpy, memset

import lz4.block as _lz4_block

# The core raises the protocol's own error class (one base: ReasonError).
from fanout.protocol.wire import WireError as FrameError
from fanout.protocol.wire import DICTIONARIES as _DICTIONARIES

_lz4_compress = _lz4_block.compress
_lz4_decompress = _lz4_block.decompress

# The pre-shared dictionary this process compresses with (0: none). Node-wide,
# not per connection: a room's frame is one object shared by every member,
# so every client must hold it; the node announces it in AuthOk.
cdef int _dict_id = 0
cdef object _dict_small = None
# python-lz4 loads the whole dictionary into the compressor for every frame,
# about 70 us for 64 KiB at high compression: that is all of a one-message
# frame's cost. Below SMALL_BODY bytes a frame is compressed against the
# dictionary's last SMALL_DICT bytes only (where its best segments are), which
# any decoder holding the whole dictionary inflates the same way, since LZ4
# offsets count back from the dictionary's end. One message at level 10
# (scripts/make_dict.py --evaluate): 56.6 B at 21 us instead of 53.5 B at 68 us.
cdef enum:
    SMALL_BODY = 4096
    SMALL_DICT = 16384


def set_compress_dict(int dict_id):
    """Compress every frame this process builds with the pre-shared LZ4
    dictionary ``dict_id`` (one of ``wire.DICTIONARIES``), or with none (0).
    A node sets it once at start, before any connection exists."""
    global _dict_id, _dict_small
    if dict_id == 0:
        _dict_id, _dict_small = 0, None
        return
    if dict_id not in _DICTIONARIES:
        raise ValueError(f"unknown lz4 dictionary id {dict_id}")
    _dict_small = _DICTIONARIES[dict_id][-SMALL_DICT:]
    _dict_id = dict_id


def compress_dict():
    """The dictionary id frames are compressed with (0: none)."""
    return _dict_id


cdef bytes build_frame(uint8_t ftype, const char* body, Py_ssize_t body_len,
                       Py_ssize_t compress_min, int level):
    return _build_frame(ftype, body, body_len, compress_min, level, _dict_id)


cdef bytes _build_frame(uint8_t ftype, const char* body, Py_ssize_t body_len,
                        Py_ssize_t compress_min, int level, int dict_id):
    cdef uint8_t flags = 0
    cdef object packed = None
    cdef object view
    cdef object dct
    cdef const char* src = body
    cdef Py_ssize_t n = body_len
    cdef Py_ssize_t prefix = 0         # dictionary frames: size and id, written here
    if compress_min > 0 and body_len >= compress_min:
        # lz4 reads straight from our buffer through a memoryview (no copy);
        # compressed output is used only when it is actually smaller. A frame
        # is compressed once for all its recipients, so high compression
        # costs little next to the writes and saves bandwidth on every one.
        view = PyMemoryView_FromMemory(<char*>body, body_len, PyBUF_READ)
        if dict_id:
            dct = _DICTIONARIES[dict_id]
            if body_len < SMALL_BODY:
                dct = _dict_small if dict_id == _dict_id else dct[-SMALL_DICT:]
            if level > 0:
                packed = _lz4_compress(view, store_size=False, mode="high_compression",
                                       compression=level, dict=dct)
            else:
                packed = _lz4_compress(view, store_size=False, dict=dct)
            prefix = 5
        elif level > 0:
            packed = _lz4_compress(view, store_size=True, mode="high_compression",
                                   compression=level)
        else:
            packed = _lz4_compress(view, store_size=True)
        if prefix + PyBytes_GET_SIZE(packed) < body_len:
            src = PyBytes_AS_STRING(packed)
            n = PyBytes_GET_SIZE(packed)
            flags = (FLAG_LZ4 | FLAG_DICT) if prefix else FLAG_LZ4
        else:
            prefix = 0
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, HEADROOM + HEADER_SIZE + prefix + n)
    cdef char* out = PyBytes_AS_STRING(frame)
    cdef uint8_t* pre = <uint8_t*>(out + HEADROOM + HEADER_SIZE)
    memset(out, 0, HEADROOM)
    write_header(out + HEADROOM, ftype, flags, <uint32_t>(prefix + n))
    if prefix:
        pre[0] = <uint8_t>(body_len & 0xFF)
        pre[1] = <uint8_t>((body_len >> 8) & 0xFF)
        pre[2] = <uint8_t>((body_len >> 16) & 0xFF)
        pre[3] = <uint8_t>((body_len >> 24) & 0xFF)
        pre[4] = <uint8_t>dict_id
    if n:
        memcpy(out + HEADROOM + HEADER_SIZE + prefix, src, n)
    return frame


cdef bytes body_of(uint8_t flags, const char* body, Py_ssize_t n,
                   Py_ssize_t max_body):
    cdef Py_ssize_t size
    cdef Py_ssize_t prefix = lz4_prefix_size(flags)
    cdef object dct, out
    if not (flags & FLAG_LZ4):
        return PyBytes_FromStringAndSize(body, n)
    if n < prefix:
        raise FrameError(R_BAD_COMPRESSION, "lz4 body shorter than its size prefix")
    # Check the declared size before inflating: a small frame must not be
    # able to make the node allocate more than max_body.
    size = lz4_stored_size(<const uint8_t*>body)
    if size > max_body:
        raise FrameError(R_BAD_COMPRESSION,
                         f"lz4 body inflates to {size} bytes, limit {max_body}")
    if not (flags & FLAG_DICT):
        try:
            return _lz4_decompress(PyMemoryView_FromMemory(<char*>body, n, PyBUF_READ))
        except Exception as exc:
            raise FrameError(R_BAD_COMPRESSION, f"corrupt lz4 body: {exc}") from None
    dct = _DICTIONARIES.get((<const uint8_t*>body)[4])
    if dct is None:
        raise FrameError(R_BAD_COMPRESSION,
                         f"unknown lz4 dictionary id {(<const uint8_t*>body)[4]}")
    try:
        # Given the size, python-lz4 takes it as a limit: checked exactly below.
        out = _lz4_decompress(PyMemoryView_FromMemory(<char*>body + 5, n - 5, PyBUF_READ),
                              uncompressed_size=size, dict=dct)
    except Exception as exc:
        raise FrameError(R_BAD_COMPRESSION, f"corrupt lz4 body: {exc}") from None
    if PyBytes_GET_SIZE(out) != size:
        raise FrameError(R_BAD_COMPRESSION,
                         f"lz4 body inflates to {PyBytes_GET_SIZE(out)} bytes, not {size}")
    return out


cdef str header_problem(int reason, const uint8_t* p, Py_ssize_t max_body):
    # Every byte is formatted as the unsigned value it is on the wire, and the
    # length is composed unsigned: a signed shift of a byte >= 0x80 makes a
    # 32-bit Py_ssize_t negative (and is undefined behaviour).
    cdef uint32_t length = ((<uint32_t>p[4] << 24) | (<uint32_t>p[5] << 16)
                            | (<uint32_t>p[6] << 8) | <uint32_t>p[7])
    if reason == R_UNSUPPORTED_VERSION:
        return f"unsupported protocol version {<unsigned int>p[0]}"
    if reason == R_FRAME_TOO_LARGE:
        return f"frame body of {length} bytes exceeds limit {max_body}"
    return (f"malformed frame header (flags=0x{<unsigned int>p[2]:02x}, "
            f"reserved=0x{<unsigned int>p[3]:02x})")


cdef Py_ssize_t frame_need(const char* data, Py_ssize_t n, Py_ssize_t max_body) except -1:
    # The header is checked as soon as it is whole, before any body byte is
    # awaited: a reader never carries bytes of a frame it would refuse.
    cdef const uint8_t* p = <const uint8_t*>data
    cdef Py_ssize_t length
    if n < HEADER_SIZE:
        return HEADER_SIZE
    length = check_header(p, max_body)
    if length < 0:
        raise FrameError(<int>-length, header_problem(<int>-length, p, max_body))
    return HEADER_SIZE + length


# ---------------------------------------------------------------- records

cdef inline Py_ssize_t _field_len(Py_ssize_t n) noexcept nogil:
    # tag byte + length varint + data; proto3 omits empty fields
    return 0 if n == 0 else 1 + varint_size(<uint64_t>n) + n


cdef inline Py_ssize_t _field_varint(uint64_t v) noexcept nogil:
    return 0 if v == 0 else 1 + varint_size(v)


cdef inline char* _put_bytes(char* p, uint8_t tag, const char* data,
                             Py_ssize_t n) noexcept nogil:
    if n == 0:
        return p
    p[0] = <char>tag
    p = put_varint(p + 1, <uint64_t>n)
    memcpy(p, data, n)
    return p + n


cdef inline char* _put_uint(char* p, uint8_t tag, uint64_t v) noexcept nogil:
    if v == 0:
        return p
    p[0] = <char>tag
    return put_varint(p + 1, v)


def encode_room_message(str room, unsigned long long seq, unsigned int kind,
                        unsigned int priority, str sender, payload,
                        unsigned long long server_ts_ms):
    """Encode one RoomMessage as a ``Batch.messages`` record.

    The result is ``0x0A varint(len) RoomMessage`` in canonical proto3 form
    (fields in number order, defaults omitted), so concatenated records are
    a valid ``Batch`` body. Called once per published message.
    """
    cdef bytes room_b = room.encode("utf-8")
    cdef bytes sender_b = sender.encode("utf-8")
    cdef const unsigned char[:] pl = payload
    cdef Py_ssize_t room_n = len(room_b), sender_n = len(sender_b)
    cdef Py_ssize_t pl_n = pl.shape[0]
    cdef Py_ssize_t inner = (_field_len(room_n) + _field_varint(seq)
                             + _field_varint(kind) + _field_varint(priority)
                             + _field_len(sender_n) + _field_len(pl_n)
                             + _field_varint(server_ts_ms))
    cdef Py_ssize_t total = 1 + varint_size(<uint64_t>inner) + inner
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* p = PyBytes_AS_STRING(out)
    p[0] = <char>0x0A
    p = put_varint(p + 1, <uint64_t>inner)
    p = _put_bytes(p, 0x0A, PyBytes_AS_STRING(room_b), room_n)
    p = _put_uint(p, 0x10, seq)
    p = _put_uint(p, 0x18, kind)
    p = _put_uint(p, 0x20, priority)
    p = _put_bytes(p, 0x2A, PyBytes_AS_STRING(sender_b), sender_n)
    if pl_n:
        p = _put_bytes(p, 0x32, <const char*>&pl[0], pl_n)
    p = _put_uint(p, 0x38, server_ts_ms)
    return out


cdef uint64_t record_ts_ms(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """The server_ts_ms (field 7) of one ``Batch.messages`` record
    (``0x0A varint(len) RoomMessage``), 0 when it has none or is malformed.
    Walks the fields, skipping each by its length: a few steps, whatever
    the payload's size (called once per batch, for its first record)."""
    cdef const uint8_t* end = p + n
    cdef uint64_t length, tag, value
    if n < 2 or p[0] != 0x0A:
        return 0
    p = get_varint(p + 1, end, &length)
    if p == NULL or length > <uint64_t>(end - p):
        return 0
    end = p + length
    while p < end:
        p = get_varint(p, end, &tag)
        if p == NULL:
            return 0
        if tag == 0x38:
            return value if get_varint(p, end, &value) != NULL else 0
        p = skip_field(p, end, tag)
        if p == NULL:
            return 0
    return 0


def room_record_ts_ms(record):
    """The ``server_ts_ms`` of one pre-encoded record, as the hub reads it
    (0: none, or not a record); for tests."""
    cdef const unsigned char[:] view = record
    if view.shape[0] == 0:
        return 0
    return record_ts_ms(<const uint8_t*>&view[0], view.shape[0])


# ---------------------------------------------------------------- Python API

cdef bytes _core_frame(unsigned int ftype, body, Py_ssize_t compress_min, int level,
                       int dict_id=0):
    cdef const unsigned char[:] view = body
    cdef Py_ssize_t n = view.shape[0]
    if ftype > 0xFF:
        raise ValueError(f"frame type {ftype} out of range")
    if n > 0xFFFFFFFF:
        raise ValueError("body too large for one frame")
    cdef const char* ptr = b""
    if n:
        ptr = <const char*>&view[0]
    if dict_id and dict_id not in _DICTIONARIES:
        raise ValueError(f"unknown lz4 dictionary id {dict_id}")
    return _build_frame(<uint8_t>ftype, ptr, n, compress_min, level, dict_id)


def core_frame(unsigned int ftype, body, Py_ssize_t compress_min=0, int level=0,
               int dict_id=0):
    """A core frame (headroom + wire frame) of ``body`` as ``ftype``, for
    :meth:`Connection.send` and :meth:`Hub.broadcast`."""
    return _core_frame(ftype, body, compress_min, level, dict_id)


def pack_frame(unsigned int ftype, body, Py_ssize_t compress_min=0, int level=0,
               int dict_id=0):
    """The wire bytes of ``body`` framed as ``ftype``; lz4 when it pays and
    ``len(body) >= compress_min > 0`` (``level`` 1-12: high compression;
    ``dict_id``: with that pre-shared dictionary). Explicit here, unlike a
    room's frames, which use the process's :func:`set_compress_dict`.
    For tools and tests: a connection takes :func:`core_frame` frames."""
    return _core_frame(ftype, body, compress_min, level, dict_id)[HEADROOM:]


def wire_bytes(bytes frame):
    """What a plain connection writes of the core frame ``frame``."""
    return frame[HEADROOM:]


cdef Py_ssize_t split_frames(const char* data, Py_ssize_t n, Py_ssize_t max_body,
                             list out, Py_ssize_t max_frames=PY_SSIZE_T_MAX) except -1:
    # Header checks come before waiting for a body, so a reader's carry
    # buffer never holds more than one frame of at most max_body bytes.
    # Past max_frames frames in `out` no body is copied: the next complete
    # frame is refused as one request too many.
    cdef Py_ssize_t pos = 0, length
    cdef const uint8_t* p
    while n - pos >= HEADER_SIZE:
        p = <const uint8_t*>(data + pos)
        length = check_header(p, max_body)
        if length < 0:
            raise FrameError(<int>-length, header_problem(<int>-length, p, max_body))
        if n - pos - HEADER_SIZE < length:
            break
        if PyList_GET_SIZE(out) >= max_frames:
            raise FrameError(R_TOO_MANY_REQUESTS,
                             f"more than {max_frames} requests at once, over the budget")
        out.append((p[1], p[2], body_of(p[2], data + pos + HEADER_SIZE, length, max_body)))
        pos += HEADER_SIZE + length
    return pos


def parse_frames(data, Py_ssize_t max_body, Py_ssize_t max_frames=PY_SSIZE_T_MAX):
    """Split complete frames off ``data``.

    Returns ``(frames, consumed)`` where frames is a list of
    ``(type, flags, body)`` with bodies inflated. Raises :class:`FrameError`
    on the first invalid header or body, or (TOO_MANY_REQUESTS) on a
    complete frame past ``max_frames``. Used by tests and tools; a
    connection runs the same checks on its socket.
    """
    cdef const unsigned char[:] view = data
    cdef list frames = []
    cdef Py_ssize_t used = 0
    if view.shape[0]:
        used = split_frames(<const char*>&view[0], view.shape[0], max_body, frames, max_frames)
    return frames, used
