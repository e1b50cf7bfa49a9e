/* AES-256-GCM frame tags through libcrypto loaded with dlopen (see seal.h). Only the
 * stable EVP entry points are used, declared here so no OpenSSL headers are needed. */
#include "seal.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct evp_ctx EVP_CIPHER_CTX;
typedef struct evp_cipher EVP_CIPHER;
typedef struct engine ENGINE;

#define EVP_CTRL_GCM_GET_TAG 0x10
#define EVP_CTRL_GCM_SET_TAG 0x11

static struct {
    EVP_CIPHER_CTX *(*ctx_new)(void);
    void (*ctx_free)(EVP_CIPHER_CTX *);
    const EVP_CIPHER *(*aes_256_gcm)(void);
    int (*init)(EVP_CIPHER_CTX *, const EVP_CIPHER *, ENGINE *, const unsigned char *, const unsigned char *, int);
    int (*update)(EVP_CIPHER_CTX *, unsigned char *, int *, const unsigned char *, int);
    int (*final)(EVP_CIPHER_CTX *, unsigned char *, int *);
    int (*ctrl)(EVP_CIPHER_CTX *, int, int, void *);
} evp;

static pthread_once_t once = PTHREAD_ONCE_INIT;
static char load_error[256];
static int loaded;

static void load(void) {
    /* the interpreter's hashlib/ssl usually has it loaded already */
    static const char *const names[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so", NULL};
    void *h = NULL;
    for (int i = 0; names[i] != NULL && h == NULL; i++) h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        snprintf(load_error, sizeof load_error, "libcrypto not found: %s", dlerror());
        return;
    }
    struct { void **slot; const char *name; } syms[] = {
        {(void **)&evp.ctx_new, "EVP_CIPHER_CTX_new"},   {(void **)&evp.ctx_free, "EVP_CIPHER_CTX_free"},
        {(void **)&evp.aes_256_gcm, "EVP_aes_256_gcm"},  {(void **)&evp.init, "EVP_CipherInit_ex"},
        {(void **)&evp.update, "EVP_CipherUpdate"},      {(void **)&evp.final, "EVP_CipherFinal_ex"},
        {(void **)&evp.ctrl, "EVP_CIPHER_CTX_ctrl"},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
        *syms[i].slot = dlsym(h, syms[i].name);
        if (*syms[i].slot == NULL) {
            snprintf(load_error, sizeof load_error, "libcrypto lacks %s", syms[i].name);
            return;
        }
    }
    loaded = 1;
}

const char *pccl_seal_error(void) {
    pthread_once(&once, load);
    return loaded ? NULL : load_error;
}

enum { IDLE, ABSORBING, CRYPTING, DONE };

struct pccl_seal {
    EVP_CIPHER_CTX *ctx;
    int sending;
    int encrypting;
    int state;
    unsigned char tag[PCCL_SEAL_TAG];
    unsigned char *scratch;
    size_t scratch_len;
    pccl_seal_window window;
};

pccl_seal *pccl_seal_new(const unsigned char *key, int sending, int encrypting) {
    if (pccl_seal_error() != NULL) return NULL;
    pccl_seal *s = calloc(1, sizeof *s);
    if (s == NULL) return NULL;
    s->ctx = evp.ctx_new();
    s->sending = sending ? 1 : 0;
    s->encrypting = encrypting ? 1 : 0;
    /* the key schedule once; each frame then sets only its IV */
    if (s->ctx == NULL || evp.init(s->ctx, evp.aes_256_gcm(), NULL, key, NULL, s->sending) != 1) {
        pccl_seal_free(s);
        return NULL;
    }
    return s;
}

void pccl_seal_free(pccl_seal *s) {
    if (s == NULL) return;
    if (s->ctx != NULL) evp.ctx_free(s->ctx);
    free(s->scratch);
    free(s);
}

int pccl_seal_encrypting(const pccl_seal *s) { return s->encrypting; }

pccl_seal_window *pccl_seal_window_of(pccl_seal *s) { return &s->window; }

unsigned char *pccl_seal_scratch(pccl_seal *s, size_t n) {
    if (s->scratch_len < n) {
        unsigned char *p = realloc(s->scratch, n);
        if (p == NULL) return NULL;
        s->scratch = p;
        s->scratch_len = n;
    }
    return s->scratch;
}

int pccl_seal_begin(pccl_seal *s, const unsigned char *iv) {
    if (evp.init(s->ctx, NULL, NULL, NULL, iv, s->sending) != 1) return -1;
    s->state = ABSORBING;
    s->window.from = s->window.to = 0;
    return 0;
}

int pccl_seal_absorb(pccl_seal *s, const void *data, size_t n) {
    if (s->state != ABSORBING) return -1;
    const unsigned char *p = data;
    while (n > 0) {  /* EVP takes int lengths */
        int k = n > (1u << 30) ? (1 << 30) : (int)n, out = 0;
        if (evp.update(s->ctx, NULL, &out, p, k) != 1) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

int pccl_seal_crypt(pccl_seal *s, const void *in, void *out, size_t n) {
    if (!s->encrypting || (s->state != ABSORBING && s->state != CRYPTING)) return -1;
    s->state = CRYPTING;
    const unsigned char *p = in;
    unsigned char *q = out;
    while (n > 0) {
        int k = n > (1u << 30) ? (1 << 30) : (int)n, got = 0;
        if (evp.update(s->ctx, q, &got, p, k) != 1 || got != k) return -1;  /* GCM: bytes in, bytes out */
        p += k;
        q += k;
        n -= (size_t)k;
    }
    return 0;
}

int pccl_seal_tag(pccl_seal *s, unsigned char *tag) {
    if (!s->sending) return -1;
    if (s->state == ABSORBING || s->state == CRYPTING) {
        unsigned char none[16];
        int out = 0;
        if (evp.final(s->ctx, none, &out) != 1) return -1;
        if (evp.ctrl(s->ctx, EVP_CTRL_GCM_GET_TAG, PCCL_SEAL_TAG, s->tag) != 1) return -1;
        s->state = DONE;
    }
    if (s->state != DONE) return -1;
    memcpy(tag, s->tag, PCCL_SEAL_TAG);
    return 0;
}

int pccl_seal_check(pccl_seal *s, const unsigned char *tag) {
    if (s->sending || (s->state != ABSORBING && s->state != CRYPTING)) return -1;
    unsigned char copy[PCCL_SEAL_TAG], none[16];
    int out = 0;
    memcpy(copy, tag, PCCL_SEAL_TAG);
    s->state = DONE;
    if (evp.ctrl(s->ctx, EVP_CTRL_GCM_SET_TAG, PCCL_SEAL_TAG, copy) != 1) return -1;
    return evp.final(s->ctx, none, &out) == 1 ? 1 : 0;  /* OpenSSL compares in constant time */
}
