# TLS viewers (transports T_TLS and T_WSS): an OpenSSL session per viewer
# under the same byte streams as over TCP.
#   connect -> the client handshake (ST_TLS), stepped on each readiness;
#   then as over TCP (Hello) or as over WebSocket (the upgrade request).
#   A handshake the connection broke (a reset: the node's refusal at accept
#   is a bare RST on a TLS port) is retried with the protocol's backoff;
#   one TLS refused (an untrusted certificate, a wrong name, not TLS at all)
#   ends the viewer (END_TLS), its reason counted in tls_errors.
# Every read and write of a viewer goes through _io_recv/_io_send, which
# take the session when there is one. The viewers do not send close_notify
# when they close (a load generator's viewers just go).

cdef inline ssize_t _io_recv(Viewers self, Viewer* v, char* buf, size_t n) noexcept:
    """recv() of the viewer's stream: bytes, 0 at its end, -errno."""
    cdef ssize_t r
    if v.ssl != NULL:
        return lg_tls_recv(v.ssl, buf, n)
    r = c_recv(v.fd, buf, n, MSG_DONTWAIT)
    return r if r >= 0 else -errno


cdef inline ssize_t _io_send(Viewers self, Viewer* v, const char* buf, size_t n) noexcept:
    """send() on the viewer's stream: bytes taken, or -errno."""
    cdef ssize_t w
    if v.ssl != NULL:
        return lg_tls_send(v.ssl, buf, n)
    w = c_send(v.fd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT)
    return w if w >= 0 else -errno


cdef void _tls_start(Viewers self, Viewer* v) except *:
    """The TCP connection is up: begin the handshake."""
    v.ssl = lg_tls_new(self.ssl_ctx, v.fd, PyBytes_AS_STRING(self._server_name),
                       self.tls_verify)
    if v.ssl == NULL:
        raise MemoryError("SSL_new failed")
    v.state = ST_TLS
    v.tls_want_write = 0
    _tls_step(self, v)


cdef void _tls_step(Viewers self, Viewer* v) except *:
    cdef char why[160]
    cdef int r = lg_tls_handshake(v.ssl, why, sizeof(why))
    cdef uint8_t want = 0
    if r == LG_TLS_DONE:
        self.tls_handshakes += 1
        if v.tls_want_write:
            v.tls_want_write = 0
            _arm(self, v, EPOLL_CTL_MOD)
        _session_open(self, v)
        return
    if r == LG_TLS_WANT_READ or r == LG_TLS_WANT_WRITE:
        want = 1 if r == LG_TLS_WANT_WRITE else 0
        if want != v.tls_want_write:
            v.tls_want_write = want
            _arm(self, v, EPOLL_CTL_MOD)
        return
    self.tls_failures += 1
    key = why.decode("utf-8", "replace")
    self.tls_errors[key] = self.tls_errors.get(key, 0) + 1
    if r == LG_TLS_RETRY:
        _retry_or_end(self, v, END_TLS, 0, lg_mono_ns())
    else:
        _finish(self, v, END_TLS, 0)
