# C externs the core and the load generator share (as uvloop keeps its
# externs in includes/system.pxd): sockets, scatter writes, epoll. Logic
# lives in pyx/core and pyx/loadgen; nothing here has a body.

from libc.stdint cimport uint32_t, uint64_t

cdef extern from "<sys/socket.h>" nogil:
    ssize_t c_send "send"(int fd, const void* buf, size_t n, int flags)
    ssize_t c_recv "recv"(int fd, void* buf, size_t n, int flags)
    int c_shutdown "shutdown"(int fd, int how)
    enum: MSG_NOSIGNAL
    enum: MSG_DONTWAIT
    enum: SHUT_WR

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len
    ssize_t c_writev "writev"(int fd, const iovec* iov, int cnt)

cdef extern from "<unistd.h>" nogil:
    int c_close "close"(int fd)

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    enum: EPOLLIN
    enum: EPOLLOUT
    enum: EPOLLERR
    enum: EPOLLHUP
    enum: EPOLLET
    enum: EPOLLRDHUP
    enum: EPOLL_CTL_ADD
    enum: EPOLL_CTL_MOD
    enum: EPOLL_CTL_DEL
    enum: EPOLL_CLOEXEC
