# The plain TCP kind (see tcp.pxd): the base writes frames from HEADROOM;
# input is wire protocol v1 frames.


cdef class TcpConnection(Connection):
    """A plain TCP client connection: wire protocol v1 frames both ways."""

    cdef Py_ssize_t _parse(self, const char* data, Py_ssize_t n, list out,
                           Py_ssize_t max_frames) except -1:
        return split_frames(data, n, self._max_frame, out, max_frames)

    cdef Py_ssize_t _need(self, const char* data, Py_ssize_t n) except -1:
        return frame_need(data, n, self._max_frame)
