# OpenSSL externs the core's TLS layer uses (pyx/core/tls.pyx,
# connection.pyx; pyx/core/tlsio.h holds the record I/O both the loop and
# the writer threads call). Declarations only: logic lives in pyx/core.
# Several of these are macros in OpenSSL's headers; Cython calls them as
# written, which is all a macro needs.

from libc.stdint cimport uint64_t

cdef extern from "<openssl/ssl.h>" nogil:
    ctypedef struct SSL_METHOD:
        pass
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct SSL:
        pass

    const SSL_METHOD* TLS_server_method()
    SSL_CTX* SSL_CTX_new(const SSL_METHOD* method)
    void SSL_CTX_free(SSL_CTX* ctx)
    int SSL_CTX_set_min_proto_version(SSL_CTX* ctx, int version)
    long SSL_CTX_set_mode(SSL_CTX* ctx, long mode)
    uint64_t SSL_CTX_set_options(SSL_CTX* ctx, uint64_t options)
    int SSL_CTX_set_num_tickets(SSL_CTX* ctx, size_t n)
    int SSL_CTX_set_ciphersuites(SSL_CTX* ctx, const char* suites)
    long SSL_CTX_set_session_cache_mode(SSL_CTX* ctx, long mode)
    int SSL_CTX_use_certificate_chain_file(SSL_CTX* ctx, const char* path)
    int SSL_CTX_use_PrivateKey_file(SSL_CTX* ctx, const char* path, int filetype)
    int SSL_CTX_check_private_key(const SSL_CTX* ctx)

    SSL* SSL_new(SSL_CTX* ctx)
    void SSL_free(SSL* ssl)
    int SSL_set_fd(SSL* ssl, int fd)
    void SSL_set_accept_state(SSL* ssl)
    int SSL_pending(const SSL* ssl)
    int SSL_shutdown(SSL* ssl)
    const char* SSL_get_version(const SSL* ssl)
    const char* SSL_get_cipher_name(const SSL* ssl)

    enum: TLS1_2_VERSION
    enum: SSL_FILETYPE_PEM
    enum: SSL_SESS_CACHE_OFF
    # modes and options (unsigned 64-bit in OpenSSL 3)
    long SSL_MODE_ENABLE_PARTIAL_WRITE
    long SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
    long SSL_MODE_RELEASE_BUFFERS
    uint64_t SSL_OP_NO_RENEGOTIATION
    uint64_t SSL_OP_CIPHER_SERVER_PREFERENCE
    uint64_t SSL_OP_IGNORE_UNEXPECTED_EOF
    uint64_t SSL_OP_NO_TICKET

cdef extern from "<openssl/crypto.h>" nogil:
    const char* OpenSSL_version(int t)
    enum: OPENSSL_VERSION
