/*
 * Physical-limit baseline for bench/fanout_socketpairs.py: the cost of the
 * kernel write path alone, with nothing above it.
 *
 *   c_reference [members=1000] [frame_bytes=2048] [rounds=200] [writev|send]
 *
 * Creates `members` AF_UNIX SOCK_STREAM socketpairs. Each round writes one
 * frame_bytes frame to every "node" side, then reads every "peer" side empty
 * in the same thread so the socket buffers never fill. Only the write loop is
 * timed. The write call is writev with one iovec (the default; the call the
 * engine uses for backlogs) or send(MSG_DONTWAIT | MSG_NOSIGNAL), the call
 * the engine's fast path makes: writev also pays the generic file-write path
 * (fdget_pos, rw_verify_area, iovec import), so the two differ.
 * One warm-up round (untimed) comes first, as in the Python variants.
 *
 * Prints one JSON line. Short writes, EAGAIN and other errors are counted and
 * reported, never retried: with a drained peer and frames well under the
 * socket buffer they should all be 0, and a non-zero count means the figure
 * is not a clean one-writev-per-frame rate.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME (64 * 1024)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static long arg(int argc, char **argv, int i, long dflt, long lo, long hi)
{
    char *end;
    long v;
    if (argc <= i)
        return dflt;
    v = strtol(argv[i], &end, 10);
    if (*end || v < lo || v > hi) {
        fprintf(stderr, "argument %d must be an integer in [%ld, %ld]\n", i, lo, hi);
        exit(2);
    }
    return v;
}

struct counts {
    unsigned long long writes, bytes_written, short_writes, eagain, errors;
};

/* One round: one write call per node socket. */
static void write_round(const int *node, long n, struct iovec *iov, int use_send,
                        struct counts *c)
{
    for (long i = 0; i < n; i++) {
        ssize_t w = use_send
            ? send(node[i], iov->iov_base, iov->iov_len, MSG_DONTWAIT | MSG_NOSIGNAL)
            : writev(node[i], iov, 1);
        c->writes++;
        if (w == (ssize_t)iov->iov_len) {
            c->bytes_written += (unsigned long long)w;
        } else if (w >= 0) {
            c->short_writes++;
            c->bytes_written += (unsigned long long)w;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            c->eagain++;
        } else {
            c->errors++;
        }
    }
}

/* Read every peer until EAGAIN; returns bytes read (-1 on a real error). */
static long long drain(const int *peer, long n, char *buf, size_t cap)
{
    long long total = 0;
    for (long i = 0; i < n; i++) {
        for (;;) {
            ssize_t r = read(peer[i], buf, cap);
            if (r > 0) {
                total += r;
                continue;
            }
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            return -1; /* EOF or error: the pair is broken */
        }
    }
    return total;
}

int main(int argc, char **argv)
{
    long n = arg(argc, argv, 1, 1000, 1, 100000);
    long size = arg(argc, argv, 2, 2048, 1, MAX_FRAME);
    long rounds = arg(argc, argv, 3, 200, 1, 100000000);
    const char *call = argc > 4 ? argv[4] : "writev";
    int use_send = strcmp(call, "send") == 0;
    int *node = calloc((size_t)n, sizeof *node);
    int *peer = calloc((size_t)n, sizeof *peer);
    char *frame = malloc((size_t)size);
    char *buf = malloc(MAX_FRAME);
    struct counts c = {0};
    struct iovec iov;
    unsigned long long drained = 0;
    double seconds = 0.0;

    if (!use_send && strcmp(call, "writev") != 0) {
        fprintf(stderr, "the write call must be writev or send\n");
        return 2;
    }
    if (!node || !peer || !frame || !buf) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    /* A dead peer must show up as an error count, not kill the process. */
    signal(SIGPIPE, SIG_IGN);
    memset(frame, 'x', (size_t)size);
    iov.iov_base = frame;
    iov.iov_len = (size_t)size;

    for (long i = 0; i < n; i++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) {
            perror("socketpair (is the open-file limit too low?)");
            return 1;
        }
        node[i] = sv[0];
        peer[i] = sv[1];
    }

    /* Warm-up round, untimed: first-touch costs (page faults, caches). */
    {
        struct counts warm = {0};
        write_round(node, n, &iov, use_send, &warm);
        if (drain(peer, n, buf, MAX_FRAME) < 0) {
            perror("read");
            return 1;
        }
    }

    for (long r = 0; r < rounds; r++) {
        double t0 = now();
        write_round(node, n, &iov, use_send, &c);
        seconds += now() - t0;
        long long got = drain(peer, n, buf, MAX_FRAME);
        if (got < 0) {
            perror("read");
            return 1;
        }
        drained += (unsigned long long)got;
    }

    printf("{\"call\": \"%s\", \"members\": %ld, \"frame_bytes\": %ld, \"rounds\": %ld, "
           "\"writes\": %llu, \"seconds\": %.9f, \"writes_per_s\": %.1f, "
           "\"bytes_written\": %llu, \"bytes_drained\": %llu, "
           "\"short_writes\": %llu, \"eagain\": %llu, \"errors\": %llu}\n",
           call, n, size, rounds, c.writes, seconds,
           seconds > 0 ? (double)c.writes / seconds : 0.0,
           c.bytes_written, drained, c.short_writes, c.eagain, c.errors);

    for (long i = 0; i < n; i++) {
        close(node[i]);
        close(peer[i]);
    }
    free(node);
    free(peer);
    free(frame);
    free(buf);
    return (c.errors || drained != c.bytes_written) ? 1 : 0;
}
