/*
 * A minimal viewer fleet in C for the peers the load generator cannot read
 * (bench/peers/naive_server.py in JSON-lines mode, bench/peers/ws_server.py):
 * N loopback TCP connections read with epoll on one thread, so the reader is
 * never the bottleneck of what it measures.
 *
 *   c_reader --port P --conns N --mode lines|ws [--room R] [--rooms K]
 *            [--duration S] [--idle S] [--host 127.0.0.1]
 *
 * Both peers send each message as one JSON object on its own line (V1
 * style), carrying at least "seq":N and "ts":T (unix milliseconds, or
 * microseconds, when the server accepted the message). In ws mode the lines arrive inside WebSocket
 * text messages (server frames are never masked); the reader strips the
 * WebSocket framing and feeds the payload to the same line counter.
 *
 * Joining: lines mode sends {"op":"join","room":R}\n; ws mode sends the HTTP
 * upgrade for GET /R and waits for the 101. With --rooms K > 1, connection i
 * joins room "R-(i mod K)" instead. "ready N" is printed once every
 * connection has joined. The measurement runs from the first message for
 * --duration seconds, or until nothing arrived for --idle seconds. One JSON
 * line of results follows: messages, wire bytes, rate, seq gaps, latency
 * percentiles (from "ts"), and the reader's own CPU seconds.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FD 20100
#define CARRY 65536
#define FINE 100000       /* latency histogram: 10 us buckets up to 1 s, */
#define NBUCKET (FINE + 1000000)  /* then 1 ms buckets up to 1000 s */

struct conn {
    int state;              /* 0 connecting, 1 handshaking (ws), 2 ready */
    long index;             /* the i-th connection opened */
    uint64_t last_seq;
    unsigned clen;          /* ws mode: bytes of a partial ws frame carried over */
    unsigned ccap;
    unsigned llen;          /* ws mode: partial line inside ws payloads */
    unsigned char *carry;
    unsigned char *line;
};

static struct conn *conns[MAX_FD];
static int ws_mode;
static unsigned long long messages, wire_bytes, gaps, dup_or_back;
static unsigned *hist;
static unsigned long long lat_samples;
static unsigned char rbuf[1 << 20];

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t wall_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec * 1e-6;
}

static uint64_t field(const unsigned char *p, const unsigned char *end, const char *key)
{
    size_t kl = strlen(key);
    const unsigned char *q = memmem(p, (size_t)(end - p), key, kl);
    uint64_t v = 0;
    if (!q) return 0;
    for (q += kl; q < end && (*q == ' '); q++) {}
    for (; q < end && *q >= '0' && *q <= '9'; q++) v = v * 10 + (uint64_t)(*q - '0');
    return v;
}

static void one_line(struct conn *c, const unsigned char *p, const unsigned char *end, uint64_t now_us)
{
    uint64_t seq = field(p, end, "\"seq\":");
    uint64_t ts = field(p, end, "\"ts\":");
    messages++;
    if (seq) {
        if (seq > c->last_seq + 1) gaps += seq - c->last_seq - 1;
        else if (seq <= c->last_seq) dup_or_back++;
        c->last_seq = seq;
    }
    if (ts) {
        if (ts < 100000000000000ull) ts *= 1000;   /* unix ms -> us */
        uint64_t us = now_us > ts ? now_us - ts : 0;
        uint64_t d = us < 1000000 ? us / 10 : FINE + (us - 1000000) / 1000;
        hist[d < NBUCKET ? d : NBUCKET - 1]++;
        lat_samples++;
    }
}

/* Feed payload bytes (a line stream). Partial lines are kept in c->line. */
static void lines(struct conn *c, const unsigned char *p, size_t n, uint64_t now_us)
{
    const unsigned char *end = p + n;
    while (p < end) {
        const unsigned char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) {
            size_t rest = (size_t)(end - p);
            if (!c->line) c->line = malloc(CARRY);
            if (c->llen + rest > CARRY) rest = CARRY - c->llen;
            memcpy(c->line + c->llen, p, rest);
            c->llen += (unsigned)rest;
            return;
        }
        if (c->llen) {
            size_t part = (size_t)(nl - p);
            if (c->llen + part > CARRY) part = CARRY - c->llen;
            memcpy(c->line + c->llen, p, part);
            one_line(c, c->line, c->line + c->llen + part, now_us);
            c->llen = 0;
        } else {
            one_line(c, p, nl, now_us);
        }
        p = nl + 1;
    }
}

