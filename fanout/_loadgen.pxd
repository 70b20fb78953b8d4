# fanout._loadgen: the load generator's viewer engine (sources in pyx/loadgen/,
# driven by the viewer worker processes of fanout/load/). This file is the
# module's C-level API: the Viewers object, the structs it keeps per viewer
# and per room, and how data flows through the pieces. C helpers come from
# pyx/loadgen/lgsupport.pxd, wire constants and helpers from
# pyx/includes/wireformat.pxd, socket externs from pyx/includes/system.pxd.
#
# One Viewers object holds N viewer connections of one process, on raw
# non-blocking sockets and one epoll set; no Python object per connection
# and no Python call per frame (except one lz4 inflate per frame of a
# sampled viewer).
#
# Data flow of one poll() (everything below it is C-level):
#
#   Viewers.poll(): epoll_wait, then per ready socket            [viewers.pyx]
#     connect done / writable -> _on_connected, _flush_out     [lifecycle.pyx]
#       (TLS viewers: the handshake first, _tls_step           [tlsviewer.pyx];
#        every read and write goes through _io_recv / _io_send)
#     readable -> _on_readable: recv() into the shared scratch    [reader.pyx]
#       _feed: headers checked, whole frames handled in place, an
#              incomplete tail kept in the viewer's carry buffer
#       (WebSocket viewers: _ws_feed first reads the upgrade's answer, then
#              takes whole messages in place, each exactly one wire frame
#              handed to _frame, a partial one carried      [wsviewer.pyx])
#       _frame: counted by type, then
#         Batch -> _batch: the viewer's rolling hash              [verify.pyx]
#           a decoded viewer's Batch, or any viewer's first: inflate, _walk
#           (seq checks; latency -> _record_latency        [latency.pyx]);
#           a decoded viewer's frame extends its room's reference
#         AuthOk, Ack, Kick, Error -> _on_reply: send the Join, go live,
#           note why the node is closing                      [lifecycle.pyx]
#       EOF -> _on_eof, socket error -> _socket_failed: retry or end
#     then the timers: _connect_more (the connect window) and _sweep
#       (pings, retries, connect timeouts)                    [lifecycle.pyx]
#
#   Between polls the worker process asks for results         [viewers.pyx]:
#   stats() (deliveries: each viewer resolved against its room's reference,
#   verify.pyx), verify(), viewer(), ends(), room_members() and the latency
#   histogram (latency.pyx).
#
# Cython cannot spread one class body over files, so the C-level work on a
# Viewers object is done by module functions that take it as `self`, one
# file per job; viewers.pyx keeps construction, the loop and the Python API.
#
# What is checked, and how ("for every viewer" at ~constant cost):
#   * Every frame: header validated (version, flags, reserved, length <=
#     16 MiB), counted by type, wire bytes counted (frame bytes as read from
#     the socket; TCP/IP headers are not included).
#   * Kick/Error: the reason varint is decoded; Kick(SLOW_CONSUMER) counts
#     as a slow-consumer cut.
#   * Decoded viewers (local index % decode_every == 0, plus the first viewer
#     of each room in this process): each Batch is inflated (lz4) and every
#     RoomMessage walked. Per room, seq must be last+1 starting from the join
#     Ack's seq: seq > last+1 counts one gap (and seq-last-1 missing
#     messages), seq <= last counts one reorder (a duplicate or a message out
#     of order). For every `latency_every`-th message, the first 8 payload
#     bytes are the publisher's CLOCK_REALTIME in ns (little-endian); the
#     receive time minus that goes into a log-linear histogram (64 sub-buckets
#     per power of two: under 1.6 % error).
#   * Every viewer: the node writes one frame object to all members of a
#     room, so all members get byte-identical Batch frames in the same order.
#     Each viewer keeps a polynomial rolling hash of its Batch frames,
#     chain = chain * P + h(frame) (mod 2^64, h a 64-bit hash of the whole
#     frame), and a count. Decoded viewers build, per room, the reference:
#     per frame index k its hash, its first/last seq, the prefix chain G[k]
#     and the prefix message count C[k] (a second decoded viewer of the room
#     checks the hash of every frame it shares with the reference). A viewer
#     is aligned to the reference by the first seq of its first Batch frame
#     (that first frame is inflated once for every viewer, which also checks
#     every viewer's join point: first seq == Ack.seq + 1). A viewer that
#     starts at frame k0 and has n frames must then have
#     chain == G[k0+n] - G[k0] * P^n; anything missing, extra, altered or
#     reordered breaks the equality and counts as a divergence. A cut viewer
#     passes if what it got is an exact prefix. Its deliveries are
#     C[k0+n] - C[k0].
#   Viewers the reference cannot cover (started before it, or got more
#   frames than it) are reported as unverified, never as passed.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t

