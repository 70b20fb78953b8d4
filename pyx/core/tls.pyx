# The node's TLS settings as one SSL_CTX (see tls.pxd).

from openssl cimport *

# Connections per TLS mode after their handshake, and failed handshakes
# (of which: plaintext on a TLS port). Counted here once per connection,
# read by the node's metrics (tls_stats).
cdef unsigned long long _tls_count_kernel = 0
cdef unsigned long long _tls_count_core = 0
cdef unsigned long long _tls_count_failed = 0
cdef unsigned long long _tls_count_plaintext = 0

TLS_MODES = ("auto", "core")
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def tls_stats():
    """``{"kernel": n, "core": n, "failed": n, "plaintext": n}``: TLS
    connections by the mode their handshake ended in, and handshakes that
    failed (``plaintext``: of those, a client that did not speak TLS)."""
    return {"kernel": _tls_count_kernel, "core": _tls_count_core, "failed": _tls_count_failed,
            "plaintext": _tls_count_plaintext}


def openssl_version():
    return OpenSSL_version(OPENSSL_VERSION).decode()


def ktls_built():
    """Whether this build's OpenSSL headers offer kernel TLS at all."""
    return FO_SSL_OP_ENABLE_KTLS != 0


cdef str _last_error():
    cdef char buf[256]
    fo_tls_last_error(buf, sizeof(buf))
    return buf.decode("utf-8", "replace")


cdef class TlsContext:
    """A server certificate chain and key (PEM files) for the core's TLS.

    TLS 1.2 and 1.3; no session resumption (no tickets, no cache), no
    renegotiation. ``mode``: ``"auto"`` lets OpenSSL move a connection's
    encryption into the kernel when it can (kernel TLS), ``"core"`` keeps
    it in OpenSSL. Raises ``ValueError`` for files OpenSSL cannot use.
    """

    def __cinit__(self, str certfile, str keyfile, str mode="auto"):
        cdef SSL_CTX* ctx
        if mode not in TLS_MODES:
            raise ValueError(f"tls mode must be one of {', '.join(TLS_MODES)}, not {mode!r}")
        self.mode = mode
        self.certfile = certfile
        self.keyfile = keyfile
        ctx = SSL_CTX_new(TLS_server_method())
        if ctx == NULL:
            raise MemoryError(f"SSL_CTX_new: {_last_error()}")
        self._ctx = ctx
        SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION)
        # Partial writes: SSL_write returns after each record, so a full
        # socket costs at most one record kept inside OpenSSL. Moving
        # buffer: the retry of a write comes from the backlog's frame
        # object, at another address than a writer thread's first try.
        # Release buffers: an idle connection holds no record buffers (a
        # room is mostly idle viewers; ~34 KB each otherwise).
        SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE
                         | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS)
        SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE
                            | SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_TICKET
                            | (FO_SSL_OP_ENABLE_KTLS if mode == "auto" else 0))
        # No resumption: a ticket is a write after the handshake for every
        # connection, and a reconnect storm's full handshakes are bounded by
        # the listener's admission limits anyway.
        SSL_CTX_set_num_tickets(ctx, 0)
        # TLS 1.3: AES-128-GCM first (the server chooses): every recipient
        # pays its own encryption, and it is the cheapest suite with AES-NI.
        SSL_CTX_set_ciphersuites(ctx, TLS13_SUITES)
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF)
        if SSL_CTX_use_certificate_chain_file(ctx, certfile.encode()) != 1:
            raise ValueError(f"TLS certificate {certfile}: {_last_error()}")
        if SSL_CTX_use_PrivateKey_file(ctx, keyfile.encode(), SSL_FILETYPE_PEM) != 1:
            raise ValueError(f"TLS key {keyfile} is not a PEM key, or does not match "
                             f"certificate {certfile}: {_last_error()}")
        if SSL_CTX_check_private_key(ctx) != 1:
            raise ValueError(f"TLS key {keyfile} does not match certificate {certfile}: "
                             f"{_last_error()}")

    def __dealloc__(self):
        if self._ctx != NULL:
            SSL_CTX_free(self._ctx)     # connections' SSL objects hold their own reference

    def __repr__(self):
        return f"<TlsContext {self.certfile} mode={self.mode}>"

    cdef SSL* _new_ssl(self, int fd) except NULL:
        cdef SSL* ssl = SSL_new(self._ctx)
        if ssl == NULL:
            raise MemoryError(f"SSL_new: {_last_error()}")
        if SSL_set_fd(ssl, fd) != 1:
            SSL_free(ssl)
            raise OSError(f"SSL_set_fd: {_last_error()}")
        SSL_set_accept_state(ssl)
        return ssl
