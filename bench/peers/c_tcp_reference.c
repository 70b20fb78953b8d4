/*
 * The physical-limit peer of the scenarios (bench/scenarios/): a minimal C
 * server on loopback TCP that speaks just enough of wire protocol v1 for
 * `fanout load` viewers, then writes pre-built Batch frames to every joined
 * socket with writev, nothing else on top.
 *
 *   c_tcp_reference --frames FILE [--port 0] [--viewers N] [--rate FPS]
 *                   [--duration S] [--start-timeout S] [--epoch E]
 *
 * Control protocol (pre-encoded replies, no protobuf library):
 *   Hello -> AuthOk;  Join/Leave/Chat -> Ack{req_id, room, seq 0, epoch};
 *   Ping  -> Pong{nonce};  anything else is ignored.
 *
 * FILE is a concatenation of complete frames (8-byte header + body), built by
 * the scenario with fanout._core from the same corpus and at the same
 * messages per frame as the engine's run. Seqs in the frames start at 1, so
 * a viewer that joined with Ack.seq 0 sees no gap.
 *
 * The broadcast starts once N viewers have joined (or --start-timeout after
 * the first accept). Frame k is released at t0 + k/FPS (FPS 0: flat out,
 * the next frame as soon as the previous round is done) and written to every
 * joined socket. Every socket has one byte position into the frame stream,
 * so a socket that fell behind is caught up with one writev covering all of
 * its missing frames: the same shape as the engine's backlog writev, and no
 * per-socket queue. Control replies for a socket wait until it sits on a
 * frame boundary, so they never split a frame.
 *
 * Prints "c_reference listening on 127.0.0.1:PORT" when ready, and one JSON
 * line of counts when the broadcast ends (after --duration s or the last
 * frame). It then keeps the connections open and answering until SIGTERM.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 20000
#define RBUF 4096
#define CTRL 512

struct conn {
    int fd;
    int joined;
    size_t pos;           /* bytes of the frame stream written */
    size_t start;         /* stream position when it joined */
    unsigned rlen;        /* bytes in rbuf */
    unsigned clen;        /* bytes in ctrl */
    unsigned char *rbuf;
    unsigned char ctrl[CTRL];
};

static struct conn *conns[MAX_CONNS + 64];
static volatile sig_atomic_t stop_flag;
static unsigned char *stream;       /* all frames, back to back */
static size_t stream_len;
static size_t *offsets;             /* frame k ends at offsets[k] */
static long nframes;
static const char *epoch = "c-reference";
static long joined_count, conn_count;
static unsigned long long writes, short_writes, eagain, errors_, bytes_written;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec * 1e-6;
}

static void on_term(int sig) { (void)sig; stop_flag = 1; }

/* ---- protobuf bits ------------------------------------------------------ */

static unsigned char *put_varint(unsigned char *p, uint64_t v)
{
    while (v >= 0x80) { *p++ = (unsigned char)(v | 0x80); v >>= 7; }
    *p++ = (unsigned char)v;
    return p;
}

static int get_varint(const unsigned char **p, const unsigned char *end, uint64_t *out)
{
    uint64_t v = 0;
    int shift = 0;
    while (*p < end && shift < 64) {
        unsigned char b = *(*p)++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) { *out = v; return 0; }
        shift += 7;
    }
    return -1;
}

/* Fields 1 (varint) and 2 (string) of Join/Leave/Chat, and field 1 of Ping. */
static void scan_body(const unsigned char *p, const unsigned char *end, uint64_t *f1,
                      const unsigned char **f2, uint64_t *f2len)
{
    *f1 = 0; *f2 = NULL; *f2len = 0;
    while (p < end) {
        uint64_t key, v;
        if (get_varint(&p, end, &key)) return;
        switch (key & 7) {
        case 0:
            if (get_varint(&p, end, &v)) return;
            if ((key >> 3) == 1) *f1 = v;
            break;
        case 2:
            if (get_varint(&p, end, &v) || v > (uint64_t)(end - p)) return;
            if ((key >> 3) == 2) { *f2 = p; *f2len = v; }
            p += v;
            break;
        case 1: p += 8; break;
        case 5: p += 4; break;
        default: return;
        }
    }
}

static unsigned char *header(unsigned char *p, int type, size_t len)
{
    p[0] = 1; p[1] = (unsigned char)type; p[2] = 0; p[3] = 0;
    p[4] = (unsigned char)(len >> 24); p[5] = (unsigned char)(len >> 16);
    p[6] = (unsigned char)(len >> 8); p[7] = (unsigned char)len;
    return p + 8;
}

/* ---- control replies ---------------------------------------------------- */

