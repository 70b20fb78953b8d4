# Write rounds: the loop thread's side of the writer threads (rounds.pxd).

from libc.stdlib cimport calloc

cdef class WriteRound:
    """One frame to a snapshot of a room's members, written by the core's
    writer threads. Made and reconciled by :class:`Hub`; not public."""

    def __cinit__(self, Py_ssize_t capacity):
        self._cap = capacity if capacity > 0 else 1
        self._r.items = <fo_write*>malloc(self._cap * sizeof(fo_write))
        self._conns = <PyObject**>malloc(self._cap * sizeof(PyObject*))
        if self._r.items == NULL or self._conns == NULL:
            free(self._r.items)
            free(self._conns)
            self._r.items = NULL
            self._conns = NULL
            raise MemoryError()
        self._r.n = 0
        self._r.owner = <void*>self

    def __dealloc__(self):
        self.release()
        free(self._r.items)
        free(self._conns)
        free(self._objs)

    cdef int add(self, Connection conn, PyObject* obj, Py_ssize_t start) except -1:
        # conn writes obj[start:] in this round. obj is the round's frame, or
        # a private copy of it that this round must keep alive.
        cdef Py_ssize_t i = <Py_ssize_t>self._r.n
        FANOUT_ASSERT(i < self._cap and not conn._in_round and conn.state == CONN_OPEN)
        if obj != <PyObject*>self.frame:
            if self._objs == NULL:
                self._objs = <PyObject**>calloc(self._cap, sizeof(PyObject*))
                if self._objs == NULL:
                    raise MemoryError()
            Py_INCREF(<object>obj)
            self._objs[i] = obj
        elif self._objs != NULL:
            self._objs[i] = NULL
        self._r.items[i].fd = conn.fd
        self._r.items[i].ssl = conn._ssl
        self._r.items[i].buf = PyBytes_AS_STRING(<object>obj) + start
        self._r.items[i].len = <size_t>(PyBytes_GET_SIZE(<object>obj) - start)
        self._r.items[i].result = 0
        Py_INCREF(conn)
        self._conns[i] = <PyObject*>conn
        conn._in_round = True
        self._r.n += 1
        return 0

    cdef void release(self) noexcept:
        # Drop the round's references (after reconciling, or abandoning it).
        cdef Py_ssize_t i, n = <Py_ssize_t>self._r.n
        cdef PyObject* conn
        self._r.n = 0
        for i in range(n):
            if self._objs != NULL and self._objs[i] != NULL:
                Py_DECREF(<object>self._objs[i])
                self._objs[i] = NULL
            conn = self._conns[i]
            self._conns[i] = NULL
            (<Connection>conn)._in_round = False
            (<Connection>conn)._close_deferred()
            (<Connection>conn)._resume_deferred()
            Py_DECREF(<object>conn)
