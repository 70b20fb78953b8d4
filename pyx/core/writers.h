/* The core's writer threads (declared in writers.pxd, driven by rounds.pyx).
 *
 * Plain C with no Python API: a writer thread never takes the GIL, so the
 * event loop runs Python while the threads write. A round is an array of
 * (fd, bytes, length) items; the threads claim it in chunks of FO_CHUNK,
 * call send() on each item once (SSL_write through fo_tls_send() for a TLS
 * member, tlsio.h) and record what the kernel took (or -errno) in the
 * item. They never retry a short write and never touch an
 * item twice: the loop thread reconciles the results (backlogs, slow and
 * dead consumers) after the round is done.
 *
 * Memory the threads read (the fds, the frame buffers) is owned by the
 * loop thread, which keeps it alive and unchanged until the round comes
 * back: see rounds.pyx for that rule (and the one about closing fds).
 *
 * Completion: the thread that finishes a round's last chunk puts the round
 * on the done list and, if the list was empty, writes the pool's eventfd,
 * which the loop watches. Every hand-over goes through the pool mutex, so
 * the results a thread wrote are visible to whoever takes the round back.
 */
#ifndef FANOUT_WRITERS_H
#define FANOUT_WRITERS_H

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "tlsio.h"

#define FO_CHUNK 64          /* items a thread claims at a time */
#define FO_MAX_THREADS 64

typedef struct fo_write {
    int fd;
    SSL* ssl;                /* a TLS member's (tlsio.h), or NULL: plain send() */
    const char* buf;
    size_t len;
    ssize_t result;          /* bytes the kernel took, or -errno */
} fo_write;

typedef struct fo_round {
    fo_write* items;
    size_t n;
    size_t claimed;          /* items handed to threads (under the lock) */
    size_t finished;         /* items written (under the lock) */
    struct fo_round* next;   /* the pool's queue, then its done list */
    void* owner;             /* the loop side's object for this round */
} fo_round;

typedef struct fo_pool {
    pthread_mutex_t mu;
    pthread_cond_t work;     /* a round has items to claim, or stop */
    pthread_cond_t idle;     /* a round finished */
    fo_round* head;          /* rounds with items left to claim */
    fo_round* tail;
    fo_round* done;          /* finished rounds, newest first */
    size_t outstanding;      /* submitted and not yet finished */
    int efd;
    int stop;
    int nthreads;
    pthread_t threads[FO_MAX_THREADS];
} fo_pool;

static void fo_write_items(fo_write* it, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        ssize_t w;
        if (it[i].ssl != NULL) {
            it[i].result = fo_tls_send(it[i].ssl, it[i].buf, it[i].len);
            continue;
        }
        do {
            w = send(it[i].fd, it[i].buf, it[i].len, MSG_NOSIGNAL | MSG_DONTWAIT);
        } while (w < 0 && errno == EINTR);
        it[i].result = w < 0 ? -(ssize_t)errno : w;
    }
}

static void* fo_worker(void* arg)
{
    fo_pool* p = (fo_pool*)arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        fo_round* r;
        size_t start, cnt;
        while (p->head == NULL && !p->stop)
            pthread_cond_wait(&p->work, &p->mu);
        if (p->head == NULL)            /* stopping, and nothing left to write */
            break;
        r = p->head;
        start = r->claimed;
        cnt = r->n - start < FO_CHUNK ? r->n - start : FO_CHUNK;
        r->claimed += cnt;
        if (r->claimed == r->n) {       /* fully claimed: off the queue */
            p->head = r->next;
            if (p->head == NULL)
                p->tail = NULL;
            r->next = NULL;
        }
        pthread_mutex_unlock(&p->mu);
        fo_write_items(r->items + start, cnt);
        pthread_mutex_lock(&p->mu);
        r->finished += cnt;
        if (r->finished == r->n) {
            int was_empty = p->done == NULL;
            r->next = p->done;
            p->done = r;
            p->outstanding--;
            if (was_empty) {
                uint64_t one = 1;
                ssize_t ignored = write(p->efd, &one, sizeof one);
                (void)ignored;          /* a full counter already wakes the loop */
            }
            pthread_cond_broadcast(&p->idle);
        }
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void fo_pool_stop(fo_pool* p);

/* Start nthreads writers. NULL on failure, with errno set. */
static fo_pool* fo_pool_start(int nthreads)
{
    fo_pool* p;
    sigset_t all, old;
    int i, err;
    if (nthreads < 1 || nthreads > FO_MAX_THREADS) {
        errno = EINVAL;
        return NULL;
    }
    p = (fo_pool*)calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->efd < 0) {
        err = errno;
        free(p);
        errno = err;
        return NULL;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->idle, NULL);
    /* Signals stay with the main thread (Python handles them there): the
       writers start with every signal blocked. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (i = 0; i < nthreads; i++) {
        err = pthread_create(&p->threads[i], NULL, fo_worker, p);
        if (err != 0)
            break;
        p->nthreads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (p->nthreads < nthreads) {
        fo_pool_stop(p);
        errno = err;
        return NULL;
    }
    return p;
}

static int fo_pool_fd(fo_pool* p) { return p->efd; }

/* Queue a round (n >= 1) for the writers. */
static void fo_pool_submit(fo_pool* p, fo_round* r)
{
    r->claimed = r->finished = 0;
    r->next = NULL;
    pthread_mutex_lock(&p->mu);
    if (p->tail)
        p->tail->next = r;
    else
        p->head = r;
    p->tail = r;
    p->outstanding++;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
}

/* The finished rounds, oldest first, linked by next; NULL if none. The
   eventfd is cleared first, so a round finishing after the list is taken
   wakes the loop again. */
static fo_round* fo_pool_take_done(fo_pool* p)
{
    uint64_t count;
    fo_round *r, *fifo = NULL;
    ssize_t ignored = read(p->efd, &count, sizeof count);
    (void)ignored;                      /* EAGAIN: nothing was signalled */
    pthread_mutex_lock(&p->mu);
    r = p->done;
    p->done = NULL;
    pthread_mutex_unlock(&p->mu);
    while (r) {                         /* newest first -> oldest first */
        fo_round* next = r->next;
        r->next = fifo;
        fifo = r;
        r = next;
    }
    return fifo;
}

/* Block until every submitted round has finished (they may still wait on
   the done list). Call without the GIL. */
static void fo_pool_wait(fo_pool* p)
{
    pthread_mutex_lock(&p->mu);
    while (p->outstanding)
        pthread_cond_wait(&p->idle, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

/* Let the writers finish what is queued, join them, free the pool. Rounds
   still on the done list are the caller's to take back first. */
static void fo_pool_stop(fo_pool* p)
{
    int i;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    for (i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    close(p->efd);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->idle);
    free(p);
}

#endif
