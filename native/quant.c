/* Min-max affine quantization of float32 to 8-bit and 4-bit codes, and the way back.
 *
 * The rule (docs/kernels.md has the full statement; pccl_py/reference.py is the
 * executable twin):
 *   lo = min(x), hi = max(x) (float32; a -0.0 result is turned into +0.0)
 *   any NaN or +-inf in x, or a range r = hi - lo that overflows float32 (|x| near 3.4e38):
 *       codes all 0, lo = scale = NaN (the chunk decodes to NaN, as its sum would overflow)
 *   r == 0 (constant chunk): codes all 0, scale = 0 (decodes to lo exactly)
 *   scale = r / M (float32; M = 255 or 15)
 *   fast rule (inv = M / r finite in float32, i.e. r >= ~7.5e-37 for M = 255):
 *       code = trunc(clamp((x - lo) * inv + 0.5, 0, M))   every step a float32 op
 *   wide rule (tiny ranges whose inv overflows float32), in float64:
 *       code = trunc(clamp(((double)x - (double)lo) * (M / ((double)hi - (double)lo)) + 0.5, 0, M))
 *   decode: y = code * scale + lo (float32, two roundings, no FMA)
 *
 * The two passes over x (min/max, then codes) have plain C, SSE2 and AVX2 versions that
 * compute the same bits (see dispatch.h).
 */
#include <math.h>

#include "dispatch.h"
#include "kernels.h"
#include "numeric.h"

#if PCCL_X86
#include <immintrin.h>
#endif

/* ---- pass 1: min, max, and "is everything finite" ----------------------------------- */

#define LANES 16

/* min and max of x; returns 0 if some value is NaN or infinite. n may be 0. */
static int minmax_generic(const f32_u *restrict x, size_t n, float *plo, float *phi) {
    float mn[LANES], mx[LANES], ck[LANES];
    for (int j = 0; j < LANES; j++) { mn[j] = INFINITY; mx[j] = -INFINITY; ck[j] = 0.0f; }
    size_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        for (int j = 0; j < LANES; j++) {
            float v = x[i + j];
            mn[j] = v < mn[j] ? v : mn[j];
            mx[j] = v > mx[j] ? v : mx[j];
            ck[j] = ck[j] + (v - v); /* 0 for finite v, NaN for NaN or inf: sticky */
        }
    }
    for (; i < n; i++) {
        float v = x[i];
        mn[0] = v < mn[0] ? v : mn[0];
        mx[0] = v > mx[0] ? v : mx[0];
        ck[0] = ck[0] + (v - v);
    }
    float lo = mn[0], hi = mx[0], c = ck[0];
    for (int j = 1; j < LANES; j++) {
        lo = mn[j] < lo ? mn[j] : lo;
        hi = mx[j] > hi ? mx[j] : hi;
        c = c + ck[j];
    }
    *plo = lo;
    *phi = hi;
    return c == 0.0f;
}

