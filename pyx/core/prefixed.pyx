# The transport seam's second kind (see prefixed.pxd): every frame goes out
# behind a fixed header, written once per frame into its headroom and shared
# by every PrefixConnection with the same prefix.

cdef class PrefixConnection(TcpConnection):
    """A connection that writes ``prefix`` (1-14 bytes) before every frame."""

    def __init__(self, int fd, loop, *, bytes prefix, **limits):
        if not 0 < len(prefix) <= MAX_PREFIX:
            raise ValueError(f"prefix must be 1-{MAX_PREFIX} bytes")
        super().__init__(fd, loop, **limits)
        self._prefix = prefix
        self._prefix_tag = prefix_tag(("prefix", prefix))

    @property
    def prefix(self):
        return self._prefix

    cdef Py_ssize_t _write_prefix(self, char* end, Py_ssize_t wire_len) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(self._prefix)
        memcpy(end - n, PyBytes_AS_STRING(self._prefix), n)
        return n
