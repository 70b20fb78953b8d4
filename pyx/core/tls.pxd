# TLS in the core: a TlsContext (the node's certificate and key, one
# SSL_CTX) makes an SSL object per accepted socket; the Connection holding
# it (connection.pxd) handshakes, then does every read and write through it.
# The record I/O itself is C (tlsio.h), shared with the writer threads.
#
# Modes (TlsContext.mode): "auto" asks OpenSSL for kernel TLS
# (SSL_OP_ENABLE_KTLS): after the handshake the kernel encrypts the
# connection's writes if it has the tls ULP and the cipher suits it, and
# OpenSSL's record layer is used otherwise; "core" always uses OpenSSL's.
# Which one a connection got: Connection.tls_mode, and tls_stats().

from openssl cimport SSL, SSL_CTX

cdef extern from "tlsio.h" nogil:
    enum: FO_TLS_DONE
    enum: FO_TLS_WANT_READ
    enum: FO_TLS_WANT_WRITE
    enum: FO_TLS_FAILED
    unsigned long long FO_SSL_OP_ENABLE_KTLS
    ssize_t fo_tls_send(SSL* ssl, const char* buf, size_t n)
    ssize_t fo_tls_recv(SSL* ssl, char* buf, size_t n)
    int fo_tls_handshake(SSL* ssl, char* why, size_t why_len)
    int fo_tls_ktls_send(SSL* ssl)
    void fo_tls_close_notify(SSL* ssl)
    void fo_tls_last_error(char* buf, size_t n)

cdef class TlsContext:
    cdef SSL_CTX* _ctx
    cdef readonly str mode            # "auto" or "core"
    cdef readonly str certfile
    cdef readonly str keyfile
    cdef SSL* _new_ssl(self, int fd) except NULL