#if PCCL_X86
static int minmax_sse2(const f32_u *x, size_t n, float *plo, float *phi) {
    const float *p = (const float *)x;
    __m128 mn0 = _mm_set1_ps(INFINITY), mn1 = mn0, mn2 = mn0, mn3 = mn0;
    __m128 mx0 = _mm_set1_ps(-INFINITY), mx1 = mx0, mx2 = mx0, mx3 = mx0;
    __m128 nan = _mm_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128 a = _mm_loadu_ps(p + i), b = _mm_loadu_ps(p + i + 4);
        __m128 c = _mm_loadu_ps(p + i + 8), d = _mm_loadu_ps(p + i + 12);
        mn0 = _mm_min_ps(mn0, a); mn1 = _mm_min_ps(mn1, b);
        mn2 = _mm_min_ps(mn2, c); mn3 = _mm_min_ps(mn3, d);
        mx0 = _mm_max_ps(mx0, a); mx1 = _mm_max_ps(mx1, b);
        mx2 = _mm_max_ps(mx2, c); mx3 = _mm_max_ps(mx3, d);
        nan = _mm_or_ps(nan, _mm_or_ps(_mm_cmpunord_ps(a, b), _mm_cmpunord_ps(c, d)));
    }
    float lo, hi;
    int finite = minmax_generic(x + i, n - i, &lo, &hi);
    float m[16];
    _mm_storeu_ps(m, _mm_min_ps(_mm_min_ps(mn0, mn1), _mm_min_ps(mn2, mn3)));
    _mm_storeu_ps(m + 4, _mm_max_ps(_mm_max_ps(mx0, mx1), _mm_max_ps(mx2, mx3)));
    for (int j = 0; j < 4; j++) {
        lo = m[j] < lo ? m[j] : lo;
        hi = m[4 + j] > hi ? m[4 + j] : hi;
    }
    *plo = lo;
    *phi = hi;
    /* infinities are caught by the caller's finite check of lo and hi */
    return finite && _mm_movemask_ps(nan) == 0 && isfinite(lo) && isfinite(hi);
}

__attribute__((target("avx2"))) static int minmax_avx2(const f32_u *x, size_t n, float *plo,
                                                       float *phi) {
    const float *p = (const float *)x;
    __m256 mn0 = _mm256_set1_ps(INFINITY), mn1 = mn0, mn2 = mn0, mn3 = mn0;
    __m256 mx0 = _mm256_set1_ps(-INFINITY), mx1 = mx0, mx2 = mx0, mx3 = mx0;
    __m256 nan = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 a = _mm256_loadu_ps(p + i), b = _mm256_loadu_ps(p + i + 8);
        __m256 c = _mm256_loadu_ps(p + i + 16), d = _mm256_loadu_ps(p + i + 24);
        mn0 = _mm256_min_ps(mn0, a); mn1 = _mm256_min_ps(mn1, b);
        mn2 = _mm256_min_ps(mn2, c); mn3 = _mm256_min_ps(mn3, d);
        mx0 = _mm256_max_ps(mx0, a); mx1 = _mm256_max_ps(mx1, b);
        mx2 = _mm256_max_ps(mx2, c); mx3 = _mm256_max_ps(mx3, d);
        nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q),
                                             _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
    }
    float lo, hi;
    int finite = minmax_generic(x + i, n - i, &lo, &hi);
    float m[16];
    _mm256_storeu_ps(m, _mm256_min_ps(_mm256_min_ps(mn0, mn1), _mm256_min_ps(mn2, mn3)));
    _mm256_storeu_ps(m + 8, _mm256_max_ps(_mm256_max_ps(mx0, mx1), _mm256_max_ps(mx2, mx3)));
    for (int j = 0; j < 8; j++) {
        lo = m[j] < lo ? m[j] : lo;
        hi = m[8 + j] > hi ? m[8 + j] : hi;
    }
    *plo = lo;
    *phi = hi;
    return finite && _mm256_movemask_ps(nan) == 0 && isfinite(lo) && isfinite(hi);
}
#endif

static int minmax(const f32_u *x, size_t n, float *plo, float *phi) {
    int ok;
#if PCCL_X86
    if (pccl_isa >= PCCL_ISA_AVX2)
        ok = minmax_avx2(x, n, plo, phi);
    else if (pccl_isa >= PCCL_ISA_SSE2)
        ok = minmax_sse2(x, n, plo, phi);
    else
#endif
        ok = minmax_generic(x, n, plo, phi);
    /* -0.0 -> +0.0: the result must not depend on which lane saw which zero */
    *plo = *plo + 0.0f;
    *phi = *phi + 0.0f;
    return ok;
}

/* ---- pass 2: codes, one per byte ---------------------------------------------------- */

