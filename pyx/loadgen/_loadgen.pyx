# cython: language_level=3
# fanout._loadgen: the load generator's viewer engine (driven by fanout/load.py).
#
# One Viewers object holds N viewer connections of one process, on raw
# non-blocking sockets and one level-triggered epoll set; no Python object
# per connection and no Python call per frame (except one lz4 inflate per
# frame of a sampled viewer).
#
# Life of a viewer, exactly like a real client (docs/protocol.md, 5.1-5.3):
#   connect (non-blocking; EINPROGRESS finishes on EPOLLOUT), at most
#   `connect_window` viewers between connect() and their join Ack, so the
#   node's listen backlog is not overrun
#   -> Hello (pre-built frame, one token per viewer, from Python)
#   <- AuthOk (ping_interval_ms)   -> Join{req_id 1, room}   <- Ack{seq}
#   then only reads, and sends Ping every ping_interval_ms.
#   Refused before the Ack (connection refused/reset, CONNECTION_RATE_LIMITED,
#   CONNECTION_LIMIT, AUTH_TIMEOUT, connect timeout): retried with the
#   protocol's backoff (full jitter over min(10 s, 0.2 s * 2^n)), at most
#   `max_retries` times. Nothing else is answered and nothing is reconnected
#   once joined: a cut viewer stays cut.
#
# Reading: epoll is edge-triggered; a readable socket is drained into one
# shared scratch buffer and frames are handled in place. Only the incomplete
# tail of a frame is copied into a per-viewer carry buffer, sized to that one
# frame and freed once the frame is complete, so an idle viewer holds ~200
# bytes (its struct) and no buffer. With `read_interval` > 0, viewers that
# are not decoded are read in rounds that far apart, so one recv() can take
# several frames (decoded viewers are always read at once: they time the
# latency). On loopback most of a reader's cost is the kernel's, per frame
# (the data segment and the ACK it causes), so the default is 0.
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

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_READ
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.stdlib cimport calloc, realloc, free
from libc.string cimport memcpy, memcmp, memset
from libc.errno cimport errno, EAGAIN, EINTR

import lz4.block as _lz4_block

_lz4_decompress = _lz4_block.decompress

from system cimport (
    c_close, c_recv, c_send, MSG_DONTWAIT, MSG_NOSIGNAL,
    epoll_event, epoll_create1, epoll_ctl, epoll_wait,
    EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLET, EPOLLRDHUP,
    EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CLOEXEC,
)
from wireformat cimport (
    HEADER_SIZE, FLAG_LZ4, MAX_SERVER_FRAME,
    FT_PING, FT_AUTH_OK, FT_ERROR, FT_BATCH, FT_KICK, FT_PONG, FT_GAP, FT_ACK, FT_PRESENCE,
    R_AUTH_TIMEOUT, R_SLOW_CONSUMER, R_CONNECTION_LIMIT, R_CONNECTION_RATE_LIMITED,
    check_header, lz4_stored_size, get_varint, skip_field, put_varint, write_header,
)

# Sockets, clocks, hashing and the histogram index: small C helpers.
cdef extern from *:
    """
    #include <sys/socket.h>
    #include <netinet/in.h>
    #include <netinet/tcp.h>
    #include <arpa/inet.h>
    #include <string.h>
    #include <errno.h>
    #include <time.h>
    #include <unistd.h>
    #ifndef IP_BIND_ADDRESS_NO_PORT
    #define IP_BIND_ADDRESS_NO_PORT 24
    #endif

    typedef struct { struct sockaddr_storage ss; socklen_t len; } lg_addr_t;

    /* Numeric IPv4/IPv6 host -> address; 0 on success. */
    static int lg_addr(const char* host, int port, lg_addr_t* out) {
        struct sockaddr_in* a4 = (struct sockaddr_in*)&out->ss;
        struct sockaddr_in6* a6 = (struct sockaddr_in6*)&out->ss;
        memset(out, 0, sizeof(*out));
        if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
            a4->sin_family = AF_INET;
            a4->sin_port = htons((unsigned short)port);
            out->len = sizeof(*a4);
            return 0;
        }
        if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
            a6->sin6_family = AF_INET6;
            a6->sin6_port = htons((unsigned short)port);
            out->len = sizeof(*a6);
            return 0;
        }
        return -1;
    }

    /* A non-blocking TCP connect. Returns the fd (connected, or *pending = 1
       while in progress) or -errno. `src` (may be NULL) is bound first, with
       IP_BIND_ADDRESS_NO_PORT so the port is picked per destination. */
    static int lg_connect(const lg_addr_t* dst, const lg_addr_t* src, int rcvbuf,
                          int* pending) {
        int one = 1, e;
        int fd = socket(dst->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) return -errno;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
        if (src != NULL && src->len) {
            if (src->ss.ss_family == AF_INET)
                setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
            if (bind(fd, (const struct sockaddr*)&src->ss, src->len) < 0) {
                e = errno; close(fd); return -e;
            }
        }
        if (connect(fd, (const struct sockaddr*)&dst->ss, dst->len) < 0) {
            if (errno == EINPROGRESS) { *pending = 1; return fd; }
            e = errno; close(fd); return -e;
        }
        *pending = 0;
        return fd;
    }

    static int lg_sock_error(int fd) {
        int err = 0; socklen_t len = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return errno;
        return err;
    }

    static inline uint64_t lg_mono_ns(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    }
    static inline uint64_t lg_real_ns(void) {
        struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    }

    /* 64-bit hash of a frame: two multiply-rotate lanes over 8-byte words,
       then a murmur3 finalizer. Not cryptographic; it has to catch accidents. */
    static inline uint64_t lg_rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
    static uint64_t lg_hash(const unsigned char* p, size_t n) {
        uint64_t h1 = 0x9E3779B97F4A7C15ull ^ ((uint64_t)n * 0xC2B2AE3D27D4EB4Full);
        uint64_t h2 = 0x165667B19E3779F9ull;
        uint64_t a, b;
        size_t left = n;
        while (left >= 16) {
            memcpy(&a, p, 8); memcpy(&b, p + 8, 8);
            h1 = lg_rotl((h1 ^ a) * 0x9FB21C651E98DF25ull, 29);
            h2 = lg_rotl((h2 ^ b) * 0xD6E8FEB86659FD93ull, 31);
            p += 16; left -= 16;
        }
        if (left >= 8) {
            memcpy(&a, p, 8);
            h1 = lg_rotl((h1 ^ a) * 0x9FB21C651E98DF25ull, 29);
            p += 8; left -= 8;
        }
        if (left) {
            b = 0; memcpy(&b, p, left);
            h2 = lg_rotl((h2 ^ b ^ ((uint64_t)left << 56)) * 0xD6E8FEB86659FD93ull, 31);
        }
        h1 ^= lg_rotl(h2, 17);
        h1 ^= h1 >> 33; h1 *= 0xFF51AFD7ED558CCDull;
        h1 ^= h1 >> 33; h1 *= 0xC4CEB9FE1A85EC53ull;
        h1 ^= h1 >> 33;
        return h1;
    }

    /* Log-linear histogram: values < 128 exact, then 64 buckets per power of two. */
    #define LG_HIST_BUCKETS 3776
    static inline int lg_hist_index(uint64_t v) {
        int msb, shift;
        if (v < 128) return (int)v;
        msb = 63 - __builtin_clzll(v);
        shift = msb - 6;
        return 128 + (shift - 1) * 64 + (int)((v >> shift) - 64);
    }
    /* The middle of a bucket's range. */
    static inline uint64_t lg_hist_value(int i) {
        int shift;
        uint64_t lo;
        if (i < 128) return (uint64_t)i;
        shift = (i - 128) / 64 + 1;
        lo = (uint64_t)(64 + (i - 128) % 64) << shift;
        return lo + ((1ull << shift) >> 1);
    }
    """
    ctypedef struct lg_addr_t:
        pass
    int lg_addr(const char* host, int port, lg_addr_t* out) nogil
    int lg_connect(const lg_addr_t* dst, const lg_addr_t* src, int rcvbuf, int* pending) nogil
    int lg_sock_error(int fd) nogil
    uint64_t lg_mono_ns() nogil
    uint64_t lg_real_ns() nogil
    uint64_t lg_hash(const unsigned char* p, size_t n) nogil
    int lg_hist_index(uint64_t v) nogil
    uint64_t lg_hist_value(int i) nogil
    enum: LG_HIST_BUCKETS


