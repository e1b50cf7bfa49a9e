/* Elementwise reductions dst = dst (op) src and the avg finish, for every dtype.
 *
 * Semantics (docs/kernels.md; pccl_py/reference.py is the executable twin):
 *   float32/float64: IEEE op in the type itself.
 *   float16/bfloat16: widen to float32 (exact), op in float32, round to nearest even;
 *                     a NaN result is the canonical quiet NaN.
 *   min/max (floats): NaN wins (dst's NaN first, then src's); otherwise on a tie
 *                     (+0 vs -0) dst is kept.
 *   integers: sum and prod wrap modulo 2^bits (like numpy); min/max exact.
 *   avg finish: floats divide by n (IEEE, working precision); integers truncate toward 0.
 */
#include "dispatch.h"
#include "kernels.h"
#include "numeric.h"

size_t pccl_itemsize(pccl_dtype dt) {
    switch (dt) {
    case PCCL_F32: case PCCL_I32: return 4;
    case PCCL_F64: case PCCL_I64: return 8;
    case PCCL_F16: case PCCL_BF16: case PCCL_I16: return 2;
    case PCCL_I8: case PCCL_U8: return 1;
    default: return 0;
    }
}

typedef void (*binop_fn)(void *, const void *, size_t);
typedef void (*avg_fn)(void *, size_t, int64_t);

/* a little unrolling keeps more loads in flight on these memory-bound loops */
#define UNROLL _Pragma("GCC unroll 4")

#define F_SUM(a, b) ((a) + (b))
#define F_PROD(a, b) ((a) * (b))
#define I_MIN(a, b) ((b) < (a) ? (b) : (a))
#define I_MAX(a, b) ((b) > (a) ? (b) : (a))

/* Float min/max: NaN wins (a's first); ties keep a. "take b" is: a is not NaN and b does not
 * lose to a (!(b >= a) is true for b < a and for a NaN b): two compares and a select. */
#define DEF_FSEL(NAME, T, NOT_B)                                                       \
    static inline T NAME(T a, T b) { return ((a == a) & !(b NOT_B a)) ? b : a; }
DEF_FSEL(fmin32, float, >=)
DEF_FSEL(fmax32, float, <=)
DEF_FSEL(fmin64, double, >=)
DEF_FSEL(fmax64, double, <=)

/* plain types: T is the (unaligned) storage type */
#define DEF_PLAIN(NAME, T, OP)                                                         \
    static void NAME(void *dv, const void *sv, size_t n) {                            \
        T *restrict d = (T *)dv;                                                       \
        const T *restrict s = (const T *)sv;                                           \
        UNROLL for (size_t i = 0; i < n; i++) d[i] = OP(d[i], s[i]);                   \
    }

/* wrapping integer ops: computed in unsigned type U (no signed overflow, no int promotion
 * overflow for 8/16-bit products) */
#define DEF_WRAP(NAME, T, U, OPC)                                                      \
    static void NAME(void *dv, const void *sv, size_t n) {                            \
        T *restrict d = (T *)dv;                                                       \
        const T *restrict s = (const T *)sv;                                           \
        UNROLL for (size_t i = 0; i < n; i++) d[i] = (T)((U)d[i] OPC (U)s[i]);         \
    }

/* 16-bit floats: widen, op in float32, narrow */
#define DEF_HALF(NAME, TOF, FROMF, OP)                                                 \
    static void NAME(void *dv, const void *sv, size_t n) {                            \
        u16_u *restrict d = (u16_u *)dv;                                               \
        const u16_u *restrict s = (const u16_u *)sv;                                   \
        for (size_t i = 0; i < n; i++) {                                               \
            float a = TOF(d[i]), b = TOF(s[i]);                                        \
            d[i] = FROMF(OP(a, b));                                                    \
        }                                                                              \
    }

/* 8/16/32-bit integer avg: the quotient computed in double is correctly rounded and can
 * never cross an integer (|x| < 2^31, so a non-integral x/k is >= 1/k away from one, far
 * more than double's rounding error); truncating it gives exactly C's x / k, vectorised. */
#define DEF_AVG_SMALLINT(NAME, T)                                                      \
    static void NAME(void *dv, size_t n, int64_t k) {                                  \
        T *restrict d = (T *)dv;                                                       \
        const double kd = (double)k;                                                   \
        for (size_t i = 0; i < n; i++) d[i] = (T)(int32_t)((double)d[i] / kd);         \
    }