static void codes_generic(const f32_u *restrict x, size_t n, float lo, float inv, float maxc,
                          uint8_t *restrict out) {
    for (size_t i = 0; i < n; i++) {
        float v = (x[i] - lo) * inv + 0.5f;
        v = v > 0.0f ? v : 0.0f; /* also maps NaN to 0 */
        v = v < maxc ? v : maxc;
        out[i] = (uint8_t)(int32_t)v;
    }
}

#if PCCL_X86
/* _mm_max_ps(v, 0) is exactly v > 0 ? v : 0 and _mm_min_ps(v, M) is v < M ? v : M. */
typedef struct {
    __m128 lo, inv, half, zero, maxc;
} qk_sse2;

static inline __m128i q4_sse2(const qk_sse2 *k, const float *p) {
    __m128 v = _mm_add_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(p), k->lo), k->inv), k->half);
    return _mm_cvttps_epi32(_mm_min_ps(_mm_max_ps(v, k->zero), k->maxc));
}

/* 16 codes, in order, one per byte */
static inline __m128i q16_sse2(const qk_sse2 *k, const float *p) {
    __m128i q0 = q4_sse2(k, p), q1 = q4_sse2(k, p + 4), q2 = q4_sse2(k, p + 8), q3 = q4_sse2(k, p + 12);
    return _mm_packus_epi16(_mm_packs_epi32(q0, q1), _mm_packs_epi32(q2, q3));
}

/* byte pairs (even, odd) of 4-bit codes -> even | odd << 4 in the low byte of each 16-bit lane */
static inline __m128i nib16_sse2(__m128i c) {
    return _mm_or_si128(_mm_and_si128(c, _mm_set1_epi16(0x00FF)),
                        _mm_and_si128(_mm_srli_epi16(c, 4), _mm_set1_epi16(0x00F0)));
}

static qk_sse2 qk_sse2_make(float lo, float inv, float maxc) {
    qk_sse2 k = {_mm_set1_ps(lo), _mm_set1_ps(inv), _mm_set1_ps(0.5f), _mm_setzero_ps(),
                 _mm_set1_ps(maxc)};
    return k;
}

static size_t codes_sse2(const f32_u *x, size_t n, float lo, float inv, float maxc, uint8_t *out) {
    const float *p = (const float *)x;
    const qk_sse2 k = qk_sse2_make(lo, inv, maxc);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) _mm_storeu_si128((__m128i *)(void *)(out + i), q16_sse2(&k, p + i));
    return i;
}

/* 4-bit codes packed two per byte; returns how many values it did (a multiple of 32) */
static size_t codes4_sse2(const f32_u *x, size_t n, float lo, float inv, uint8_t *out) {
    const float *p = (const float *)x;
    const qk_sse2 k = qk_sse2_make(lo, inv, 15.0f);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m128i a = nib16_sse2(q16_sse2(&k, p + i)), b = nib16_sse2(q16_sse2(&k, p + i + 16));
        _mm_storeu_si128((__m128i *)(void *)(out + i / 2), _mm_packus_epi16(a, b));
    }
    return i;
}

#define AVX2 __attribute__((target("avx2")))

typedef struct {
    __m256 lo, inv, half, zero, maxc;
} qk_avx2;

AVX2 static inline __m256i q8_avx2(const qk_avx2 *k, const float *p) {
    __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(p), k->lo), k->inv), k->half);
    return _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(v, k->zero), k->maxc));
}

