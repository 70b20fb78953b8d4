# The plain TCP kind: wire frames as they are, fanout framing on input.
cdef class TcpConnection(Connection):
    pass
