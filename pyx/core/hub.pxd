# The node's broadcast engine: every room on this node and when each flushes.
#
# Flush policy (adaptive), a token bucket of flushes per room: rate
# 1/max_delay, burst FLUSH_BURST.
#   * quiet room (a token left): flushed at the end of the current loop
#     iteration; all such rooms share one call_soon;
#   * hot room (out of tokens): flushed when its next token is due, so a busy
#     room costs at most 1/max_delay frames per member per second;
#   * a batch that reaches max_batch_bytes flushes at once.
# A room at a few messages per second therefore never waits, while one at
# thousands per second batches max_delay worth of messages per frame.

cdef enum:
    FLUSH_BURST = 3
    LATENCY_BOUNDS_MAX = 32
# Where a frame goes (_deliver): a room below thread_min_members is written
# on the loop thread at once; a larger one becomes a write round for the
# writer threads (rounds.pxd), and the loop goes on. A flush due while the
# room's round is out waits for it (the batch grows meanwhile); a batch that
# fills up meanwhile is built and waits in the room's queue, in order.
#
# Connections that a flush finds slow or dead are handed to their owner's
# connection_failed(reason) after the write loop, never during it.
#
# Fault isolation: one room's flush and one connection's callback cannot
# stop the others. A flush (or its observer) that raises is reported and the
# next room still flushes; an owner callback that raises costs that one
# connection, closed with Error(INTERNAL_ERROR). Either way the exception
# goes to error_handler(where, exc) (where: the Room or the Connection), or
# to the loop's exception handler when none is set. Hub.publish therefore
# returns normally once its record is taken, even if a flush it triggers
# goes wrong.

cdef class Hub:
    cdef object _loop
    cdef readonly dict rooms
    cdef public double max_delay      # the node widens it under overload
    cdef readonly Py_ssize_t max_batch_bytes
    cdef readonly Py_ssize_t compress_min
    cdef readonly int compress_level
    cdef readonly Py_ssize_t ring_size
    cdef readonly Py_ssize_t ring_bytes
    cdef list _soon                   # quiet rooms due at end of iteration
    cdef bint _soon_scheduled
    cdef readonly unsigned long long flushes
    cdef readonly double flush_seconds  # CLOCK_MONOTONIC time spent in flushes (overload.py)
    # how long delivered messages waited, from their batch's first record to
    # its delivery, summed per message (overload.py: the writers keeping up)
    cdef readonly double delay_seconds
    cdef readonly unsigned long long delayed_messages
    cdef public object flush_observer # f(messages, members, raw, wire, delay) or None
    # end-to-end delivery latency (track_latency): seconds from a frame's
    # oldest message's acceptance to the frame handed to every member, one
    # count per frame, in C; _lat_n bounds (0: not tracked), counts per
    # bucket, the last one +Inf
    cdef double _lat_bounds[LATENCY_BOUNDS_MAX]
    cdef unsigned long long _lat_counts[LATENCY_BOUNDS_MAX + 1]
    cdef int _lat_n
    cdef readonly double latency_sum
    cdef public object error_handler  # f(room_or_connection, exc) or None

    # writer threads (rounds.pxd): a room of at least thread_min_members is
    # written by them; smaller rooms, and every room when write_threads is 0,
    # on the loop thread
    cdef fo_pool* _pool
    cdef readonly int write_threads
    cdef readonly Py_ssize_t thread_min_members
    cdef readonly Py_ssize_t rounds_in_flight
    cdef readonly unsigned long long rounds       # write rounds reconciled
    cdef readonly Py_ssize_t waiting_bytes        # frames built, waiting for their room's round

    cpdef Room room(self, str name, str epoch, unsigned long long head_seq)
    cdef void _schedule(self, Room room) except *
    cdef void _flush(self, Room room, bint now=*) except *
    cdef void _deliver(self, Room room, bytes frame, unsigned long long seq,
                       Py_ssize_t messages, Py_ssize_t raw, Py_ssize_t wire,
                       double first_pending, double first_transit) except *
    cdef void _start_round(self, Room room, bytes frame, Py_ssize_t messages,
                           Py_ssize_t raw, Py_ssize_t wire, double first_pending,
                           double first_transit) except *
    cdef void _reconcile(self) except *
    cdef void _finish_round(self, WriteRound rnd) except *
    cdef void _delivered(self, Room room, Py_ssize_t messages, Py_ssize_t reached,
                         Py_ssize_t raw, Py_ssize_t wire, double first_pending,
                         double first_transit) except *
    cdef void _report_all(self, list troubled) except *
    cdef void _flush_isolated(self, Room room, bint now=*) except *
    cdef void _fault(self, object where, object exc) except *
