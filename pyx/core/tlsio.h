/* TLS record I/O of one connection, shared by the loop thread
 * (connection.pyx) and the writer threads (writers.h), so both write a TLS
 * member the same way. Plain C, no Python API, no GIL needed.
 *
 * Results follow send()/recv(): bytes (>= 0) or -errno, with -EAGAIN for
 * OpenSSL's WANT_READ/WANT_WRITE. The rules the callers keep (OpenSSL's):
 *   - one thread at a time per SSL object (connection.pxd: a connection in
 *     a write round is neither read nor written by the loop thread);
 *   - a write that came back short or -EAGAIN left a record half sent inside
 *     OpenSSL: the next write must start with the same bytes (the rest of
 *     the same frame, from where this one stopped), at any address
 *     (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER).
 * OpenSSL's error queue is per thread: every call clears it first, so
 * SSL_get_error() judges this call alone.
 *
 * OpenSSL's socket BIO writes with write(), not send(MSG_NOSIGNAL): a write
 * to a reset peer raises SIGPIPE, which Python ignores process-wide from
 * start-up (the writer threads block every signal besides), so it is EPIPE.
 *
 * Kernel TLS: with SSL_OP_ENABLE_KTLS (tls.pyx, tls_mode auto) OpenSSL
 * hands the keys to the kernel after the handshake when the kernel has the
 * tls ULP; SSL_write then sends plaintext through the socket and the kernel
 * encrypts. The calls here do not change; fo_tls_ktls_send() says which
 * mode a connection got.
 */
#ifndef FANOUT_TLSIO_H
#define FANOUT_TLSIO_H

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

/* Headers of an OpenSSL built without kernel TLS: ask for nothing. */
#ifdef SSL_OP_ENABLE_KTLS
#define FO_SSL_OP_ENABLE_KTLS SSL_OP_ENABLE_KTLS
#else
#define FO_SSL_OP_ENABLE_KTLS 0
#endif

#define FO_TLS_DONE 1        /* handshake complete */
#define FO_TLS_WANT_READ 0
#define FO_TLS_WANT_WRITE 2
#define FO_TLS_FAILED (-1)

static ssize_t fo_tls_failure(SSL* ssl, int r, int err)
{
    switch (SSL_get_error(ssl, r)) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        return -EAGAIN;
    case SSL_ERROR_ZERO_RETURN:          /* the peer's close_notify */
        return 0;
    case SSL_ERROR_SYSCALL:
        return err ? -(ssize_t)err : 0;  /* 0: the peer closed the TCP stream */
    default:
        return -EPROTO;
    }
}

/* Write buf[0:len] (len > 0). Returns the bytes taken: len, or fewer when
 * the socket filled up (the rest must come next, see above); -EAGAIN if
 * none; -errno if the connection is broken. Partial-write mode makes each
 * SSL_write one record, so what came back is whole records. */
static ssize_t fo_tls_send(SSL* ssl, const char* buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        size_t w = 0;
        int r;
        ERR_clear_error();
        errno = 0;
        r = SSL_write_ex(ssl, buf + done, len - done, &w);
        if (r <= 0) {
            ssize_t e = fo_tls_failure(ssl, r, errno);
            if (e == -EAGAIN)
                return done ? (ssize_t)done : -EAGAIN;
            ERR_clear_error();
            return e == 0 ? -EPIPE : e;
        }
        done += w;
    }
    return (ssize_t)done;
}

/* Read up to len bytes of application data: bytes, 0 at end of stream
 * (close_notify or the TCP close), -EAGAIN, or -errno (-EPROTO: bad TLS). */
static ssize_t fo_tls_recv(SSL* ssl, char* buf, size_t len)
{
    size_t got = 0;
    int r;
    ssize_t e;
    ERR_clear_error();
    errno = 0;
    r = SSL_read_ex(ssl, buf, len, &got);
    if (r > 0)
        return (ssize_t)got;
    e = fo_tls_failure(ssl, r, errno);
    if (e != -EAGAIN)
        ERR_clear_error();
    return e;
}

/* One step of the server handshake: FO_TLS_DONE, FO_TLS_WANT_READ,
 * FO_TLS_WANT_WRITE, or FO_TLS_FAILED with why[] filled in (the failing
 * OpenSSL reason, e.g. "tlsv1 alert unknown ca", "wrong version number"). */
static int fo_tls_handshake(SSL* ssl, char* why, size_t why_len)
{
    int r, e;
    unsigned long code;
    ERR_clear_error();
    errno = 0;
    r = SSL_do_handshake(ssl);
    if (r == 1)
        return FO_TLS_DONE;
    e = SSL_get_error(ssl, r);
    if (e == SSL_ERROR_WANT_READ)
        return FO_TLS_WANT_READ;
    if (e == SSL_ERROR_WANT_WRITE)
        return FO_TLS_WANT_WRITE;
    code = ERR_peek_last_error();
    if (code != 0) {
        const char* reason = ERR_reason_error_string(code);
        if (reason != NULL)
            snprintf(why, why_len, "%s", reason);
        else
            ERR_error_string_n(code, why, why_len);
    } else if (e == SSL_ERROR_SYSCALL && errno != 0) {
        snprintf(why, why_len, "%s", strerror(errno));
    } else {
        snprintf(why, why_len, "connection closed during the handshake");
    }
    ERR_clear_error();
    return FO_TLS_FAILED;
}

/* 1 if the kernel encrypts this connection's writes (kernel TLS). */
static int fo_tls_ktls_send(SSL* ssl)
{
    return BIO_get_ktls_send(SSL_get_wbio(ssl)) ? 1 : 0;
}

/* Send close_notify, best effort (a closing connection's last word). */
static void fo_tls_close_notify(SSL* ssl)
{
    ERR_clear_error();
    (void)SSL_shutdown(ssl);
    ERR_clear_error();
}

/* The last OpenSSL error of this thread as text (context setup). */
static void fo_tls_last_error(char* buf, size_t n)
{
    unsigned long code = ERR_peek_last_error();
    if (code == 0)
        snprintf(buf, n, "unknown error");
    else
        ERR_error_string_n(code, buf, n);
    ERR_clear_error();
}

#endif