cdef enum:
    SCRATCH = 256 * 1024
    MAX_EVENTS = 1024
    MAX_READS = 8                      # reads per readiness, for fairness
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
    ST_RETRY = 5           # refused before joining; reconnects at retry_at
    ST_DONE = 6            # closed for good (see end)

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

_END_NAMES = {END_KICK: "kick", END_ERROR: "error", END_EOF: "eof", END_SOCKET: "socket",
              END_PROTOCOL: "protocol", END_CONNECT: "connect", END_TIMEOUT: "timeout",
              END_JOIN: "join", END_CLOSED: "closed"}

# the rolling-hash multiplier (odd, so multiplication is invertible mod 2^64)
cdef uint64_t P = 0x5851F42D4C957F2D

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
    char ping[24]


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


cdef char _scratch[SCRATCH]


cdef int _uint_field(const uint8_t* p, const uint8_t* end, uint64_t field,
                     uint64_t* out) noexcept nogil:
    """The varint field `field` of a message body (0 when absent); -1 when malformed."""
    cdef uint64_t tag, v
    out[0] = 0
    while p < end:
        p = get_varint(p, end, &tag)
        if p == NULL:
            return -1
        if tag == (field << 3):
            p = get_varint(p, end, &v)
            if p == NULL:
                return -1
            out[0] = v
        else:
            p = skip_field(p, end, tag)
            if p == NULL:
                return -1
    return 0


cdef uint64_t _pow(uint64_t base, uint64_t n) noexcept nogil:
    cdef uint64_t r = 1
    while n:
        if n & 1:
            r *= base
        base *= base
        n >>= 1
    return r


def bucket_value(int index):
    """Representative value (the middle) of latency histogram bucket ``index``."""
    if index < 0 or index >= LG_HIST_BUCKETS:
        raise IndexError(index)
    return lg_hist_value(index)


def bucket_index(unsigned long long value):
    """Histogram bucket of ``value`` (nanoseconds)."""
    return lg_hist_index(value)


HIST_BUCKETS = LG_HIST_BUCKETS


