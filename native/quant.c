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
 */
#include <math.h>

#include "kernels.h"
#include "numeric.h"

#define LANES 16

/* min and max of x (n >= 1); returns 0 if some value is NaN or infinite. */
static int minmax_f32(const f32_u *restrict x, size_t n, float *plo, float *phi) {
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
    *plo = lo + 0.0f; /* -0.0 -> +0.0: the result must not depend on lane order */
    *phi = hi + 0.0f;
    return c == 0.0f;
}

/* one code per byte, fast rule */
static void codes_fast(const f32_u *restrict x, size_t n, float lo, float inv, float maxc,
                       uint8_t *restrict out) {
    for (size_t i = 0; i < n; i++) {
        float v = (x[i] - lo) * inv + 0.5f;
        v = v > 0.0f ? v : 0.0f; /* also maps NaN to 0 */
        v = v < maxc ? v : maxc;
        out[i] = (uint8_t)(int32_t)v;
    }
}

/* one code per byte, wide rule (rare: ranges so small that M / r overflows float32) */
static void codes_wide(const f32_u *restrict x, size_t n, double lo, double inv, double maxc,
                       uint8_t *restrict out) {
    for (size_t i = 0; i < n; i++) {
        double v = ((double)x[i] - lo) * inv + 0.5;
        v = v > 0.0 ? v : 0.0;
        v = v < maxc ? v : maxc;
        out[i] = (uint8_t)(int32_t)v;
    }
}

typedef struct {
    int mode; /* 0: all codes zero, 1: fast, 2: wide */
    float lo, scale, inv;
    double lo_d, inv_d;
} qparams;

static qparams plan(const f32_u *x, size_t n, float maxc) {
    qparams p = {0, 0.0f, 0.0f, 0.0f, 0.0, 0.0};
    if (n == 0) return p;
    float lo, hi;
    if (!minmax_f32(x, n, &lo, &hi)) {
        p.lo = NAN;
        p.scale = NAN;
        return p;
    }
    float r = hi - lo;
    if (!isfinite(r)) {
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

#define U4_BLOCK 512

void pccl_quantize_u4(const void *src, size_t n, uint8_t *codes, float *lo, float *scale) {
    const f32_u *x = (const f32_u *)src;
    qparams p = plan(x, n, 15.0f);
    *lo = p.lo;
    *scale = p.scale;
    if (p.mode == 0) {
        memset(codes, 0, (n + 1) / 2);
        return;
    }
    uint8_t tmp[U4_BLOCK];
    for (size_t i = 0; i < n; i += U4_BLOCK) {
        size_t m = n - i < U4_BLOCK ? n - i : U4_BLOCK;
        codes_any(&p, x + i, m, 15.0f, tmp);
        if (m & 1) tmp[m] = 0; /* only on the last block */
        uint8_t *restrict out = codes + i / 2;
        size_t pairs = (m + 1) / 2;
        for (size_t j = 0; j < pairs; j++) out[j] = (uint8_t)(tmp[2 * j] | (tmp[2 * j + 1] << 4));
    }
}

void pccl_dequantize_u8(const uint8_t *codes, float lo, float scale, void *dst, size_t n) {
    const uint8_t *restrict c = codes;
    f32_u *restrict d = (f32_u *)dst;
    for (size_t i = 0; i < n; i++) d[i] = (float)c[i] * scale + lo;
}

void pccl_dequant_add_u8(const uint8_t *codes, float lo, float scale, void *dst, size_t n) {
    const uint8_t *restrict c = codes;
    f32_u *restrict d = (f32_u *)dst;
    for (size_t i = 0; i < n; i++) d[i] = d[i] + ((float)c[i] * scale + lo);
}

void pccl_dequantize_u4(const uint8_t *codes, float lo, float scale, void *dst, size_t n) {
    const uint8_t *restrict c = codes;
    f32_u *restrict d = (f32_u *)dst;
    size_t pairs = n / 2;
    for (size_t j = 0; j < pairs; j++) {
        uint8_t b = c[j];
        d[2 * j] = (float)(b & 15) * scale + lo;
        d[2 * j + 1] = (float)(b >> 4) * scale + lo;
    }
    if (n & 1) d[n - 1] = (float)(c[pairs] & 15) * scale + lo;
}

void pccl_dequant_add_u4(const uint8_t *codes, float lo, float scale, void *dst, size_t n) {
    const uint8_t *restrict c = codes;
    f32_u *restrict d = (f32_u *)dst;
    size_t pairs = n / 2;
    for (size_t j = 0; j < pairs; j++) {
        uint8_t b = c[j];
        d[2 * j] = d[2 * j] + ((float)(b & 15) * scale + lo);
        d[2 * j + 1] = d[2 * j + 1] + ((float)(b >> 4) * scale + lo);
    }
    if (n & 1) d[n - 1] = d[n - 1] + ((float)(c[pairs] & 15) * scale + lo);
}