/* ws mode: parse whole frames from data (after c->carry), feed their payloads. */
static void ws_frames(struct conn *c, const unsigned char *data, size_t n, uint64_t now_us)
{
    const unsigned char *p = data, *end;
    if (c->clen) {
        if (c->clen + n > c->ccap) {
            c->ccap = (unsigned)(c->clen + n);
            c->carry = realloc(c->carry, c->ccap);
        }
        memcpy(c->carry + c->clen, data, n);
        p = c->carry;
        n += c->clen;
    }
    end = p + n;
    while (end - p >= 2) {
        size_t hl = 2;
        uint64_t len = p[1] & 0x7f;
        if (len == 126) { if (end - p < 4) break; len = ((uint64_t)p[2] << 8) | p[3]; hl = 4; }
        else if (len == 127) {
            if (end - p < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = (len << 8) | p[2 + i];
            hl = 10;
        }
        if (p[1] & 0x80) hl += 4;        /* masked: not from a server, but skip the key */
        if ((uint64_t)(end - p) < hl + len) break;
        int op = p[0] & 0x0f;
        if (op == 1 || op == 2 || op == 0) lines(c, p + hl, (size_t)len, now_us);
        p += hl + len;
    }
    size_t rest = (size_t)(end - p);
    if (rest > c->ccap) {
        unsigned char *fresh = malloc(rest);   /* p points into data, not carry */
        memcpy(fresh, p, rest);
        free(c->carry);
        c->carry = fresh;
        c->ccap = (unsigned)rest;
    } else if (rest) {
        memmove(c->carry, p, rest);
    }
    c->clen = (unsigned)rest;
}

static int make_hello(char *out, size_t cap, const char *rname, const char *host, int port)
{
    if (ws_mode)
        return snprintf(out, cap,
                        "GET /%s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n", rname, host, port);
    return snprintf(out, cap, "{\"op\":\"join\",\"room\":\"%s\"}\n", rname);
}

static double pct(double q)
{
    unsigned long long want = (unsigned long long)(q * (double)lat_samples), seen = 0;
    if (!lat_samples) return 0;
    for (long i = 0; i < NBUCKET; i++) {
        seen += hist[i];
        if (seen > want) return i < FINE ? i * 0.01 : 1000.0 + (i - FINE);   /* ms */
    }
    return 1000.0 + (NBUCKET - FINE);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *room = "room-0", *mode = "lines";
    int port = 0;
    long nconns = 1, nrooms = 1;
    double duration = 10, idle = 3;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--conns")) nconns = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--mode")) mode = argv[i + 1];
        else if (!strcmp(argv[i], "--room")) room = argv[i + 1];
        else if (!strcmp(argv[i], "--rooms")) nrooms = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--idle")) idle = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--host")) host = argv[i + 1];
        else { fprintf(stderr, "unknown option %s\n", argv[i]); return 2; }
    }
    ws_mode = !strcmp(mode, "ws");
    hist = calloc(NBUCKET, sizeof *hist);
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    char hello[512];
    int hlen = 0;
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    inet_pton(AF_INET, host, &sa.sin_addr);

    /* Connect in waves of 500 so the listen backlog never overflows. */
    long opened = 0, ready = 0;
    struct epoll_event evs[1024];
    double t_conn = mono();
    while (ready < nconns) {
        while (opened < nconns && opened - ready < 500) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0 || fd >= MAX_FD) { perror("socket"); return 1; }
            if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
                perror("connect"); return 1;
            }
            conns[fd] = calloc(1, sizeof(struct conn));
            conns[fd]->index = opened;
            struct epoll_event ev = { .events = EPOLLOUT | EPOLLIN, .data.fd = fd };
            epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
            opened++;
        }
        int n = epoll_wait(epfd, evs, 1024, 1000);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            struct conn *c = conns[fd];
            if (evs[i].events & (EPOLLERR | EPOLLHUP)) { fprintf(stderr, "connect failed\n"); return 1; }
            if (c->state == 0 && (evs[i].events & EPOLLOUT)) {
                char rname[200];
                if (nrooms > 1) snprintf(rname, sizeof rname, "%s-%ld", room, c->index % nrooms);
                else snprintf(rname, sizeof rname, "%s", room);
                hlen = make_hello(hello, sizeof hello, rname, host, port);
                if (send(fd, hello, (size_t)hlen, MSG_NOSIGNAL) != hlen) { perror("send"); return 1; }
                struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
                epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
                c->state = ws_mode ? 1 : 2;
                if (!ws_mode) ready++;
            } else if (c->state == 1 && (evs[i].events & EPOLLIN)) {
                /* The 101 response: read up to the blank line, keep what follows. */
                ssize_t r = recv(fd, rbuf, 4096, MSG_PEEK);
                if (r <= 0) { fprintf(stderr, "handshake failed\n"); return 1; }
                unsigned char *eoh = memmem(rbuf, (size_t)r, "\r\n\r\n", 4);
                if (!eoh) continue;
                if (memcmp(rbuf, "HTTP/1.1 101", 12)) { fprintf(stderr, "no 101\n"); return 1; }
                recv(fd, rbuf, (size_t)(eoh + 4 - rbuf), 0);
                c->state = 2;
                ready++;
            }
        }
        if (mono() - t_conn > 120) { fprintf(stderr, "only %ld of %ld ready\n", ready, nconns); return 1; }
    }
    printf("ready %ld %.3f\n", ready, mono() - t_conn);
    fflush(stdout);

    double first = 0, last = 0, cpu0 = 0;
    unsigned long long msgs_at_first = 0;
    double start_wait = mono();
    for (;;) {
        int n = epoll_wait(epfd, evs, 1024, 100);
        double t = mono();
        uint64_t now_us = wall_us();
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            struct conn *c = conns[fd];
            for (;;) {
                ssize_t r = recv(fd, rbuf, sizeof rbuf, MSG_DONTWAIT);
                if (r <= 0) {
                    if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                        epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
                    }
                    break;
                }
                if (!first) { first = t; cpu0 = cpu_seconds(); msgs_at_first = messages; }
                last = t;
                wire_bytes += (unsigned long long)r;
                if (ws_mode) ws_frames(c, rbuf, (size_t)r, now_us);
                else lines(c, rbuf, (size_t)r, now_us);
                if ((size_t)r < sizeof rbuf) break;
            }
        }
        if (first && t - first >= duration) break;
        if (first && t - last >= idle) break;
        if (!first && t - start_wait > 120) break;
    }
    double secs = last > first ? last - first : 0;
    printf("{\"mode\": \"%s\", \"conns\": %ld, \"messages\": %llu, \"wire_bytes\": %llu, "
           "\"seconds\": %.3f, \"messages_per_s\": %.1f, \"wire_bytes_per_message\": %.2f, "
           "\"gaps\": %llu, \"duplicates\": %llu, \"latency_ms\": {\"p50\": %.2f, \"p99\": %.2f, "
           "\"p999\": %.2f, \"samples\": %llu}, \"reader_cpu_seconds\": %.3f, \"cdf\": [",
           mode, ready, messages, wire_bytes, secs,
           secs > 0 ? (messages - msgs_at_first) / secs : 0.0,
           messages ? (double)wire_bytes / (double)messages : 0.0, gaps, dup_or_back,
           pct(0.5), pct(0.99), pct(0.999), lat_samples, cpu_seconds() - cpu0);
    /* Latency CDF points [quantile, ms] for the plots. */
    static const double qs[] = {0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                                0.95, 0.99, 0.995, 0.999, 0.9999};
    for (size_t i = 0; i < sizeof qs / sizeof qs[0]; i++)
        printf("%s[%g, %.3f]", i ? ", " : "", qs[i], pct(qs[i]));
    printf("]}\n");
    fflush(stdout);
    return 0;
}
