/* Native I/O loops of the data plane's threads (see io.h). */
#include "io.h"

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define REDUCE_STEP 65536

static int stopped(const unsigned char *stop) {
    return stop != NULL && __atomic_load_n(stop, __ATOMIC_RELAXED) != 0;
}

static void reduce_upto(pccl_reduce_job *red, size_t pos, size_t n) {
    size_t k = pos - pos % red->item;
    if (k > red->done && (k - red->done >= REDUCE_STEP || k == n)) {
        pccl_reduce(red->a + red->done, red->b + red->done, (k - red->done) / red->item, red->op, red->dt);
        red->done = k;
    }
}

/* 0: fd is ready (or in error: the next call says which), 1: timed out, -1: poll failed */
static int wait_for(int fd, short events, int timeout_ms) {
    for (;;) {
        struct pollfd p = {fd, events, 0};
        int k = poll(&p, 1, timeout_ms);
        if (k > 0) return 0;
        if (k == 0) return 1;
        if (errno != EINTR) return -1;
    }
}

int pccl_recv_fill(int fd, char *buf, size_t n, size_t *pos, int timeout_ms, pccl_reduce_job *red,
                   pccl_seal *seal, const unsigned char *stop) {
    while (*pos < n) {
        if (stopped(stop)) return 1;
        ssize_t r = recv(fd, buf + *pos, n - *pos, 0);
        if (r > 0) {
            /* into the frame's tag (decrypted in place) before anything reads the bytes */
            if (seal != NULL) {
                int bad = pccl_seal_encrypting(seal) ? pccl_seal_crypt(seal, buf + *pos, buf + *pos, (size_t)r)
                                                     : pccl_seal_absorb(seal, buf + *pos, (size_t)r);
                if (bad < 0) return -3;
            }
            *pos += (size_t)r;
            if (red != NULL) reduce_upto(red, *pos, n);
            continue;
        }
        if (r == 0) return -2;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
        int w = wait_for(fd, POLLIN, timeout_ms);
        if (w != 0) return w;
    }
    if (red != NULL) reduce_upto(red, n, n);
    return 0;
}

/* the bytes [from, to) of header + payload, into the frame's tag */
static int absorb_sent(pccl_seal *seal, const char *h, size_t hn, const char *p, size_t from, size_t to) {
    if (from < hn) {
        size_t k = (to < hn ? to : hn) - from;
        if (pccl_seal_absorb(seal, h + from, k) < 0) return -1;
        from += k;
    }
    if (from < to && pccl_seal_absorb(seal, p + (from - hn), to - from) < 0) return -1;
    return 0;
}

#define CRYPT_CHUNK (256 * 1024)

/* send_all with an encrypting seal, which has taken the header already (its caller made
 * it associated data and encrypted its quantization fields): the header as given, the
 * payload encrypted a chunk at a time into the seal's scratch (the caller's memory is
 * never written), then the tag. */
static int send_encrypted(int fd, const char *h, size_t hn, const char *p, size_t pn, size_t *sent,
                          int timeout_ms, pccl_seal *seal, const unsigned char *stop) {
    unsigned char tag[PCCL_SEAL_TAG];
    unsigned char *scratch = pccl_seal_scratch(seal, CRYPT_CHUNK);
    pccl_seal_window *win = pccl_seal_window_of(seal);
    size_t body = hn + pn, total = body + PCCL_SEAL_TAG;
    if (scratch == NULL) return -3;
    while (*sent < total) {
        if (stopped(stop)) return 1;
        const unsigned char *base;
        size_t len;
        if (*sent < hn) {
            base = (const unsigned char *)h + *sent;
            len = hn - *sent;
        } else if (*sent < body) {
            size_t off = *sent - hn;
            if (off == win->to) {  /* all ciphertext so far is out: the next chunk */
                size_t k = pn - off < CRYPT_CHUNK ? pn - off : CRYPT_CHUNK;
                if (pccl_seal_crypt(seal, p + off, scratch, k) < 0) return -3;
                win->from = off;
                win->to = off + k;
            }
            base = scratch + (off - win->from);
            len = win->to - off;
        } else {
            if (pccl_seal_tag(seal, tag) < 0) return -3;
            base = tag + (*sent - body);
            len = total - *sent;
        }
        ssize_t r = send(fd, base, len, MSG_NOSIGNAL);
        if (r > 0) {
            *sent += (size_t)r;
            continue;
        }
        if (r == 0) return 1;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
        int w = wait_for(fd, POLLOUT, timeout_ms);
        if (w != 0) return w;
    }
    return 0;
}

int pccl_send_all(int fd, const char *h, size_t hn, const char *p, size_t pn, size_t *sent, int timeout_ms,
                  pccl_seal *seal, const unsigned char *stop) {
    if (seal != NULL && pccl_seal_encrypting(seal)) return send_encrypted(fd, h, hn, p, pn, sent, timeout_ms, seal, stop);
    unsigned char tag[PCCL_SEAL_TAG];
    size_t body = hn + pn, total = body + (seal != NULL ? PCCL_SEAL_TAG : 0);
    while (*sent < total) {
        if (stopped(stop)) return 1;
        struct iovec iov[2];
        int cnt = 0;
        if (*sent < hn) {
            iov[cnt].iov_base = (void *)(h + *sent);
            iov[cnt++].iov_len = hn - *sent;
            if (pn) {
                iov[cnt].iov_base = (void *)p;
                iov[cnt++].iov_len = pn;
            }
        } else if (*sent < body) {
            iov[cnt].iov_base = (void *)(p + (*sent - hn));
            iov[cnt++].iov_len = body - *sent;
        } else {  /* everything absorbed: the tag follows (computed once per frame) */
            if (pccl_seal_tag(seal, tag) < 0) return -3;
            iov[cnt].iov_base = (void *)(tag + (*sent - body));
            iov[cnt++].iov_len = total - *sent;
        }
        struct msghdr m = {0};
        m.msg_iov = iov;
        m.msg_iovlen = (size_t)cnt;
        ssize_t r = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (r > 0) {
            size_t to = *sent + (size_t)r;
            if (seal != NULL && *sent < body && absorb_sent(seal, h, hn, p, *sent, to < body ? to : body) < 0)
                return -3;
            *sent = to;
            continue;
        }
        if (r == 0) return 1;  /* nothing taken and no error: let the caller look again */
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
        int w = wait_for(fd, POLLOUT, timeout_ms);
        if (w != 0) return w;
    }
    return 0;
}
