# The load generator's C support code: sockets (numeric addresses, a
# non-blocking connect bound to a source address), the two clocks, the frame
# hash of the rolling-hash check, the latency histogram's bucket index, and
# the TLS viewers' OpenSSL calls.
# Written in C because they lean on socket headers and compiler builtins
# (sockaddr_storage, inet_pton, __builtin_clzll) that Cython would otherwise
# need declared one by one.
#
# Header-only, like pyx/includes/wireformat.pxd: `from lgsupport cimport ...`;
# nothing here exists at run time.

from libc.stdint cimport uint64_t

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

    /* TLS viewers (OpenSSL). Results follow send()/recv(): bytes, 0 at the
       end of the stream, -EAGAIN for WANT_READ/WANT_WRITE, -errno, -EPROTO
       for bad TLS. A write that came back short or -EAGAIN must be retried
       with the same bytes (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER: from any
       address), which the viewers' one-request-at-a-time rule does. */
    #include <openssl/err.h>
    #include <openssl/ssl.h>
    #include <openssl/x509v3.h>
    #include <stdio.h>

    #define LG_TLS_DONE 1
    #define LG_TLS_WANT_READ 0
    #define LG_TLS_WANT_WRITE 2
    #define LG_TLS_RETRY (-1)       /* the connection broke: worth a retry */
    #define LG_TLS_FAILED (-2)      /* TLS refused it (certificate, protocol): not */

    static void lg_tls_why(char* why, size_t n, int e) {
        unsigned long code = ERR_peek_last_error();
        const char* reason = code ? ERR_reason_error_string(code) : NULL;
        if (reason != NULL) snprintf(why, n, "%s", reason);
        else if (code) ERR_error_string_n(code, why, n);
        else if (e) snprintf(why, n, "%s", strerror(e));
        else snprintf(why, n, "closed during the handshake");
        ERR_clear_error();
    }

    /* The viewers' context; NULL with why[] set on failure. ca_file "" does
       not check the node's certificate. */
    static SSL_CTX* lg_tls_ctx(const char* ca_file, char* why, size_t n) {
        SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
        if (ctx == NULL) { lg_tls_why(why, n, 0); return NULL; }
        SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
        /* idle viewers give their record buffers back: 10,000 sessions */
        SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE
                         | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        if (ca_file[0]) {
            if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
                lg_tls_why(why, n, 0); SSL_CTX_free(ctx); return NULL;
            }
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        } else {
            SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        }
        return ctx;
    }

    static void lg_tls_ctx_free(void* ctx) { SSL_CTX_free((SSL_CTX*)ctx); }

    /* A session on fd; name (may be "") is sent as SNI when it is a host
       name and, with verify, must match the certificate (a host name or an
       IP address). NULL on failure. */
    static void* lg_tls_new(void* ctx, int fd, const char* name, int verify) {
        SSL* ssl = SSL_new((SSL_CTX*)ctx);
        unsigned char buf[16];
        int is_ip;
        if (ssl == NULL) return NULL;
        if (SSL_set_fd(ssl, fd) != 1) { SSL_free(ssl); return NULL; }
        SSL_set_connect_state(ssl);
        if (name[0]) {
            is_ip = inet_pton(AF_INET, name, buf) == 1 || inet_pton(AF_INET6, name, buf) == 1;
            if (!is_ip) SSL_set_tlsext_host_name(ssl, name);
            if (verify) {
                X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
                if ((is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, name)
                           : X509_VERIFY_PARAM_set1_host(param, name, 0)) != 1) {
                    SSL_free(ssl); return NULL;
                }
            }
        }
        return ssl;
    }

    static void lg_tls_free(void* ssl) { if (ssl != NULL) SSL_free((SSL*)ssl); }

    static int lg_tls_handshake(void* p, char* why, size_t n) {
        SSL* ssl = (SSL*)p;
        int r, e, err;
        ERR_clear_error();
        errno = 0;
        r = SSL_do_handshake(ssl);
        if (r == 1) return LG_TLS_DONE;
        e = SSL_get_error(ssl, r);
        if (e == SSL_ERROR_WANT_READ) return LG_TLS_WANT_READ;
        if (e == SSL_ERROR_WANT_WRITE) return LG_TLS_WANT_WRITE;
        err = errno;
        if (e == SSL_ERROR_SYSCALL || (e == SSL_ERROR_SSL && ERR_peek_last_error() == 0)) {
            lg_tls_why(why, n, err);
            return LG_TLS_RETRY;
        }
        lg_tls_why(why, n, err);
        return LG_TLS_FAILED;
    }

    static ssize_t lg_tls_result(SSL* ssl, int r, int err) {
        switch (SSL_get_error(ssl, r)) {
        case SSL_ERROR_WANT_READ:
        case SSL_ERROR_WANT_WRITE: return -EAGAIN;
        case SSL_ERROR_ZERO_RETURN: return 0;
        case SSL_ERROR_SYSCALL: ERR_clear_error(); return err ? -(ssize_t)err : 0;
        default: ERR_clear_error(); return -EPROTO;
        }
    }

    static ssize_t lg_tls_recv(void* p, char* buf, size_t n) {
        size_t got = 0;
        int r;
        ERR_clear_error();
        errno = 0;
        r = SSL_read_ex((SSL*)p, buf, n, &got);
        if (r > 0) return (ssize_t)got;
        return lg_tls_result((SSL*)p, r, errno);
    }

    static ssize_t lg_tls_send(void* p, const char* buf, size_t n) {
        size_t w = 0;
        int r;
        ssize_t e;
        ERR_clear_error();
        errno = 0;
        r = SSL_write_ex((SSL*)p, buf, n, &w);
        if (r > 0) return (ssize_t)w;
        e = lg_tls_result((SSL*)p, r, errno);
        return e == 0 ? -EPIPE : e;
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
    void* lg_tls_ctx(const char* ca_file, char* why, size_t n)
    void lg_tls_ctx_free(void* ctx)
    void* lg_tls_new(void* ctx, int fd, const char* name, int verify)
    void lg_tls_free(void* ssl)
    int lg_tls_handshake(void* ssl, char* why, size_t n)
    ssize_t lg_tls_recv(void* ssl, char* buf, size_t n)
    ssize_t lg_tls_send(void* ssl, const char* buf, size_t n)
    enum: LG_TLS_DONE
    enum: LG_TLS_WANT_READ
    enum: LG_TLS_WANT_WRITE
    enum: LG_TLS_RETRY
    enum: LG_TLS_FAILED

