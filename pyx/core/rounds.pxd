# Where a large room's frame is written off the event loop: a write round.
#
# Data flow (the loop thread is the one running Python; hub.pyx drives it):
#
#   Hub._start_round(room, frame)                      [loop thread]
#     snapshot the room's members: every open member with an empty backlog
#     becomes an item (fd, SSL* or NULL, the frame's bytes for its kind,
#     length), and the
#     round takes a reference to it; a member with a backlog (or in another
#     round) gets the frame queued behind it instead, as before.
#     fo_pool_submit(round)
#   writer threads (writers.h, no GIL)                 [writer threads]
#     send() (SSL_write for TLS) once per item, the result (bytes taken or -errno) in the item
#     the last chunk's thread puts the round on the done list, wakes the loop
#   Hub._reconcile()                                   [loop thread]
#     Connection._after_round(): counters; a short write or EAGAIN puts the
#     rest at the FRONT of the backlog (ahead of frames queued meanwhile),
#     arms the writer; past the backlog bound -> SEND_SLOW; errors -> DEAD;
#     the owner hears of slow and dead members after the loop (_report_all)
#     then the room's next frame (or its deferred flush) goes out
#
# The rules that make it safe:
#   * one writer per socket: a member is in at most one round, and while it
#     is (Connection._in_round) nothing else writes to its socket: frames
#     for it are queued, its backlog is not drained, its writer not armed;
#     a TLS member is not read either (one thread per SSL object), and one
#     still in its handshake gets the frame queued, not an item;
#   * order per connection: a room has at most one round in flight; what a
#     member receives meanwhile is queued behind the round's frame;
#   * fd lifetime: the round holds a reference to every member, and a member
#     closed during the round keeps its descriptor open (Connection.
#     _deferred_fd) until the round is reconciled, so the number cannot be
#     reused by a new socket while a thread may still write to it;
#   * buffers: the round holds the frame (and any private copy a prefixed
#     member writes); a frame's headroom is written before the round starts
#     and never again.

cdef extern from "writers.h" nogil:
    ctypedef struct fo_write:
        int fd
        SSL* ssl
        const char* buf
        size_t len
        ssize_t result
    ctypedef struct fo_round:
        fo_write* items
        size_t n
        fo_round* next
        void* owner
    ctypedef struct fo_pool:
        pass
    fo_pool* fo_pool_start(int nthreads)
    int fo_pool_fd(fo_pool* p)
    void fo_pool_submit(fo_pool* p, fo_round* r)
    fo_round* fo_pool_take_done(fo_pool* p)
    void fo_pool_wait(fo_pool* p)
    void fo_pool_stop(fo_pool* p)


cdef class WriteRound:
    cdef fo_round _r                  # what the writer threads see
    cdef PyObject** _conns            # members in the round, a reference each
    cdef PyObject** _objs             # a prefixed member's private copy, or NULL
    cdef Py_ssize_t _cap
    cdef object room                  # the Room (typed in hub.pyx)
    cdef bytes frame
    cdef Py_ssize_t messages          # records in the frame (0: a control frame)
    cdef Py_ssize_t raw               # batch body bytes before lz4
    cdef Py_ssize_t wire              # frame bytes as built
    cdef double first_pending         # loop time its oldest record came
    cdef double first_transit         # that record's trip to this node (Room.first_transit)
    cdef Py_ssize_t queued            # members that got it queued at the snapshot

    cdef int add(self, Connection conn, PyObject* obj, Py_ssize_t start) except -1
    cdef void release(self) noexcept
