/* Frame integrity of the data plane: AES-256-GCM from the system's OpenSSL (libcrypto),
 * loaded at run time, so building needs no OpenSSL headers and a machine without it still
 * runs (the Python side then uses the same cipher through `cryptography`).
 *
 * A pccl_seal is one direction of one connection: a key, and a cipher context reused
 * frame after frame. Per frame: begin(iv), absorb every byte of the frame (header and
 * payload: GCM's associated data, so nothing is encrypted and the tag is a GMAC), then
 * tag() on the sending side or check() on the receiving side. Absorbing may be split at
 * any byte boundary, across calls and threads (one thread at a time).
 */
#ifndef PCCL_SEAL_H
#define PCCL_SEAL_H

#include <stddef.h>

#define PCCL_SEAL_KEY 32
#define PCCL_SEAL_IV 12
#define PCCL_SEAL_TAG 16

typedef struct pccl_seal pccl_seal;

/* NULL when libcrypto cannot be loaded; pccl_seal_error() says why. */
const char *pccl_seal_error(void);
pccl_seal *pccl_seal_new(const unsigned char *key, int sending);
void pccl_seal_free(pccl_seal *s);
/* 0 on success, -1 on a libcrypto failure or a call out of order */
int pccl_seal_begin(pccl_seal *s, const unsigned char *iv);
int pccl_seal_absorb(pccl_seal *s, const void *data, size_t n);
/* sending side: the frame's tag (the same tag again if called twice for one frame) */
int pccl_seal_tag(pccl_seal *s, unsigned char *tag);
/* receiving side: 1 if the tag matches what was absorbed, 0 if not, -1 on failure */
int pccl_seal_check(pccl_seal *s, const unsigned char *tag);

#endif
