# A kind that writes a fixed header before every frame: the transport seam's
# second kind, used by tests to show a prefixed kind shares frames the way a
# WebSocket kind will (the header written once per frame, in its headroom).
# Its input is plain wire frames, as TCP's.
cdef class PrefixConnection(TcpConnection):
    cdef bytes _prefix