#define SUFFIX _generic
#include "reduce_impl.h"
#undef SUFFIX

#if PCCL_X86
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define SUFFIX _avx2
#include "reduce_impl.h"
#undef SUFFIX

/* float16 with the F16C conversions (exact widening; IEEE round-to-nearest-even
 * narrowing), the same float32 operations as the plain loops, and every NaN result
 * replaced by the canonical 0x7E00 (as pccl_f32_to_f16 does). */
static inline __m128i f16c_narrow(__m256 r) {
    __m128i h = _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256i m = _mm256_castps_si256(_mm256_cmp_ps(r, r, _CMP_UNORD_Q));
    __m128i m16 = _mm_packs_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    return _mm_blendv_epi8(h, _mm_set1_epi16(0x7E00), m16);
}

static inline __m256 f16c_load(const void *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* min/max: min_ps(b, a) is b < a ? b : a (ties keep a); a NaN in either input sets all
 * bits (a NaN), which the narrowing canonicalises. */
#define V_SUM(a, b) _mm256_add_ps(a, b)
#define V_PROD(a, b) _mm256_mul_ps(a, b)
#define V_MIN(a, b) _mm256_or_ps(_mm256_min_ps(b, a), _mm256_cmp_ps(a, b, _CMP_UNORD_Q))
#define V_MAX(a, b) _mm256_or_ps(_mm256_max_ps(b, a), _mm256_cmp_ps(a, b, _CMP_UNORD_Q))

#define DEF_F16C(NAME, VOP, TAIL)                                                      \
    static void NAME(void *dv, const void *sv, size_t n) {                            \
        char *d = (char *)dv;                                                          \
        const char *s = (const char *)sv;                                              \
        size_t i = 0;                                                                  \
        for (; i + 8 <= n; i += 8) {                                                   \
            __m256 r = VOP(f16c_load(d + 2 * i), f16c_load(s + 2 * i));                \
            _mm_storeu_si128((__m128i *)(void *)(d + 2 * i), f16c_narrow(r));          \
        }                                                                              \
        TAIL(d + 2 * i, s + 2 * i, n - i);                                             \
    }

DEF_F16C(f16_sum_f16c, V_SUM, f16_sum_avx2)
DEF_F16C(f16_prod_f16c, V_PROD, f16_prod_avx2)
DEF_F16C(f16_min_f16c, V_MIN, f16_min_avx2)
DEF_F16C(f16_max_f16c, V_MAX, f16_max_avx2)

static void f16_avg_f16c(void *dv, size_t n, int64_t k) {
    char *d = (char *)dv;
    const __m256 kf = _mm256_set1_ps((float)k);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 r = _mm256_div_ps(f16c_load(d + 2 * i), kf);
        _mm_storeu_si128((__m128i *)(void *)(d + 2 * i), f16c_narrow(r));
    }
    f16_avg_avx2(d + 2 * i, n - i, k);
}
#pragma GCC pop_options
#endif

static binop_fn reduce_fn(pccl_dtype dt, pccl_op op) {
#if PCCL_X86
    if (pccl_isa >= PCCL_ISA_AVX2) {
        if (dt == PCCL_F16) {
            static const binop_fn F16C[PCCL_NOPS] = {f16_sum_f16c, f16_prod_f16c, f16_min_f16c,
                                                     f16_max_f16c};
            return F16C[op];
        }
        return REDUCE_TABLE_avx2[dt][op];
    }
#endif
    return REDUCE_TABLE_generic[dt][op];
}

void pccl_reduce(void *dst, const void *src, size_t n, pccl_op op, pccl_dtype dt) {
    if ((unsigned)dt >= PCCL_NDTYPES || (unsigned)op >= PCCL_NOPS) return;
    reduce_fn(dt, op)(dst, src, n);
}

void pccl_finish_avg(void *dst, size_t n, int64_t n_div, pccl_dtype dt) {
    if ((unsigned)dt >= PCCL_NDTYPES || n_div < 1) return;
#if PCCL_X86
    if (pccl_isa >= PCCL_ISA_AVX2) {
        if (dt == PCCL_F16)
            f16_avg_f16c(dst, n, n_div);
        else
            AVG_TABLE_avx2[dt](dst, n, n_div);
        return;
    }
#endif
    AVG_TABLE_generic[dt](dst, n, n_div);
}
