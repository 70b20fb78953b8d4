# The WebSocket kind (RFC 6455; websocket.pyx). Where a browser's connection
# is framed: the node sends each core frame as one binary WebSocket message
# whose header (2, 4 or 10 bytes: FIN|binary, the length) is written once per
# frame into the shared frame's headroom, so every WebSocket member of a room
# gets the same bytes object TCP members get, with nothing copied, encoded or
# masked per recipient (servers never mask).
#
# Input, in C on the loop thread:
#   1. the HTTP request head of the opening handshake, at most
#      MAX_REQUEST_HEAD bytes, handed to the owner as one item
#      (UPGRADE_REQUEST, 0, head) for fanout/server/wsupgrade.py to check;
#      the owner answers with accept_upgrade() or refuse_upgrade();
#   2. then client frames: masked (else BAD_FRAME), unmasked in place in the
#      read buffer; binary messages, fragmented or not, at most the frame
#      limit + HEADER_SIZE bytes in all (checked from the frame header,
#      before any payload is read), each holding whole wire frames, which
#      the TCP rules split and check; text messages are refused
#      (BAD_REQUEST); pings answered with a pong (at most one a second),
#      a close with a close.
#
# The node's last words (close_after with a reason) are followed by a Close
# with code 4000 + reason (1000 without one).

cdef enum WsState:
    WS_HANDSHAKE = 0     # reading the HTTP request head
    WS_UPGRADING = 1     # head handed to the owner; frames may already follow
    WS_OPEN = 2          # 101 sent

cdef class WsConnection(Connection):
    cdef int _ws_state
    cdef char* _msg                   # payload of an open fragmented message
    cdef Py_ssize_t _msg_len
    cdef Py_ssize_t _msg_cap
    cdef bint _in_message             # a fragmented data message is open
    cdef readonly int close_code      # code of the client's Close (0: none yet)
    cdef readonly unsigned long long pings_answered
    cdef double _pong_at              # monotonic time of the last pong

    cdef Py_ssize_t _ws_need(self, const char* data, Py_ssize_t n,
                             Py_ssize_t* payload) except -1
    cdef int _message(self, const char* data, Py_ssize_t n, list out,
                      Py_ssize_t max_frames) except -1
    cdef int _append(self, const char* data, Py_ssize_t n) except -1
    cdef int _control(self, uint8_t opcode, const char* payload, Py_ssize_t n) except -1
    cdef bint _send_raw(self, bytes data) except -1