static void flush_ctrl(struct conn *c, size_t head)
{
    /* Only on a frame boundary: a socket that is mid-frame waits. */
    if (!c->clen || c->pos != head) return;
    ssize_t w = send(c->fd, c->ctrl, c->clen, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (w > 0) {
        memmove(c->ctrl, c->ctrl + w, c->clen - (size_t)w);
        c->clen -= (unsigned)w;
    }
}

static void queue_ctrl(struct conn *c, const unsigned char *frame, size_t n, size_t head)
{
    if (c->clen + n > CTRL) return;   /* a flood of pings: drop the extra pongs */
    memcpy(c->ctrl + c->clen, frame, n);
    c->clen += (unsigned)n;
    flush_ctrl(c, head);
}

static void reply(struct conn *c, int ftype, const unsigned char *body, const unsigned char *bend,
                  size_t head)
{
    unsigned char out[400], *b = out + 8, *p;
    uint64_t f1, f2len;
    const unsigned char *f2;
    size_t elen = strlen(epoch);

    scan_body(body, bend, &f1, &f2, &f2len);
    p = b;
    switch (ftype) {
    case 0x01: { /* Hello -> AuthOk{user, session, ping 20000, idle 45000, time} */
        char sess[32];
        int sl = snprintf(sess, sizeof sess, "c-%d", c->fd);
        *p++ = 0x0a; *p++ = 1; *p++ = 'c';
        *p++ = 0x12; *p++ = (unsigned char)sl; memcpy(p, sess, (size_t)sl); p += sl;
        *p++ = 0x18; p = put_varint(p, 20000);
        *p++ = 0x20; p = put_varint(p, 45000);
        *p++ = 0x28; p = put_varint(p, wall_ms());
        header(out, 0x41, (size_t)(p - b));
        break;
    }
    case 0x02: case 0x03: case 0x04: /* Join/Leave/Chat -> Ack */
        if (f2len > 200) f2len = 200;
        if (f1) { *p++ = 0x08; p = put_varint(p, f1); }
        if (f2len) { *p++ = 0x12; p = put_varint(p, f2len); memcpy(p, f2, f2len); p += f2len; }
        if (ftype == 0x02) {
            *p++ = 0x22; p = put_varint(p, elen); memcpy(p, epoch, elen); p += elen;
            if (!c->joined) { c->joined = 1; joined_count++; c->pos = c->start = head; }
        }
        header(out, 0x47, (size_t)(p - b));
        break;
    case 0x05: /* Ping -> Pong{nonce, time} */
        if (f1) { *p++ = 0x08; p = put_varint(p, f1); }
        *p++ = 0x10; p = put_varint(p, wall_ms());
        header(out, 0x45, (size_t)(p - b));
        break;
    default:
        return;
    }
    queue_ctrl(c, out, (size_t)(p - out), head);
}

static void drop(int epfd, struct conn *c)
{
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    if (c->joined) joined_count--;
    conns[c->fd] = NULL;
    conn_count--;
    free(c->rbuf);
    free(c);
}

static void on_readable(int epfd, struct conn *c, size_t head)
{
    for (;;) {
        if (!c->rbuf && !(c->rbuf = malloc(RBUF))) { drop(epfd, c); return; }
        ssize_t r = recv(c->fd, c->rbuf + c->rlen, RBUF - c->rlen, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) { drop(epfd, c); return; }
        if (r < 0) break;
        c->rlen += (unsigned)r;
        unsigned off = 0;
        while (c->rlen - off >= 8) {
            const unsigned char *h = c->rbuf + off;
            size_t len = ((size_t)h[4] << 24) | ((size_t)h[5] << 16) | ((size_t)h[6] << 8) | h[7];
            if (len > RBUF - 8) { drop(epfd, c); return; }   /* we never need big frames */
            if (c->rlen - off < 8 + len) break;
            /* Client frames are never lz4 in practice; a compressed one is ignored. */
            if (!(h[2] & 1)) reply(c, h[1], h + 8, h + 8 + len, head);
            off += 8 + (unsigned)len;
        }
        memmove(c->rbuf, c->rbuf + off, c->rlen - off);
        c->rlen -= off;
        if ((size_t)r < RBUF) break;
    }
}

/* ---- broadcast ---------------------------------------------------------- */

static void write_round(size_t head)
{
    for (int fd = 0; fd < MAX_CONNS + 64; fd++) {
        struct conn *c = conns[fd];
        if (!c || !c->joined || c->pos >= head) continue;
        struct iovec iov = { stream + c->pos, head - c->pos };
        ssize_t w = writev(fd, &iov, 1);
        writes++;
        if (w == (ssize_t)iov.iov_len) {
            bytes_written += (unsigned long long)w; c->pos = head;
        } else if (w >= 0) {
            short_writes++; bytes_written += (unsigned long long)w; c->pos += (size_t)w;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            eagain++;
        } else {
            errors_++;
        }
        if (c->clen) flush_ctrl(c, head);
    }
}

static long frames_done(size_t pos)
{
    long lo = 0, hi = nframes;   /* frames with offsets[k] <= pos */
    while (lo < hi) {
        long mid = (lo + hi) / 2;
        if (offsets[mid] <= pos) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static void accept_all(int lfd, int epfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        if (fd >= MAX_CONNS + 64) { close(fd); continue; }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        if (!c) { close(fd); continue; }
        c->fd = fd;
        conns[fd] = c;
        conn_count++;
        struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
        epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    }
}

static void poll_once(int lfd, int epfd, int timeout_ms, size_t head)
{
    struct epoll_event evs[512];
    int n = epoll_wait(epfd, evs, 512, timeout_ms);
    for (int i = 0; i < n; i++) {
        int fd = evs[i].data.fd;
        if (fd == lfd) accept_all(lfd, epfd);
        else if (conns[fd]) on_readable(epfd, conns[fd], head);
    }
}

static void usage(void)
{
    fprintf(stderr, "usage: c_tcp_reference --frames FILE [--port 0] [--viewers N] [--rate FPS]"
                    " [--duration S] [--start-timeout S] [--epoch E]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *path = NULL;
    int port = 0;
    long viewers = 1;
    double rate = 0, duration = 10, start_timeout = 120;

    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc) usage();
        if (!strcmp(argv[i], "--frames")) path = argv[++i];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--viewers")) viewers = atol(argv[++i]);
        else if (!strcmp(argv[i], "--rate")) rate = atof(argv[++i]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[++i]);
        else if (!strcmp(argv[i], "--start-timeout")) start_timeout = atof(argv[++i]);
        else if (!strcmp(argv[i], "--epoch")) epoch = argv[++i];
        else usage();
    }
    if (!path || strlen(epoch) > 64) usage();
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);

    /* Load the frame stream and index its frame boundaries. */
    FILE *f = fopen(path, "rb");
    struct stat st;
    if (!f || fstat(fileno(f), &st) < 0) { perror(path); return 1; }
    stream_len = (size_t)st.st_size;
    stream = malloc(stream_len + 1);
    if (!stream || fread(stream, 1, stream_len, f) != stream_len) { perror("read frames"); return 1; }
    fclose(f);
    offsets = malloc(sizeof *offsets * (stream_len / 8 + 1));
    for (size_t p = 0; p + 8 <= stream_len;) {
        size_t len = ((size_t)stream[p + 4] << 24) | ((size_t)stream[p + 5] << 16) |
                     ((size_t)stream[p + 6] << 8) | stream[p + 7];
        p += 8 + len;
        if (p > stream_len) { fprintf(stderr, "truncated frame file\n"); return 1; }
        offsets[nframes++] = p;
    }
    if (!nframes) { fprintf(stderr, "no frames in %s\n", path); return 1; }

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t sl = sizeof sa;
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 4096) < 0) {
        perror("listen"); return 1;
    }
    getsockname(lfd, (struct sockaddr *)&sa, &sl);
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = lfd };
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);
    printf("c_reference listening on 127.0.0.1:%d\n", ntohs(sa.sin_port));
    fflush(stdout);

    /* Handshake phase: until every viewer joined (or the timeout). */
    double first = 0;
    while (!stop_flag && joined_count < viewers) {
        poll_once(lfd, epfd, 50, 0);
        if (conn_count && !first) first = now();
        if (first && now() - first > start_timeout) break;
    }
    long joined_at_start = joined_count;

    /* Broadcast phase. */
    double t0 = now(), cpu0 = cpu_seconds(), next = t0;
    long k = 0;
    size_t head = 0;
    while (!stop_flag && k < nframes && now() - t0 < duration) {
        if (rate > 0) {
            double wait = next - now();
            poll_once(lfd, epfd, wait > 0 ? (int)(wait * 1000) : 0, head);
            if (now() < next) continue;
            next += 1.0 / rate;
        } else {
            poll_once(lfd, epfd, 0, head);
        }
        head = offsets[k++];
        write_round(head);
    }
    /* Let stragglers catch up on what was released, for a bounded time. */
    double catch_end = now() + 2.0;
    for (;;) {
        int behind = 0;
        for (int fd = 0; fd < MAX_CONNS + 64; fd++)
            if (conns[fd] && conns[fd]->joined && conns[fd]->pos < head) behind = 1;
        if (!behind || now() > catch_end || stop_flag) break;
        poll_once(lfd, epfd, 1, head);
        write_round(head);
    }
    double secs = now() - t0, cpu = cpu_seconds() - cpu0;
    unsigned long long delivered = 0;
    for (int fd = 0; fd < MAX_CONNS + 64; fd++)
        if (conns[fd] && conns[fd]->joined) delivered += (unsigned long long)(frames_done(conns[fd]->pos) -
                                             frames_done(conns[fd]->start));
    printf("{\"viewers_joined\": %ld, \"frames_released\": %ld, \"frames_in_file\": %ld, "
           "\"seconds\": %.3f, \"writes\": %llu, \"writes_per_s\": %.1f, "
           "\"frames_delivered\": %llu, \"frames_per_s\": %.1f, \"bytes_written\": %llu, "
           "\"short_writes\": %llu, \"eagain\": %llu, \"errors\": %llu, \"cpu_seconds\": %.3f, "
           "\"mode\": \"%s\", \"rate\": %.3f}\n",
           joined_at_start, k, nframes, secs, writes, secs > 0 ? writes / secs : 0.0, delivered,
           secs > 0 ? delivered / secs : 0.0, bytes_written, short_writes, eagain, errors_, cpu,
           rate > 0 ? "paced" : "flat-out", rate);
    fflush(stdout);

    /* Keep answering (pings) until told to stop. */
    while (!stop_flag) poll_once(lfd, epfd, 100, head);
    return 0;
}
