# A live room on this node: members, the batch being gathered, and the ring
# of recent records that reconnecting clients resume from.
#
# Sequence numbers are assigned by the logic layer, per room, strictly
# increasing with no holes. The ring holds the last `ring_size` records (and
# at most `ring_bytes`); a record is addressed as _ring[seq % _ring_cap].
# Records enter the ring when published but are replayed only up to
# flushed_seq: anything later is still pending and reaches a new member
# through the next flush, so a joining client never gets a message twice.

cdef class Room:
    cdef readonly str name
    cdef readonly str epoch
    cdef list _members                 # Connection objects, iterated in C
    cdef dict _slot                    # Connection -> index in _members

    # pending batch: concatenated records (a valid Batch body)
    cdef char* _pend
    cdef Py_ssize_t _pend_len
    cdef Py_ssize_t _pend_cap
    cdef readonly Py_ssize_t pending_count

    cdef readonly unsigned long long last_seq     # newest published
    cdef readonly unsigned long long flushed_seq  # newest written to members

    # resume ring
    cdef PyObject** _ring
    cdef Py_ssize_t _ring_cap
    cdef Py_ssize_t _ring_max_bytes
    cdef Py_ssize_t _ring_bytes
    cdef unsigned long long _ring_first           # oldest seq held; 0 if empty
    cdef Py_ssize_t _ring_count

    # flush scheduling state, driven by Hub
    cdef public double first_pending   # loop time the oldest pending record came
    cdef double _flush_tokens          # immediate flushes the room may still take
    cdef double _tokens_at             # loop time _flush_tokens was last refilled
    cdef public double last_activity
    cdef bint _scheduled
    cdef public bint sampled           # next batch says overload control sampled chat

    # counters
    cdef readonly unsigned long long frames_built
    cdef readonly unsigned long long deliveries
    cdef readonly unsigned long long bytes_in      # batch bodies before lz4
    cdef readonly unsigned long long bytes_out     # frames as built

    cdef int append(self, unsigned long long seq, bytes record) except -1
    cdef list flush(self, Py_ssize_t compress_min, int level)
    cdef list send_all(self, bytes frame)
    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef void _ring_push(self, unsigned long long seq, bytes record) noexcept
    cdef void _ring_pop(self) noexcept
    cdef void _ring_clear(self) noexcept