/* 32 codes, in order, one per byte */
AVX2 static inline __m256i q32_avx2(const qk_avx2 *k, const float *p) {
    __m256i q0 = q8_avx2(k, p), q1 = q8_avx2(k, p + 8), q2 = q8_avx2(k, p + 16), q3 = q8_avx2(k, p + 24);
    __m256i w = _mm256_packus_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
    /* the packs work per 128-bit lane: dwords come out as q0a q1a q2a q3a q0b q1b q2b q3b */
    return _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

AVX2 static inline __m256i nib32_avx2(__m256i c) {
    return _mm256_or_si256(_mm256_and_si256(c, _mm256_set1_epi16(0x00FF)),
                           _mm256_and_si256(_mm256_srli_epi16(c, 4), _mm256_set1_epi16(0x00F0)));
}

AVX2 static qk_avx2 qk_avx2_make(float lo, float inv, float maxc) {
    qk_avx2 k = {_mm256_set1_ps(lo), _mm256_set1_ps(inv), _mm256_set1_ps(0.5f),
                 _mm256_setzero_ps(), _mm256_set1_ps(maxc)};
    return k;
}

AVX2 static size_t codes_avx2(const f32_u *x, size_t n, float lo, float inv, float maxc,
                              uint8_t *out) {
    const float *p = (const float *)x;
    const qk_avx2 k = qk_avx2_make(lo, inv, maxc);
    size_t i = 0;
    for (; i + 32 <= n; i += 32)
        _mm256_storeu_si256((__m256i *)(void *)(out + i), q32_avx2(&k, p + i));
    return i;
}

AVX2 static size_t codes4_avx2(const f32_u *x, size_t n, float lo, float inv, uint8_t *out) {
    const float *p = (const float *)x;
    const qk_avx2 k = qk_avx2_make(lo, inv, 15.0f);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m256i a = nib32_avx2(q32_avx2(&k, p + i)), b = nib32_avx2(q32_avx2(&k, p + i + 32));
        __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi16(a, b), 0xD8);
        _mm256_storeu_si256((__m256i *)(void *)(out + i / 2), w);
    }
    return i;
}
#endif

static void codes_fast(const f32_u *x, size_t n, float lo, float inv, float maxc, uint8_t *out) {
    size_t done = 0;
#if PCCL_X86
    if (pccl_isa >= PCCL_ISA_AVX2)
        done = codes_avx2(x, n, lo, inv, maxc, out);
    else if (pccl_isa >= PCCL_ISA_SSE2)
        done = codes_sse2(x, n, lo, inv, maxc, out);
#endif
    codes_generic(x + done, n - done, lo, inv, maxc, out + done);
}

/* wide rule (rare: ranges so small that M / r overflows float32) */
static void codes_wide(const f32_u *restrict x, size_t n, double lo, double inv, double maxc,
                       uint8_t *restrict out) {
    for (size_t i = 0; i < n; i++) {
        double v = ((double)x[i] - lo) * inv + 0.5;
        v = v > 0.0 ? v : 0.0;
        v = v < maxc ? v : maxc;
        out[i] = (uint8_t)(int32_t)v;
    }
}

/* ---- the plan: lo, scale and which rule ---------------------------------------------- */

typedef struct {
    int mode; /* 0: all codes zero, 1: fast rule, 2: wide rule */
    float lo, scale, inv;
    double lo_d, inv_d;
} qparams;

static qparams plan(const f32_u *x, size_t n, float maxc) {
    qparams p = {0, 0.0f, 0.0f, 0.0f, 0.0, 0.0};
    if (n == 0) return p;
    float lo, hi;
    int finite = minmax(x, n, &lo, &hi);
    float r = hi - lo;
    if (!finite || !isfinite(r)) {
        p.lo = NAN;
        p.scale = NAN;
        return p;
    }
    p.lo = lo;
    if (r == 0.0f) return p;
    p.scale = r / maxc;
    float inv = maxc / r;
    if (isfinite(inv)) {
        p.mode = 1;
        p.inv = inv;
        return p;
    }
    p.mode = 2;
    p.lo_d = (double)lo;
    p.inv_d = (double)maxc / ((double)hi - (double)lo);
    return p;
}

static void codes_any(const qparams *p, const f32_u *x, size_t n, float maxc, uint8_t *out) {
    if (p->mode == 1)
        codes_fast(x, n, p->lo, p->inv, maxc, out);
    else if (p->mode == 2)
        codes_wide(x, n, p->lo_d, p->inv_d, (double)maxc, out);
    else
        memset(out, 0, n);
}