from lgsupport cimport lg_addr_t

cdef enum:
    # Per-reason counter slots: more than REASON_LIMIT, so codes a newer node
    # may send are still told apart; the last slot takes anything larger.
    # NREASONS - 1 is also a viewer's end code for a Kick without a reason
    # (its kick_reason 0 means "no Kick seen").
    NREASONS = 64

# viewer states
cdef enum:
    ST_NEW = 0
    ST_CONNECTING = 1      # connect() in progress (EPOLLOUT armed)
    ST_AUTH = 2            # Hello sent, waiting for AuthOk
    ST_JOINING = 3         # Join sent, waiting for Ack
    ST_LIVE = 4
    ST_RETRY = 5           # refused before joining; reconnects at its deadline
    ST_DONE = 6            # closed for good (see end)
    ST_UPGRADE = 7         # WebSocket: upgrade request sent, reading the response head
    ST_TLS = 8             # TLS: the client handshake in progress

# transports (Viewers.transport): what sits between the socket and the wire
# frames. TLS is a session per viewer (OpenSSL, tlsviewer.pyx) under the
# same byte streams: every read and write goes through _io_recv/_io_send.
cdef enum:
    T_TCP = 0              # wire frames straight on the socket
    T_WS = 1               # RFC 6455: an HTTP upgrade, then one wire frame per message
    T_TLS = 2              # TLS, then wire frames as over TCP
    T_WSS = 3              # TLS, then WebSocket

# why a viewer ended
cdef enum:
    END_NONE = 0
    END_KICK = 1           # Kick{reason}
    END_ERROR = 2          # a closing Error{reason}
    END_EOF = 3            # the node closed without saying why
    END_SOCKET = 4         # socket error (errno in end_code)
    END_PROTOCOL = 5       # a frame broke the framing rules
    END_CONNECT = 6        # connect() failed for good (errno in end_code)
    END_TIMEOUT = 7        # no join Ack within connect_timeout
    END_JOIN = 8           # the Join was refused (Error reason in end_code)
    END_CLOSED = 9         # closed by us (close())
    END_UPGRADE = 10       # WebSocket upgrade refused (HTTP status in end_code)
    END_TLS = 11           # the TLS handshake failed for good (a bad certificate, ...)


ctypedef struct Viewer:
    int fd
    uint8_t state
    uint8_t decoded
    uint8_t paused
    uint8_t end
    uint16_t end_code
    uint16_t attempts
    int32_t room
    uint32_t ping_ms
    uint8_t was_live           # got its join Ack at some point
    uint8_t queued             # on the list of viewers to read at the next round
    uint8_t hup                # the peer closed or the socket failed: read to the end
    uint8_t kick_reason        # Kick/closing Error seen, before the EOF
    uint8_t error_reason
    char* carry                # incomplete frame: carry_len of carry_need bytes
    uint32_t carry_len
    uint32_t carry_need        # whole frame size once its header is in; 0 before
    const char* out            # unsent bytes of the current request
    uint32_t out_len
    uint64_t ack_seq
    uint64_t last_seq          # decoded viewers: last seq seen
    uint64_t first_seq         # first seq of the first Batch (0: none yet)
    uint64_t first_msgs
    int64_t k0                 # reference frame index of its first Batch; -1 unknown, -2 none
    uint64_t bframes
    uint64_t chain
    uint64_t msgs              # decoded viewers: messages delivered
    uint64_t frames
    uint64_t rbytes
    uint64_t deadline          # mono ns: connect timeout, retry time, or next ping
    uint64_t nonce
    uint32_t ws_mask           # WebSocket: the mask key of this viewer's Pings
    uint16_t ws_close          # WebSocket: the code of the node's Close (0: none yet)
    char ping[32]              # a Ping frame (WebSocket: in its masked message)
    void* ssl                  # TLS: its SSL*, NULL otherwise
    uint8_t tls_want_write     # TLS: the handshake waits for the socket to be writable


