# A live room on this node: members, the batch being gathered, and the ring
# of recent records that reconnecting clients resume from.
#
# Sequence numbers are assigned by the logic layer, per room, strictly
# increasing with no holes. The ring holds the last `ring_size` records (and
# at most `ring_bytes`); a record is addressed as _ring[seq % _ring_cap].
# Records enter the ring when published but are replayed only up to
# flushed_seq: anything later is still pending and reaches a new member
# through the next flush, so a joining client never gets a message twice.
#
# Replays are built once and shared, never compressed per requester. The
# seqs are cut into aligned chunks of REPLAY_CHUNK (seqs k*C+1 .. (k+1)*C); a
# replay is the requester's head piece (its first seq up to the next chunk
# boundary), whole chunks, and a tail piece (a chunk's start up to
# flushed_seq). Within a piece, frames are cut by bytes from the piece's
# first seq, so the frames depend only on the range, never on who asks.
#   * whole chunks: built on first use, kept in _chunks until the chunk's
#     first seq leaves the ring; each seq is in at most one chunk, so they
#     hold at most the ring's records as frames (about the ring's
#     compressed size, <= ring_bytes plus a frame header per frame);
#   * head and tail pieces: at most REPLAY_CHUNK - 1 seqs each, built with
#     lz4's fast mode (cheap whatever the level), kept in a small LRU keyed
#     by their exact range: at most REPLAY_PIECES entries and ring_bytes / 2
#     bytes (a larger piece is served but not kept).
# So one replay request costs at most two pieces' building (2 * 63 records
# at lz4 fast speed), and repeats of a range cost none. The cache is keyed
# by the replay parameters (one set per node) and is cleared with the ring
# (a skip in the feed, a new epoch). Replayed frames are the cached bytes
# objects themselves: connections queue references, no copies.

cdef enum:
    REPLAY_CHUNK = 64          # seqs per cached replay chunk
    REPLAY_PIECES = 32         # head/tail pieces kept (LRU)

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

    # replay cache (above); dicts made on first replay
    cdef dict _chunks                  # chunk index -> (bytes, frames tuple)
    cdef dict _pieces                  # (first, last) -> (bytes, frames), LRU order
    cdef Py_ssize_t _chunk_bytes
    cdef Py_ssize_t _piece_bytes
    cdef Py_ssize_t _rp_max_frame       # the parameters the cache was built with
    cdef Py_ssize_t _rp_compress_min
    cdef int _rp_level
    cdef readonly unsigned long long replay_builds   # pieces and chunks built
    cdef readonly unsigned long long replay_hits     # served from the cache

    # flush scheduling state, driven by Hub
    cdef public double first_pending   # loop time the oldest pending record came
    # wall-clock seconds from that record's acceptance (its server_ts_ms) to
    # first_pending: the trip to this node (NAN: the record has no ts)
    cdef public double first_transit
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

    # write rounds (rounds.pxd): at most one in flight per room, which keeps
    # each member's frames in order; frames built meanwhile wait in order
    cdef WriteRound _round
    cdef list _waiting                 # (frame, seq, epoch, messages, raw, wire, first_pending, first_transit)
    cdef bint _flush_after_round       # a flush came while the round was out

    cdef int append(self, unsigned long long seq, bytes record) except -1
    cdef bytes take_frame(self, Py_ssize_t compress_min, int level)
    cdef void discard_pending(self) noexcept
    cdef list send_all(self, bytes frame)
    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef void _ring_push(self, unsigned long long seq, bytes record) noexcept
    cdef void _ring_pop(self) noexcept
    cdef void _ring_clear(self) noexcept
    cdef tuple _build_replay(self, unsigned long long first, unsigned long long last,
                             int level)
    cdef tuple _cached_piece(self, unsigned long long first, unsigned long long last)
    cdef void _drop_replays(self) noexcept
