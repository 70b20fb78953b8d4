# cython: language_level=3
# fanout._loadgen: the load generator's viewer engine, driven by the viewer
# worker processes of fanout/load/. fanout/_loadgen.pxd declares the Viewers
# object and shows the data flow and the checking method.
#
# One extension module, split into files by job (as pyx/core is):
#   viewers.pyx    the Viewers object: construction, the epoll loop, the API
#   lifecycle.pyx  a viewer's life: connect, Hello, Join, pings, retries, end
#   reader.pyx     reading: framing in place, the carry buffer, frame types
#   wsviewer.pyx   WebSocket viewers: the upgrade, masked requests, de-framing
#   tlsviewer.pyx  TLS viewers: an OpenSSL session per viewer, the handshake
#   verify.pyx     Batch frames: rolling hashes, seq checks, room references
#   latency.pyx    the latency histogram and its percentiles
#   lgsupport.pxd  the C support code (sockets, clocks, frame hash)

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.stdlib cimport calloc, malloc, realloc, free
from libc.string cimport memcpy, memcmp, memset
from libc.errno cimport errno, EAGAIN, EINTR, EPIPE

from system cimport (
    c_close, c_recv, c_send, MSG_DONTWAIT, MSG_NOSIGNAL,
    epoll_event, epoll_create1, epoll_ctl, epoll_wait,
    EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLET, EPOLLRDHUP,
    EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLL_CLOEXEC,
)
from wireformat cimport (
    HEADER_SIZE, FLAG_LZ4, FLAG_DICT, MAX_SERVER_FRAME,
    FT_PING, FT_AUTH_OK, FT_ERROR, FT_BATCH, FT_KICK, FT_PONG, FT_GAP, FT_ACK, FT_PRESENCE,
    R_AUTH_TIMEOUT, R_SLOW_CONSUMER, R_CONNECTION_LIMIT, R_CONNECTION_RATE_LIMITED,
    check_header, lz4_stored_size, lz4_prefix_size, get_varint, skip_field, put_varint, write_header,
)
cdef extern from "<string.h>" nogil:
    # GNU; Python.h (pyconfig.h) defines _GNU_SOURCE on Linux
    void* memmem(const void* hay, size_t hay_n, const void* needle, size_t needle_n)

from lgsupport cimport (
    lg_addr, lg_connect, lg_sock_error, lg_mono_ns, lg_real_ns, lg_hash,
    lg_hist_index, lg_hist_value, LG_HIST_BUCKETS,
    lg_tls_ctx, lg_tls_ctx_free, lg_tls_new, lg_tls_free, lg_tls_handshake, lg_tls_recv,
    lg_tls_send, LG_TLS_DONE, LG_TLS_WANT_READ, LG_TLS_WANT_WRITE, LG_TLS_RETRY, LG_TLS_FAILED,
)

import base64
import hashlib

include "viewers.pyx"
include "lifecycle.pyx"
include "reader.pyx"
include "wsviewer.pyx"
include "tlsviewer.pyx"
include "verify.pyx"
include "latency.pyx"