void pccl_quantize_u8(const void *src, size_t n, uint8_t *codes, float *lo, float *scale) {
    const f32_u *x = (const f32_u *)src;
    qparams p = plan(x, n, 255.0f);
    codes_any(&p, x, n, 255.0f, codes);
    *lo = p.lo;
    *scale = p.scale;
}

#define U4_BLOCK 2048

static void pack_nibbles(const uint8_t *restrict tmp, size_t pairs, uint8_t *restrict out) {
    for (size_t j = 0; j < pairs; j++) out[j] = (uint8_t)(tmp[2 * j] | (tmp[2 * j + 1] << 4));
}

void pccl_quantize_u4(const void *src, size_t n, uint8_t *codes, float *lo, float *scale) {
    const f32_u *x = (const f32_u *)src;
    qparams p = plan(x, n, 15.0f);
    *lo = p.lo;
    *scale = p.scale;
    if (p.mode == 0) {
        memset(codes, 0, (n + 1) / 2);
        return;
    }
    size_t i = 0;
#if PCCL_X86
    if (p.mode == 1 && pccl_isa >= PCCL_ISA_AVX2)
        i = codes4_avx2(x, n, p.lo, p.inv, codes);
    else if (p.mode == 1 && pccl_isa >= PCCL_ISA_SSE2)
        i = codes4_sse2(x, n, p.lo, p.inv, codes);
#endif
    /* the rest (everything at the generic level), in blocks through a small buffer;
     * i is even here, so the output byte offset is i / 2 */
    uint8_t tmp[U4_BLOCK];
    for (; i < n; i += U4_BLOCK) {
        size_t m = n - i < U4_BLOCK ? n - i : U4_BLOCK;
        codes_any(&p, x + i, m, 15.0f, tmp);
        if (m & 1) tmp[m] = 0; /* only on the last block: U4_BLOCK is even */
        pack_nibbles(tmp, (m + 1) / 2, codes + i / 2);
    }
}

/* ---- decode (plain C loops, compiled twice: baseline and AVX2) ----------------------- */

#define DEF_DECODE(SUFFIX)                                                                     \
    static void PCCL_CAT(deq_u8, SUFFIX)(const uint8_t *restrict c, float lo, float scale,     \
                                         f32_u *restrict d, size_t n) {                        \
        for (size_t i = 0; i < n; i++) d[i] = (float)c[i] * scale + lo;                        \
    }                                                                                          \
    static void PCCL_CAT(deq_add_u8, SUFFIX)(const uint8_t *restrict c, float lo, float scale,  \
                                             f32_u *restrict d, size_t n) {                    \
        _Pragma("GCC unroll 2")                                                                \
        for (size_t i = 0; i < n; i++) d[i] = d[i] + ((float)c[i] * scale + lo);               \
    }                                                                                          \
    static void PCCL_CAT(deq_u4, SUFFIX)(const uint8_t *restrict c, float lo, float scale,     \
                                         f32_u *restrict d, size_t n) {                        \
        size_t pairs = n / 2;                                                                  \
        for (size_t j = 0; j < pairs; j++) {                                                   \
            uint8_t b = c[j];                                                                  \
            d[2 * j] = (float)(b & 15) * scale + lo;                                           \
            d[2 * j + 1] = (float)(b >> 4) * scale + lo;                                       \
        }                                                                                      \
        if (n & 1) d[n - 1] = (float)(c[pairs] & 15) * scale + lo;                             \
    }                                                                                          \
    static void PCCL_CAT(deq_add_u4, SUFFIX)(const uint8_t *restrict c, float lo, float scale,  \
                                             f32_u *restrict d, size_t n) {                    \
        size_t pairs = n / 2;                                                                  \
        for (size_t j = 0; j < pairs; j++) {                                                   \
            uint8_t b = c[j];                                                                  \
            d[2 * j] = d[2 * j] + ((float)(b & 15) * scale + lo);                              \
            d[2 * j + 1] = d[2 * j + 1] + ((float)(b >> 4) * scale + lo);                      \
        }                                                                                      \
        if (n & 1) d[n - 1] = d[n - 1] + ((float)(c[pairs] & 15) * scale + lo);                \
    }