ctypedef struct RoomRef:
    uint64_t* fhash            # per frame
    uint64_t* first            # first seq per frame
    uint64_t* last             # last seq per frame
    uint64_t* chain            # G[k]: chain of frames 0..k-1 (known + 1 entries)
    uint64_t* cum              # C[k]: messages in frames 0..k-1 (known + 1 entries)
    Py_ssize_t known
    Py_ssize_t cap
    uint64_t mismatches        # frames a second decoded viewer saw differently
    const char* name
    Py_ssize_t name_len


cdef class Viewers:
    cdef Viewer* v
    cdef readonly Py_ssize_t n
    cdef RoomRef* refs
    cdef readonly Py_ssize_t nrooms
    cdef int ep
    cdef lg_addr_t dst
    cdef lg_addr_t* srcs
    cdef Py_ssize_t nsrcs
    cdef int rcvbuf
    cdef readonly int transport        # T_TCP, T_WS, T_TLS, T_WSS
    cdef bint ws                       # WebSocket framing (T_WS, T_WSS)
    cdef bint tls                      # a TLS session per viewer (T_TLS, T_WSS)
    cdef void* ssl_ctx                 # TLS: the SSL_CTX every viewer's session comes from
    cdef bytes _server_name            # TLS: SNI and the name checked (b"": none)
    cdef bint tls_verify               # TLS: the node's certificate is checked (a CA was given)
    cdef dict tls_errors               # TLS: why handshakes failed -> count
    cdef bytes _upgrade                # WebSocket: the upgrade request, the same for all
    cdef bytes _accept                 # ... and the Sec-WebSocket-Accept line it must get
    cdef list _hellos                  # keep the frames alive: viewers point into them
    cdef list _joins
    cdef list _names
    cdef Py_ssize_t connect_window
    cdef Py_ssize_t next_connect
    cdef Py_ssize_t in_flight          # between connect() and join Ack (or failure)
    cdef bint started
    cdef uint64_t connect_timeout_ns
    cdef uint32_t max_retries
    cdef uint64_t next_sweep
    cdef uint64_t read_interval_ns
    cdef uint64_t next_round
    cdef uint32_t* dirty               # viewers with unread data, read at the next round
    cdef Py_ssize_t ndirty
    cdef uint64_t latency_every
    cdef uint64_t lat_tick
    cdef public bint recording         # latency samples are taken while True
    cdef uint64_t* hist
    cdef uint64_t rng

    # counters
    cdef uint64_t connects_started, connected, authed, joined, join_failed
    cdef uint64_t connect_failed, retries, live, done
    cdef uint64_t frames, wire_bytes, batch_frames, batch_bytes, decoded_frames
    cdef uint64_t decoded_msgs, pongs, pings_sent, presence, acks, auth_oks, other_frames
    cdef uint64_t gaps, missing, reorders, foreign, node_gaps, sampled_batches
    cdef uint64_t join_point_gaps, bad_bodies, protocol_errors, eofs, socket_errors
    cdef uint64_t lat_count, lat_negative, lat_sum_ns, lat_max_ns
    cdef uint64_t first_connect_ns, last_connected_ns, last_join_ns
    cdef uint64_t ws_closes, ws_pongs, ws_pings, upgrades, upgrade_refused
    cdef uint64_t tls_handshakes, tls_failures
    cdef uint64_t kicks[NREASONS]
    cdef uint64_t errors[NREASONS]
    cdef dict errnos                   # connect/socket errno -> count
