/* pccl_py native I/O loops: move one frame's bytes between a socket and a buffer with no
 * Python in between, so an I/O thread holds the GIL once per frame, not once per read.
 *
 * Apart from the kernels (kernels.h), which know nothing about sockets. The socket is
 * non-blocking (it is shared with an event loop); these loops wait in poll() for at most
 * timeout_ms at a time and then return what they did, so the caller can look for a stop
 * request and call again; `stop` (may be NULL) is a byte another thread sets to make the
 * loop return before its next system call. Return codes: 0 done, 1 poll timed out or
 * stopped (call again, or not), -1 error (errno set), -2 the peer closed the connection
 * (end of file before the buffer was full), -3 the frame's seal failed (libcrypto).
 */
#ifndef PCCL_IO_H
#define PCCL_IO_H

#include <stddef.h>

#include "kernels.h"
#include "seal.h"

/* A reduction that follows a receive: a[i] = a[i] (op) b[i] over the bytes received so far,
 * in pieces of at least 64 KiB and at the end; `done` bytes are already reduced. */
typedef struct {
    char *a;
    const char *b;
    size_t item;
    pccl_op op;
    pccl_dtype dt;
    size_t done;
} pccl_reduce_job;

/* Fill buf[*pos, n) from fd; *pos advances; `seal` (may be NULL) absorbs (or decrypts in
 * place) each byte as it arrives, then `red` (may be NULL) reduces. */
int pccl_recv_fill(int fd, char *buf, size_t n, size_t *pos, int timeout_ms, pccl_reduce_job *red,
                   pccl_seal *seal, const unsigned char *stop);

/* Send h[0, hn) then p[0, pn) (one writev per attempt); *sent counts both; MSG_NOSIGNAL.
 * With a `seal` (begun for this frame), every byte sent is absorbed (an encrypting seal
 * has taken the header already, and the payload is sent encrypted from the seal's own
 * buffer), and the frame's tag
 * (PCCL_SEAL_TAG bytes, kept by the seal across calls) follows the payload; *sent then
 * counts it too. */
int pccl_send_all(int fd, const char *h, size_t hn, const char *p, size_t pn, size_t *sent, int timeout_ms,
                  pccl_seal *seal, const unsigned char *stop);

#endif