DEF_DECODE(_generic)

#if PCCL_X86
#pragma GCC push_options
#pragma GCC target("avx2")
DEF_DECODE(_avx2)

/* 4-bit decode, 32 values per 16 code bytes; (add ? dst + v : v) with v = code*scale + lo.
 * Returns how many values it did (a multiple of 32). */
static inline size_t deq4_avx2_body(const uint8_t *c, float lo, float scale, float *d, size_t n,
                                    int add) {
    const __m256 vs = _mm256_set1_ps(scale), vl = _mm256_set1_ps(lo);
    const __m128i m = _mm_set1_epi8(0x0F);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(c + i / 2));
        __m128i l4 = _mm_and_si128(b, m), h4 = _mm_and_si128(_mm_srli_epi16(b, 4), m);
        __m128i e0 = _mm_unpacklo_epi8(l4, h4), e1 = _mm_unpackhi_epi8(l4, h4);
        __m128i g[4] = {e0, _mm_srli_si128(e0, 8), e1, _mm_srli_si128(e1, 8)};
        for (int k = 0; k < 4; k++) {
            __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(g[k]));
            v = _mm256_add_ps(_mm256_mul_ps(v, vs), vl);
            if (add) v = _mm256_add_ps(_mm256_loadu_ps(d + i + 8 * k), v);
            _mm256_storeu_ps(d + i + 8 * k, v);
        }
    }
    return i;
}
#pragma GCC pop_options

AVX2 static void deq_u4_fast(const uint8_t *c, float lo, float scale, f32_u *d, size_t n) {
    size_t i = deq4_avx2_body(c, lo, scale, (float *)d, n, 0);
    deq_u4_avx2(c + i / 2, lo, scale, d + i, n - i);
}

AVX2 static void deq_add_u4_fast(const uint8_t *c, float lo, float scale, f32_u *d, size_t n) {
    size_t i = deq4_avx2_body(c, lo, scale, (float *)d, n, 1);
    deq_add_u4_avx2(c + i / 2, lo, scale, d + i, n - i);
}

#define deq_u8_fast deq_u8_avx2
#define deq_add_u8_fast deq_add_u8_avx2

#define DECODE(name, ...)                                                                     \
    do {                                                                                       \
        if (pccl_isa >= PCCL_ISA_AVX2)                                                         \
            PCCL_CAT(name, _fast)(__VA_ARGS__);                                                \
        else                                                                                   \
            PCCL_CAT(name, _generic)(__VA_ARGS__);                                             \
    } while (0)
#else
#define DECODE(name, ...) PCCL_CAT(name, _generic)(__VA_ARGS__)
#endif

void pccl_dequantize_u8(const uint8_t *codes, float lo, float scale, void *dst, size_t n) {
    DECODE(deq_u8, codes, lo, scale, (f32_u *)dst, n);
}

void pccl_dequant_add_u8(const uint8_t *codes, float lo, float scale, void *dst, size_t n) {
    DECODE(deq_add_u8, codes, lo, scale, (f32_u *)dst, n);
}

void pccl_dequantize_u4(const uint8_t *codes, float lo, float scale, void *dst, size_t n) {
    DECODE(deq_u4, codes, lo, scale, (f32_u *)dst, n);
}

void pccl_dequant_add_u4(const uint8_t *codes, float lo, float scale, void *dst, size_t n) {
    DECODE(deq_add_u4, codes, lo, scale, (f32_u *)dst, n);
}