cdef class Viewers:
    """N viewer connections driven by one epoll loop (see the module header).

    :param host: numeric IPv4 or IPv6 address of the node.
    :param port: its client port.
    :param hellos: one complete Hello frame (bytes) per viewer.
    :param rooms: the room index of each viewer.
    :param joins: one complete Join frame per room index.
    :param room_names: the room name (str) per room index.
    :param decode_every: viewers with ``index % decode_every == 0`` (and the
        first viewer of each room) inflate and walk every Batch.
    :param connect_window: most viewers between ``connect()`` and their join Ack.
    :param source_addrs: numeric addresses to bind, round-robin per viewer
        (spreads the node's per-address connection limits and the ephemeral
        ports); empty: the kernel picks.
    :param rcvbuf: SO_RCVBUF per socket, 0 for the default.
    :param latency_every: record the latency of every n-th decoded message.
    :param max_retries: reconnects of a viewer refused before its join Ack.
    :param connect_timeout: seconds from connect() to the join Ack.
    :param read_interval: seconds between read rounds of viewers that are not
        decoded; 0 reads every viewer as soon as data arrives.
    """

    cdef Viewer* v
    cdef readonly Py_ssize_t n
    cdef RoomRef* refs
    cdef readonly Py_ssize_t nrooms
    cdef int ep
    cdef lg_addr_t dst
    cdef lg_addr_t* srcs
    cdef Py_ssize_t nsrcs
    cdef int rcvbuf
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
    cdef uint64_t kicks[NREASONS]
    cdef uint64_t errors[NREASONS]
    cdef dict errnos                   # connect/socket errno -> count

    def __cinit__(self, str host, int port, list hellos, list rooms, list joins,
                  list room_names, *, int decode_every=50, int connect_window=256,
                  source_addrs=(), int rcvbuf=0, int latency_every=1,
                  int max_retries=8, double connect_timeout=10.0,
                  double read_interval=0.0):
        cdef Py_ssize_t i, r
        cdef bytes b
        self.ep = -1
        n = len(hellos)
        if len(rooms) != n:
            raise ValueError("one room index per viewer")
        if len(joins) != len(room_names) or not joins:
            raise ValueError("one Join frame per room name, at least one room")
        if decode_every < 1 or connect_window < 1 or latency_every < 1:
            raise ValueError("decode_every, connect_window and latency_every must be >= 1")
        if lg_addr(host.encode(), port, &self.dst) != 0:
            raise ValueError(f"host must be a numeric IPv4/IPv6 address, got {host!r}")
        self._hellos = [bytes(h) for h in hellos]
        self._joins = [bytes(j) for j in joins]
        self._names = [s.encode("utf-8") for s in room_names]
        self.nrooms = len(joins)
        self.n = n
        self.v = <Viewer*>calloc(n if n else 1, sizeof(Viewer))
        self.refs = <RoomRef*>calloc(self.nrooms, sizeof(RoomRef))
        self.hist = <uint64_t*>calloc(LG_HIST_BUCKETS, sizeof(uint64_t))
        self.dirty = <uint32_t*>calloc(n if n else 1, sizeof(uint32_t))
        src_list = [s for s in source_addrs]
        self.nsrcs = len(src_list)
        self.srcs = <lg_addr_t*>calloc(self.nsrcs if self.nsrcs else 1, sizeof(lg_addr_t))
        if (self.v == NULL or self.refs == NULL or self.hist == NULL or self.srcs == NULL
                or self.dirty == NULL):
            raise MemoryError()
        for i in range(self.nsrcs):
            if lg_addr(str(src_list[i]).encode(), 0, &self.srcs[i]) != 0:
                raise ValueError(f"source address must be numeric, got {src_list[i]!r}")
        for r in range(self.nrooms):
            b = self._names[r]
            self.refs[r].name = PyBytes_AS_STRING(b)
            self.refs[r].name_len = PyBytes_GET_SIZE(b)
        seen = set()
        for i in range(n):
            r = rooms[i]
            if r < 0 or r >= self.nrooms:
                raise ValueError(f"viewer {i}: room index {r} out of range")
            self.v[i].fd = -1
            self.v[i].room = <int32_t>r
            self.v[i].k0 = -1
            self.v[i].decoded = (i % decode_every == 0) or (r not in seen)
            seen.add(r)
        self.rcvbuf = rcvbuf
        self.connect_window = connect_window
        self.latency_every = latency_every
        self.max_retries = max_retries
        self.connect_timeout_ns = <uint64_t>(connect_timeout * 1e9)
        if read_interval < 0:
            raise ValueError("read_interval must be >= 0")
        self.read_interval_ns = <uint64_t>(read_interval * 1e9)
        self.recording = True
        self.errnos = {}
        self.rng = 0x4D595DF4D0F33173 ^ <uint64_t>n
        self.ep = epoll_create1(EPOLL_CLOEXEC)
        if self.ep < 0:
            raise OSError(errno, "epoll_create1 failed")

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.v != NULL:
            for i in range(self.n):
                if self.v[i].fd >= 0:
                    c_close(self.v[i].fd)
                free(self.v[i].carry)
            free(self.v)
        if self.refs != NULL:
            for i in range(self.nrooms):
                self._free_ref(&self.refs[i])
            free(self.refs)
        free(self.hist)
        free(self.srcs)
        free(self.dirty)
        if self.ep >= 0:
            c_close(self.ep)

    cdef void _free_ref(self, RoomRef* ref) noexcept:
        free(ref.fhash)
        free(ref.first)
        free(ref.last)
        free(ref.chain)
        free(ref.cum)

    # ------------------------------------------------------------ driving

    def start(self):
        """Begin connecting (in windows of ``connect_window``)."""
        if not self.started:
            self.started = True
            self.first_connect_ns = lg_mono_ns()
            self._connect_more(self.first_connect_ns)

    def poll(self, int timeout_ms=0):
        """One epoll round (waits up to ``timeout_ms``), then timers. Returns
        the number of socket events handled."""
        cdef epoll_event evs[MAX_EVENTS]
        cdef int k, nev
        cdef uint32_t e
        cdef Viewer* v
        cdef uint64_t now
        if self.ndirty:
            now = lg_mono_ns()
            if now >= self.next_round:
                timeout_ms = 0
            elif <uint64_t>timeout_ms * 1000000 > self.next_round - now:
                timeout_ms = <int>((self.next_round - now) // 1000000)
        nev = epoll_wait(self.ep, evs, MAX_EVENTS, timeout_ms)
        if nev < 0:
            if errno == EINTR:
                nev = 0
            else:
                raise OSError(errno, "epoll_wait failed")
        for k in range(nev):
            v = &self.v[evs[k].data.u64]
            e = evs[k].events
            if v.fd < 0:
                continue
            if v.state == ST_CONNECTING:
                self._on_connected(v)
            elif e & EPOLLOUT:
                self._flush_out(v)
            if e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                v.hup = 1
            if v.fd >= 0 and (e & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) and v.state != ST_CONNECTING:
                if v.decoded or v.state != ST_LIVE or self.read_interval_ns == 0:
                    self._on_readable(v)
                else:
                    self._defer(v)
        now = lg_mono_ns()
        if now >= self.next_round:
            self.next_round = now + self.read_interval_ns
            if self.ndirty:
                self._read_round()
        if self.started:
            if self.in_flight < self.connect_window and self.next_connect < self.n:
                self._connect_more(now)
            if now >= self.next_sweep:
                self.next_sweep = now + 20000000     # every 20 ms
                self._sweep(now)
        return nev

    def run_for(self, double seconds):
        """Run the loop for ``seconds``; returns the socket events handled."""
        cdef uint64_t end = lg_mono_ns() + <uint64_t>(seconds * 1e9) if seconds > 0 else 0
        cdef uint64_t now
        cdef long total = 0
        cdef int wait
        while True:
            now = lg_mono_ns()
            if now >= end:
                break
            wait = <int>((end - now) // 1000000)
            total += self.poll(wait if wait < 20 else 20)
        return total

    def pause(self, Py_ssize_t i, bint paused=True):
        """Stop (or resume) reading viewer ``i``, e.g. to make it a slow consumer."""
        cdef Viewer* v
        if i < 0 or i >= self.n:
            raise IndexError(i)
        v = &self.v[i]
        v.paused = paused
        if v.fd >= 0 and v.state != ST_CONNECTING:
            self._arm(v, EPOLL_CTL_MOD)

    def close(self):
        """Close every connection."""
        cdef Py_ssize_t i
        for i in range(self.n):
            if self.v[i].fd >= 0:
                self._finish(&self.v[i], END_CLOSED, 0)

    # ------------------------------------------------------------ connecting

    cdef void _connect_more(self, uint64_t now) except *:
        cdef Viewer* v
        while self.in_flight < self.connect_window and self.next_connect < self.n:
            v = &self.v[self.next_connect]
            self.next_connect += 1
            self.in_flight += 1
            self._connect(v, now)

    cdef void _connect(self, Viewer* v, uint64_t now) except *:
        cdef int pending = 0
        cdef Py_ssize_t idx = v - self.v
        cdef lg_addr_t* src = NULL
        cdef int fd
        if self.nsrcs:
            src = &self.srcs[idx % self.nsrcs]
        self.connects_started += 1
        fd = lg_connect(&self.dst, src, self.rcvbuf, &pending)
        v.deadline = now + self.connect_timeout_ns
        if fd < 0:
            self._count_errno("connect", -fd)
            self._retry_or_end(v, END_CONNECT, <uint16_t>(-fd), now)
            return
        v.fd = fd
        v.hup = 0
        v.carry_len = v.carry_need = 0
        v.out_len = 0
        v.kick_reason = v.error_reason = 0
        if pending:
            v.state = ST_CONNECTING
            self._arm(v, EPOLL_CTL_ADD)
        else:
            v.state = ST_AUTH
            self._arm(v, EPOLL_CTL_ADD)
            self._established(v)

    cdef void _arm(self, Viewer* v, int op) except *:
        cdef epoll_event ev
        memset(&ev, 0, sizeof(ev))
        ev.data.u64 = <uint64_t>(v - self.v)
        # Edge-triggered: a viewer is read until the socket is empty (or put
        # on the next round's list), and is not reported again until new data.
        if v.state == ST_CONNECTING:
            ev.events = EPOLLOUT | EPOLLET
        else:
            ev.events = ((0 if v.paused else EPOLLIN | EPOLLRDHUP) | (EPOLLOUT if v.out_len else 0)
                         | EPOLLET)
        if epoll_ctl(self.ep, op, v.fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl failed")

    cdef void _on_connected(self, Viewer* v) except *:
        cdef int err = lg_sock_error(v.fd)
        if err:
            self._count_errno("connect", err)
            self._retry_or_end(v, END_CONNECT, <uint16_t>err, lg_mono_ns())
            return
        v.state = ST_AUTH
        self._arm(v, EPOLL_CTL_MOD)
        self._established(v)

    cdef void _established(self, Viewer* v) except *:
        cdef bytes hello = self._hellos[v - self.v]
        self.connected += 1
        self.last_connected_ns = lg_mono_ns()
        self._send(v, PyBytes_AS_STRING(hello), <uint32_t>PyBytes_GET_SIZE(hello))

    cdef void _send(self, Viewer* v, const char* data, uint32_t n) except *:
        """Send a request; a part the socket does not take waits for EPOLLOUT."""
        cdef ssize_t w
        if v.out_len:
            return          # one request at a time; only a Ping can get here, and is skipped
        w = c_send(v.fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT)
        if w == <ssize_t>n:
            return
        if w < 0:
            if errno != EAGAIN and errno != EINTR:
                self._socket_failed(v, errno)
                return
            w = 0
        v.out = data + w
        v.out_len = n - <uint32_t>w
        self._arm(v, EPOLL_CTL_MOD)

    cdef void _flush_out(self, Viewer* v) except *:
        cdef ssize_t w
        if not v.out_len:
            self._arm(v, EPOLL_CTL_MOD)
            return
        w = c_send(v.fd, v.out, v.out_len, MSG_NOSIGNAL | MSG_DONTWAIT)
        if w < 0:
            if errno != EAGAIN and errno != EINTR:
                self._socket_failed(v, errno)
            return
        v.out += w
        v.out_len -= <uint32_t>w
        if not v.out_len:
            self._arm(v, EPOLL_CTL_MOD)

    cdef void _send_ping(self, Viewer* v) except *:
        cdef char* p = v.ping
        cdef uint32_t n
        if v.out_len:
            return
        v.nonce += 1
        p[HEADER_SIZE] = 0x08              # Ping.nonce: field 1, varint
        n = <uint32_t>(put_varint(p + HEADER_SIZE + 1, v.nonce) - p)
        write_header(p, FT_PING, 0, n - HEADER_SIZE)
        self.pings_sent += 1
        self._send(v, p, n)

    cdef uint64_t _jitter(self, uint64_t span) noexcept:
        # xorshift64*: spreads pings and retries so they do not come in waves
        self.rng ^= self.rng >> 12
        self.rng ^= self.rng << 25
        self.rng ^= self.rng >> 27
        if span == 0:
            return 0
        return (self.rng * <uint64_t>0x2545F4914F6CDD1D) % span

    # ------------------------------------------------------------ ending

    cdef void _count_errno(self, str where, int err) except *:
        key = (where, err)
        self.errnos[key] = self.errnos.get(key, 0) + 1

    cdef void _socket_failed(self, Viewer* v, int err) except *:
        self.socket_errors += 1
        self._count_errno("socket", err)
        if v.state < ST_LIVE:
            self._retry_or_end(v, END_SOCKET, <uint16_t>err, lg_mono_ns())
        else:
            self._finish(v, END_SOCKET, <uint16_t>err)

    cdef void _close_fd(self, Viewer* v) noexcept:
        if v.fd >= 0:
            c_close(v.fd)      # also leaves the epoll set
            v.fd = -1
        free(v.carry)
        v.carry = NULL
        v.carry_len = v.carry_need = 0
        v.out_len = 0

    cdef void _retry_or_end(self, Viewer* v, uint8_t why, uint16_t code, uint64_t now) except *:
        """A viewer failed before its join Ack: back off and reconnect, or give up."""
        cdef uint64_t backoff
        self._close_fd(v)
        if v.attempts < self.max_retries:
            v.attempts += 1
            self.retries += 1
            # the protocol's backoff (docs/protocol.md 5.8): full jitter over
            # min(10 s, 0.2 s * 2^n)
            backoff = <uint64_t>10000000000
            if v.attempts <= 6:
                backoff = <uint64_t>200000000 << (v.attempts - 1)
            v.deadline = now + self._jitter(backoff + 1)
            v.state = ST_RETRY
            return       # stays in flight: it still holds a window slot
        self.connect_failed += 1
        self.in_flight -= 1
        v.state = ST_DONE
        v.end = why
        v.end_code = code
        self.done += 1

    cdef void _finish(self, Viewer* v, uint8_t why, uint16_t code) except *:
        """Close a viewer for good."""
        if v.state == ST_DONE:
            return
        if v.state == ST_LIVE:
            self.live -= 1
        elif v.state != ST_NEW:
            self.in_flight -= 1
            self.connect_failed += 1
        self._close_fd(v)
        v.state = ST_DONE
        v.end = why
        v.end_code = code
        self.done += 1

    cdef void _sweep(self, uint64_t now) except *:
        """Pings due, retries due, connect timeouts."""
        cdef Py_ssize_t i
        cdef Viewer* v
        for i in range(self.next_connect):
            v = &self.v[i]
            if now < v.deadline:
                continue
            if v.state == ST_LIVE:
                if v.ping_ms:
                    v.deadline = now + <uint64_t>v.ping_ms * <uint64_t>1000000
                    self._send_ping(v)
                else:
                    v.deadline = <uint64_t>-1
            elif v.state == ST_RETRY:
                self._connect(v, now)
            elif v.state == ST_CONNECTING or v.state == ST_AUTH or v.state == ST_JOINING:
                self._count_errno("timeout", 0)
                self._retry_or_end(v, END_TIMEOUT, 0, now)

    # ------------------------------------------------------------ reading

    cdef void _defer(self, Viewer* v) noexcept:
        """Read this viewer at the next round (with read_interval): one recv
        then takes several frames, which saves most of the kernel's per-read
        cost (on loopback the reader also pays for the ACKs it causes)."""
        if not v.queued:
            v.queued = 1
            self.dirty[self.ndirty] = <uint32_t>(v - self.v)
            self.ndirty += 1

    cdef void _read_round(self) except *:
        cdef Py_ssize_t i, count = self.ndirty
        cdef Viewer* v
        self.ndirty = 0
        for i in range(count):
            v = &self.v[self.dirty[i]]
            v.queued = 0
            if v.fd >= 0:
                self._on_readable(v)

    cdef void _on_readable(self, Viewer* v) except *:
        cdef ssize_t r
        cdef int turn
        for turn in range(MAX_READS + 1):
            if v.fd < 0 or v.paused:
                return
            if turn == MAX_READS:
                self._defer(v)      # more to read: later, so others get their turn
                return
            r = c_recv(v.fd, _scratch, SCRATCH, MSG_DONTWAIT)
            if r > 0:
                self.wire_bytes += <uint64_t>r
                v.rbytes += <uint64_t>r
                self._feed(v, <const uint8_t*>_scratch, r)
                if r < SCRATCH and not v.hup:
                    return          # edge-triggered: new data brings a new event
                continue
            if r == 0:
                self._on_eof(v)
                return
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return
            self._socket_failed(v, errno)
            return

    cdef void _on_eof(self, Viewer* v) except *:
        cdef uint8_t reason
        if v.kick_reason:
            self._finish(v, END_KICK, v.kick_reason)
            return
        reason = v.error_reason
        if v.state < ST_LIVE and (reason == 0 or reason == R_CONNECTION_LIMIT
                                  or reason == R_CONNECTION_RATE_LIMITED
                                  or reason == R_AUTH_TIMEOUT):
            if reason == 0:
                self.eofs += 1
            self._retry_or_end(v, END_ERROR if reason else END_EOF, reason, lg_mono_ns())
            return
        if reason:
            self._finish(v, END_ERROR, reason)
        else:
            self.eofs += 1
            self._finish(v, END_EOF, 0)

    cdef void _feed(self, Viewer* v, const uint8_t* data, Py_ssize_t n) except *:
        cdef Py_ssize_t pos = 0, take, whole, length
        cdef char* grown
        if v.carry_len:
            # finish the carried frame first, copying only what it lacks
            if v.carry_need == 0:
                take = HEADER_SIZE - v.carry_len
                if take > n:
                    take = n
                memcpy(v.carry + v.carry_len, data, take)
                v.carry_len += <uint32_t>take
                pos = take
                if v.carry_len < HEADER_SIZE:
                    return
                length = check_header(<const uint8_t*>v.carry, MAX_SERVER_FRAME)
                if length < 0:
                    self._protocol_error(v)
                    return
                v.carry_need = <uint32_t>(HEADER_SIZE + length)
                grown = <char*>realloc(v.carry, v.carry_need)
                if grown == NULL:
                    raise MemoryError()
                v.carry = grown
            take = v.carry_need - v.carry_len
            if take > n - pos:
                take = n - pos
            memcpy(v.carry + v.carry_len, data + pos, take)
            v.carry_len += <uint32_t>take
            pos += take
            if v.carry_len < v.carry_need:
                return
            self._frame(v, <const uint8_t*>v.carry, v.carry_need)
            if v.fd < 0:
                return
            free(v.carry)          # idle viewers hold no read memory
            v.carry = NULL
            v.carry_len = v.carry_need = 0
        while n - pos >= HEADER_SIZE:
            length = check_header(data + pos, MAX_SERVER_FRAME)
            if length < 0:
                self._protocol_error(v)
                return
            whole = HEADER_SIZE + length
            if n - pos < whole:
                break
            self._frame(v, data + pos, whole)
            if v.fd < 0:
                return
            pos += whole
        if pos < n:
            self._keep(v, data + pos, n - pos)

    cdef void _keep(self, Viewer* v, const uint8_t* data, Py_ssize_t n) except *:
        """Start a carry with the incomplete frame at the end of a read."""
        cdef Py_ssize_t cap = n if n > HEADER_SIZE else HEADER_SIZE
        cdef Py_ssize_t length = 0
        if n >= HEADER_SIZE:
            length = check_header(data, MAX_SERVER_FRAME)
            if length < 0:
                self._protocol_error(v)
                return
            if HEADER_SIZE + length > cap:
                cap = HEADER_SIZE + length
        v.carry = <char*>realloc(v.carry, cap)
        if v.carry == NULL:
            raise MemoryError()
        memcpy(v.carry, data, n)
        v.carry_len = <uint32_t>n
        v.carry_need = <uint32_t>(HEADER_SIZE + length) if n >= HEADER_SIZE else 0

    cdef void _protocol_error(self, Viewer* v) except *:
        self.protocol_errors += 1
        self._finish(v, END_PROTOCOL, 0)

    cdef void _frame(self, Viewer* v, const uint8_t* f, Py_ssize_t whole) except *:
        cdef uint8_t ftype = f[1]
        cdef const uint8_t* body = f + HEADER_SIZE
        cdef const uint8_t* end = f + whole
        cdef uint64_t val
        cdef object inflated = None
        self.frames += 1
        v.frames += 1
        if ftype == FT_BATCH:
            self._batch(v, f, whole)
            return
        if f[2] & FLAG_LZ4:
            inflated = self._inflate(body, whole - HEADER_SIZE)
            if inflated is None:
                return
            body = <const uint8_t*>PyBytes_AS_STRING(inflated)
            end = body + PyBytes_GET_SIZE(inflated)
        if ftype == FT_PRESENCE:
            self.presence += 1
        elif ftype == FT_PONG:
            self.pongs += 1
        elif ftype == FT_AUTH_OK:
            self.auth_oks += 1
            if v.state == ST_AUTH:
                self.authed += 1
                if _uint_field(body, end, 3, &val) < 0:
                    self.bad_bodies += 1
                v.ping_ms = <uint32_t>val
                v.state = ST_JOINING
                j = self._joins[v.room]
                self._send(v, PyBytes_AS_STRING(j), <uint32_t>PyBytes_GET_SIZE(j))
        elif ftype == FT_ACK:
            self.acks += 1
            if v.state == ST_JOINING:
                if _uint_field(body, end, 3, &val) < 0:
                    self.bad_bodies += 1
                v.ack_seq = val
                v.last_seq = val
                v.state = ST_LIVE
                v.was_live = 1
                self.joined += 1
                self.live += 1
                self.in_flight -= 1
                self.last_join_ns = lg_mono_ns()
                # first ping at a random point of the interval: no waves of pings
                v.deadline = self.last_join_ns + (self._jitter(<uint64_t>v.ping_ms * <uint64_t>1000000)
                                                   if v.ping_ms else <uint64_t>-1)
        elif ftype == FT_KICK:
            if _uint_field(body, end, 1, &val) < 0:
                self.bad_bodies += 1
            if val >= NREASONS:
                val = NREASONS - 1
            self.kicks[val] += 1
            v.kick_reason = <uint8_t>val if val else NREASONS - 1
        elif ftype == FT_ERROR:
            if _uint_field(body, end, 1, &val) < 0:
                self.bad_bodies += 1
            if val >= NREASONS:
                val = NREASONS - 1
            self.errors[val] += 1
            if val < 20 or val >= 30:
                v.error_reason = <uint8_t>val       # closing: the EOF follows
            elif v.state == ST_JOINING:
                self.join_failed += 1
                self._finish(v, END_JOIN, <uint16_t>val)
        elif ftype == FT_GAP:
            self.node_gaps += 1
        else:
            self.other_frames += 1

    cdef object _inflate(self, const uint8_t* body, Py_ssize_t n):
        """lz4 body -> bytes, or None (counted) when it is corrupt."""
        if n < 4:
            self.bad_bodies += 1
            return None
        if lz4_stored_size(body) > MAX_SERVER_FRAME:
            self.bad_bodies += 1
            return None
        try:
            return _lz4_decompress(PyMemoryView_FromMemory(<char*>body, n, PyBUF_READ))
        except Exception:
            self.bad_bodies += 1
            return None

    # ------------------------------------------------------------ batches

    cdef void _batch(self, Viewer* v, const uint8_t* f, Py_ssize_t whole) except *:
        cdef uint64_t h = lg_hash(f, <size_t>whole)
        cdef uint64_t j = v.bframes
        cdef const uint8_t* body = f + HEADER_SIZE
        cdef const uint8_t* end = f + whole
        cdef object inflated = None
        cdef uint64_t nmsgs = 0, first = 0, last = 0
        self.batch_frames += 1
        self.batch_bytes += <uint64_t>whole
        v.bframes = j + 1
        v.chain = v.chain * P + h
        if not v.decoded and j != 0:
            return                         # the common case: hash and count only
        if f[2] & FLAG_LZ4:
            inflated = self._inflate(body, whole - HEADER_SIZE)
            if inflated is None:
                return
            body = <const uint8_t*>PyBytes_AS_STRING(inflated)
            end = body + PyBytes_GET_SIZE(inflated)
        if self._walk(v, body, end, v.decoded, &nmsgs, &first, &last) < 0:
            self.bad_bodies += 1
            return
        if j == 0:
            v.first_seq = first
            v.first_msgs = nmsgs
            if not v.decoded and first:
                # every viewer's join point: the first message follows the Ack
                if first > v.ack_seq + 1:
                    self.join_point_gaps += 1
                    self.gaps += 1
                    self.missing += first - v.ack_seq - 1
                elif first <= v.ack_seq:
                    self.reorders += 1
        if v.decoded:
            self.decoded_frames += 1
            v.msgs += nmsgs
            self.decoded_msgs += nmsgs
            self._reference(v, j, h, nmsgs, first, last)

    cdef int _walk(self, Viewer* v, const uint8_t* p, const uint8_t* end, bint check,
                   uint64_t* nmsgs, uint64_t* first, uint64_t* last) except -2:
        """Walk a Batch body: count records; with ``check``, seq/gap/latency
        checks on every message. -1 when malformed."""
        cdef uint64_t tag, ln, seq, ts, now = 0, count = 0
        cdef const uint8_t* m
        cdef const uint8_t* mend
        cdef const uint8_t* room = NULL
        cdef const uint8_t* payload = NULL
        cdef uint64_t room_len = 0, payload_len = 0
        cdef RoomRef* ref = &self.refs[v.room]
        if check and self.recording:
            now = lg_real_ns()
        while p < end:
            p = get_varint(p, end, &tag)
            if p == NULL:
                return -1
            if tag != 0x0A:
                if tag == 0x10:
                    p = get_varint(p, end, &ln)
                    if p == NULL:
                        return -1
                    if ln:
                        self.sampled_batches += 1
                    continue
                p = skip_field(p, end, tag)
                if p == NULL:
                    return -1
                continue
            p = get_varint(p, end, &ln)
            if p == NULL or ln > <uint64_t>(end - p):
                return -1
            m = p
            mend = p + ln
            p = mend
            count += 1
            if not check and count > 1:
                continue
            seq = 0
            room = NULL
            room_len = 0
            payload = NULL
            payload_len = 0
            while m < mend:
                m = get_varint(m, mend, &tag)
                if m == NULL:
                    return -1
                if tag == 0x10:
                    m = get_varint(m, mend, &seq)
                elif tag == 0x0A or tag == 0x32:
                    m = get_varint(m, mend, &ln)
                    if m == NULL or ln > <uint64_t>(mend - m):
                        return -1
                    if tag == 0x0A:
                        room = m
                        room_len = ln
                    else:
                        payload = m
                        payload_len = ln
                    m += ln
                else:
                    m = skip_field(m, mend, tag)
                if m == NULL:
                    return -1
            if count == 1:
                first[0] = seq
            last[0] = seq
            if not check:
                continue
            if (<Py_ssize_t>room_len != ref.name_len
                    or memcmp(room, ref.name, room_len) != 0):
                self.foreign += 1
                continue
            if seq == v.last_seq + 1:
                v.last_seq = seq
            elif seq > v.last_seq:
                self.gaps += 1
                self.missing += seq - v.last_seq - 1
                v.last_seq = seq
            else:
                self.reorders += 1
            if now and payload_len >= 8:
                self.lat_tick += 1
                if self.lat_tick >= self.latency_every:
                    self.lat_tick = 0
                    memcpy(&ts, payload, 8)        # little-endian hosts only
                    if ts > now:
                        self.lat_negative += 1
                        ts = now
                    ts = now - ts
                    self.hist[lg_hist_index(ts)] += 1
                    self.lat_count += 1
                    self.lat_sum_ns += ts
                    if ts > self.lat_max_ns:
                        self.lat_max_ns = ts
        nmsgs[0] = count
        return 0

    cdef void _reference(self, Viewer* v, uint64_t j, uint64_t h, uint64_t nmsgs,
                         uint64_t first, uint64_t last) except *:
        """Extend (or check) the room's reference with a decoded viewer's frame."""
        cdef RoomRef* ref = &self.refs[v.room]
        cdef Py_ssize_t k
        if j == 0:
            if ref.known == 0:
                v.k0 = 0
            elif first and first == ref.last[ref.known - 1] + 1:
                v.k0 = ref.known
            else:
                v.k0 = self._find(ref, first)
                if v.k0 < 0:
                    v.k0 = -2
        if v.k0 < 0:
            return
        k = <Py_ssize_t>(v.k0 + <int64_t>j)
        if k < ref.known:
            if ref.fhash[k] != h:
                ref.mismatches += 1
            return
        if k > ref.known:
            return                          # cannot happen: viewers add in order
        if ref.known == ref.cap:
            self._grow(ref)
        ref.fhash[k] = h
        ref.first[k] = first
        ref.last[k] = last
        ref.chain[k + 1] = ref.chain[k] * P + h
        ref.cum[k + 1] = ref.cum[k] + nmsgs
        ref.known = k + 1

    cdef void _grow(self, RoomRef* ref) except *:
        cdef Py_ssize_t cap = 1024 if ref.cap == 0 else ref.cap * 2
        cdef uint64_t* a
        a = <uint64_t*>realloc(ref.fhash, cap * sizeof(uint64_t))
        if a == NULL:
            raise MemoryError()
        ref.fhash = a
        a = <uint64_t*>realloc(ref.first, cap * sizeof(uint64_t))
        if a == NULL:
            raise MemoryError()
        ref.first = a
        a = <uint64_t*>realloc(ref.last, cap * sizeof(uint64_t))
        if a == NULL:
            raise MemoryError()
        ref.last = a
        a = <uint64_t*>realloc(ref.chain, (cap + 1) * sizeof(uint64_t))
        if a == NULL:
            raise MemoryError()
        if ref.cap == 0:
            a[0] = 0
        ref.chain = a
        a = <uint64_t*>realloc(ref.cum, (cap + 1) * sizeof(uint64_t))
        if a == NULL:
            raise MemoryError()
        if ref.cap == 0:
            a[0] = 0
        ref.cum = a
        ref.cap = cap

    cdef Py_ssize_t _find(self, RoomRef* ref, uint64_t first) noexcept:
        """Reference frame index whose first seq is ``first``; -1 if none."""
        cdef Py_ssize_t lo = 0, hi = ref.known, mid
        if first == 0:
            return -1
        while lo < hi:
            mid = (lo + hi) // 2
            if ref.first[mid] < first:
                lo = mid + 1
            else:
                hi = mid
        if lo < ref.known and ref.first[lo] == first:
            return lo
        return -1

    cdef int64_t _resolve(self, Viewer* v) noexcept:
        """A viewer's start in its room's reference: >= 0, -1 not yet, -2 never."""
        cdef RoomRef* ref
        cdef Py_ssize_t k
        if v.k0 != -1 or v.bframes == 0 or v.first_seq == 0:
            return v.k0
        ref = &self.refs[v.room]
        if ref.known == 0:
            return -1
        k = self._find(ref, v.first_seq)
        if k >= 0:
            v.k0 = k
        elif v.first_seq < ref.first[0]:
            v.k0 = -2                       # started before the reference: never covered
        return v.k0

    # ------------------------------------------------------------ results

    cdef uint64_t _deliveries(self, uint64_t* unresolved) noexcept:
        cdef Py_ssize_t i, end
        cdef Viewer* v
        cdef RoomRef* ref
        cdef int64_t k0
        cdef uint64_t total = 0, pending = 0
        for i in range(self.n):
            v = &self.v[i]
            if v.bframes == 0:
                continue
            if v.decoded:
                total += v.msgs
                continue
            k0 = self._resolve(v)
            if k0 < 0:
                total += v.first_msgs
                pending += v.bframes - 1
                continue
            ref = &self.refs[v.room]
            end = <Py_ssize_t>(k0 + <int64_t>v.bframes)
            if end > ref.known:
                pending += <uint64_t>(end - ref.known)
                end = ref.known
            total += ref.cum[end] - ref.cum[k0]
        unresolved[0] = pending
        return total

    def stats(self):
        """Counters as a dict (cheap: one pass over the viewers for deliveries)."""
        cdef uint64_t pending = 0
        cdef uint64_t deliveries = self._deliveries(&pending)
        cdef int i
        kicks = {i: self.kicks[i] for i in range(NREASONS) if self.kicks[i]}
        errors = {i: self.errors[i] for i in range(NREASONS) if self.errors[i]}
        return {
            "viewers": self.n,
            "connects_started": self.connects_started,
            "connected": self.connected,
            "authed": self.authed,
            "joined": self.joined,
            "join_failed": self.join_failed,
            "connect_failed": self.connect_failed,
            "retries": self.retries,
            "in_flight": self.in_flight,
            "live": self.live,
            "done": self.done,
            "frames": self.frames,
            "wire_bytes": self.wire_bytes,
            "batch_frames": self.batch_frames,
            "batch_bytes": self.batch_bytes,
            "decoded_frames": self.decoded_frames,
            "decoded_msgs": self.decoded_msgs,
            "deliveries": deliveries,
            "unresolved_frames": pending,    # frames its room's reference has not seen yet
            "pongs": self.pongs,
            "pings_sent": self.pings_sent,
            "presence": self.presence,
            "acks": self.acks,
            "auth_oks": self.auth_oks,
            "other_frames": self.other_frames,
            "gaps": self.gaps,
            "missing": self.missing,
            "reorders": self.reorders,
            "join_point_gaps": self.join_point_gaps,
            "foreign": self.foreign,
            "node_gaps": self.node_gaps,
            "sampled_batches": self.sampled_batches,
            "bad_bodies": self.bad_bodies,
            "protocol_errors": self.protocol_errors,
            "eofs": self.eofs,
            "socket_errors": self.socket_errors,
            "slow_cuts": self.kicks[R_SLOW_CONSUMER],
            "kicks": kicks,
            "errors": errors,
            "errnos": {f"{w}:{e}": c for (w, e), c in self.errnos.items()},
            "latency_samples": self.lat_count,
            "latency_negative": self.lat_negative,
            "latency_sum_ns": self.lat_sum_ns,
            "latency_max_ns": self.lat_max_ns,
            "first_connect_ns": self.first_connect_ns,
            "last_connected_ns": self.last_connected_ns,
            "last_join_ns": self.last_join_ns,
        }

    def verify(self):
        """Check every viewer's Batch stream against its room's reference.

        Returns a dict: ``divergences`` (viewers whose frames are not an exact
        run of the reference), ``verified``, ``unverified`` (not coverable:
        started before the reference, got frames it did not, or never got a
        Batch while the room did), ``cut`` (viewers that ended early), the
        first divergent viewer indices, and per room the reference
        ``(known frames, chain, messages, first seq, mismatches)``.
        """
        cdef Py_ssize_t i, end
        cdef Viewer* v
        cdef RoomRef* ref
        cdef int64_t k0
        cdef uint64_t expect
        cdef long divergences = 0, verified = 0, unverified = 0, cut = 0, silent = 0
        bad = []
        for i in range(self.n):
            v = &self.v[i]
            if not v.was_live:
                continue
            if v.state == ST_DONE and v.end != END_CLOSED:
                cut += 1
            ref = &self.refs[v.room]
            if v.bframes == 0:
                if ref.known and v.state == ST_LIVE:
                    silent += 1          # its room got frames, it got none
                    unverified += 1
                continue
            k0 = self._resolve(v)
            if k0 < 0:
                unverified += 1
                continue
            end = <Py_ssize_t>(k0 + <int64_t>v.bframes)
            if end > ref.known:
                unverified += 1
                continue
            expect = ref.chain[end] - ref.chain[k0] * _pow(P, v.bframes)
            if expect == v.chain:
                verified += 1
            else:
                divergences += 1
                if len(bad) < 20:
                    bad.append(i)
        rooms = []
        for i in range(self.nrooms):
            ref = &self.refs[i]
            rooms.append({
                "room": self._names[i].decode("utf-8", "replace"),
                "frames": ref.known,
                "chain": ref.chain[ref.known] if ref.known else 0,
                "messages": ref.cum[ref.known] if ref.known else 0,
                "first_seq": ref.first[0] if ref.known else 0,
                "last_seq": ref.last[ref.known - 1] if ref.known else 0,
                "mismatches": ref.mismatches,
            })
        return {"divergences": divergences, "verified": verified, "unverified": unverified,
                "silent": silent, "cut": cut, "divergent_viewers": bad, "rooms": rooms}

    def viewer(self, Py_ssize_t i):
        """One viewer's state, for tests and debugging."""
        cdef Viewer* v
        if i < 0 or i >= self.n:
            raise IndexError(i)
        v = &self.v[i]
        return {"state": v.state, "decoded": bool(v.decoded), "room": v.room,
                "end": _END_NAMES.get(v.end, ""), "end_code": v.end_code,
                "frames": v.frames, "batch_frames": v.bframes, "bytes": v.rbytes,
                "ack_seq": v.ack_seq, "last_seq": v.last_seq, "first_seq": v.first_seq,
                "messages": v.msgs, "attempts": v.attempts, "carry": v.carry_len}

    def ends(self):
        """How viewers that are done ended: ``{"kick:31": n, "connect:111": n, ...}``."""
        cdef Py_ssize_t i
        out = {}
        for i in range(self.n):
            if self.v[i].state == ST_DONE:
                key = f"{_END_NAMES.get(self.v[i].end, '?')}:{self.v[i].end_code}"
                out[key] = out.get(key, 0) + 1
        return out

    def room_members(self):
        """Live viewers per room index."""
        cdef Py_ssize_t i
        out = [0] * self.nrooms
        for i in range(self.n):
            if self.v[i].state == ST_LIVE:
                out[self.v[i].room] += 1
        return out

    # ------------------------------------------------------------ latency

    def latency_buckets(self):
        """Non-empty histogram buckets as ``[(index, count), ...]`` (ns values:
        see :func:`bucket_value`)."""
        cdef int i
        return [(i, self.hist[i]) for i in range(LG_HIST_BUCKETS) if self.hist[i]]

    def latency_percentiles(self, percentiles=(50.0, 99.0, 99.9)):
        """Percentiles (ns) of the latency recorded so far; None when empty."""
        return percentiles_of(self.latency_buckets(), percentiles)

    def reset_latency(self):
        """Forget the latency recorded so far (end of the warm-up)."""
        memset(self.hist, 0, LG_HIST_BUCKETS * sizeof(uint64_t))
        self.lat_count = self.lat_negative = self.lat_sum_ns = self.lat_max_ns = 0


def percentiles_of(buckets, percentiles=(50.0, 99.0, 99.9)):
    """Percentiles (ns) of a histogram given as ``[(index, count), ...]``
    (merged from several processes: add the counts per index)."""
    items = sorted(buckets)
    total = sum(c for _, c in items)
    out = []
    for p in percentiles:
        if not total:
            out.append(None)
            continue
        rank = max(1, int(-(-p * total // 100)))     # ceil(p% of total), at least 1
        seen = 0
        for index, count in items:
            seen += count
            if seen >= rank:
                out.append(lg_hist_value(index))
                break
    return out
