/* Frame integrity of the data plane: AES-256-GCM from the system's OpenSSL (libcrypto),
 * loaded at run time, so building needs no OpenSSL headers and a machine without it still
 * runs (the Python side then uses the same cipher through `cryptography`).
 *
 * A pccl_seal is one direction of one connection: a key, and a cipher context reused
 * frame after frame. Per frame: begin(iv), absorb the header (GCM's associated data),
 * then the payload: absorbed too when the seal only authenticates (the tag is then a GMAC
 * and nothing is encrypted), or passed through crypt() when it also encrypts; then tag()
 * on the sending side or check() on the receiving side. Either may be split at any byte
 * boundary, across calls and threads (one thread at a time); absorb after crypt is an error.
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
pccl_seal *pccl_seal_new(const unsigned char *key, int sending, int encrypting);
/* whether payload bytes go through crypt() (else absorb()) */
int pccl_seal_encrypting(const pccl_seal *s);
void pccl_seal_free(pccl_seal *s);
/* 0 on success, -1 on a libcrypto failure or a call out of order */
int pccl_seal_begin(pccl_seal *s, const unsigned char *iv);
int pccl_seal_absorb(pccl_seal *s, const void *data, size_t n);
/* payload bytes: encrypted (sending) or decrypted (receiving) from in to out (may be equal) */
int pccl_seal_crypt(pccl_seal *s, const void *in, void *out, size_t n);
/* (sending, encrypting) a buffer of n bytes that lives as long as the seal, for ciphertext,
 * and which payload bytes [from, to) it holds now (reset by begin) */
typedef struct {
    size_t from, to;
} pccl_seal_window;
unsigned char *pccl_seal_scratch(pccl_seal *s, size_t n);
pccl_seal_window *pccl_seal_window_of(pccl_seal *s);
/* sending side: the frame's tag (the same tag again if called twice for one frame) */
int pccl_seal_tag(pccl_seal *s, unsigned char *tag);
/* receiving side: 1 if the tag matches what was absorbed, 0 if not, -1 on failure */
int pccl_seal_check(pccl_seal *s, const unsigned char *tag);

#endif
