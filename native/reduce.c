/* Elementwise reductions dst = dst (op) src and the avg finish, for every dtype.
 *
 * Each (dtype, op) pair is its own simple loop over restrict pointers so the compiler
 * vectorises it. Semantics (docs/kernels.md):
 *   float32/float64: IEEE op in the type itself.
 *   float16/bfloat16: widen to float32 (exact), op in float32, round to nearest even;
 *                     a NaN result is the canonical quiet NaN.
 *   min/max (floats): NaN wins (dst's NaN first, then src's); otherwise on a tie
 *                     (+0 vs -0) dst is kept.
 *   integers: sum and prod wrap modulo 2^bits (like numpy); min/max exact.
 */
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

#define F_SUM(a, b) ((a) + (b))
#define F_PROD(a, b) ((a) * (b))
/* NaN wins (a's first); ties keep a. Written as a chain of selects so it vectorises. */
#define DEF_FSEL(NAME, T, CMP)                                                         \
    static inline T NAME(T a, T b) {                                                   \
        T r = (b CMP a) ? b : a;                                                       \
        r = (b != b) ? b : r;                                                          \
        r = (a != a) ? a : r;                                                          \
        return r;                                                                      \
    }
DEF_FSEL(fmin32, float, <)
DEF_FSEL(fmax32, float, >)
DEF_FSEL(fmin64, double, <)
DEF_FSEL(fmax64, double, >)
#define I_MIN(a, b) ((b) < (a) ? (b) : (a))
#define I_MAX(a, b) ((b) > (a) ? (b) : (a))

/* plain types: T is the (unaligned) storage type */
#define DEF_PLAIN(NAME, T, OP)                                                         \
    static void NAME(void *dv, const void *sv, size_t n) {                            \
        T *restrict d = (T *)dv;                                                       \
        const T *restrict s = (const T *)sv;                                           \
        for (size_t i = 0; i < n; i++) d[i] = OP(d[i], s[i]);                          \
    }

/* wrapping integer ops: computed in unsigned type U (no signed overflow) */
#define DEF_WRAP(NAME, T, U, OPC)                                                      \
    static void NAME(void *dv, const void *sv, size_t n) {                            \
        T *restrict d = (T *)dv;                                                       \
        const T *restrict s = (const T *)sv;                                           \
        for (size_t i = 0; i < n; i++) d[i] = (T)((U)d[i] OPC (U)s[i]);                \
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

DEF_PLAIN(f32_sum, f32_u, F_SUM)
DEF_PLAIN(f32_prod, f32_u, F_PROD)
DEF_PLAIN(f32_min, f32_u, fmin32)
DEF_PLAIN(f32_max, f32_u, fmax32)
DEF_PLAIN(f64_sum, f64_u, F_SUM)
DEF_PLAIN(f64_prod, f64_u, F_PROD)
DEF_PLAIN(f64_min, f64_u, fmin64)
DEF_PLAIN(f64_max, f64_u, fmax64)

DEF_HALF(f16_sum, pccl_f16_to_f32, pccl_f32_to_f16, F_SUM)
DEF_HALF(f16_prod, pccl_f16_to_f32, pccl_f32_to_f16, F_PROD)
DEF_HALF(f16_min, pccl_f16_to_f32, pccl_f32_to_f16, fmin32)
DEF_HALF(f16_max, pccl_f16_to_f32, pccl_f32_to_f16, fmax32)
DEF_HALF(bf16_sum, pccl_bf16_to_f32, pccl_f32_to_bf16, F_SUM)
DEF_HALF(bf16_prod, pccl_bf16_to_f32, pccl_f32_to_bf16, F_PROD)
DEF_HALF(bf16_min, pccl_bf16_to_f32, pccl_f32_to_bf16, fmin32)
DEF_HALF(bf16_max, pccl_bf16_to_f32, pccl_f32_to_bf16, fmax32)

DEF_WRAP(i8_sum, int8_t, uint32_t, +)
DEF_WRAP(i8_prod, int8_t, uint32_t, *)
DEF_PLAIN(i8_min, int8_t, I_MIN)
DEF_PLAIN(i8_max, int8_t, I_MAX)
DEF_WRAP(u8_sum, uint8_t, uint32_t, +)
DEF_WRAP(u8_prod, uint8_t, uint32_t, *)
DEF_PLAIN(u8_min, uint8_t, I_MIN)
DEF_PLAIN(u8_max, uint8_t, I_MAX)
DEF_WRAP(i16_sum, i16_u, uint32_t, +)
DEF_WRAP(i16_prod, i16_u, uint32_t, *)
DEF_PLAIN(i16_min, i16_u, I_MIN)
DEF_PLAIN(i16_max, i16_u, I_MAX)
DEF_WRAP(i32_sum, i32_u, uint32_t, +)
DEF_WRAP(i32_prod, i32_u, uint32_t, *)
DEF_PLAIN(i32_min, i32_u, I_MIN)
DEF_PLAIN(i32_max, i32_u, I_MAX)
DEF_WRAP(i64_sum, i64_u, uint64_t, +)
DEF_WRAP(i64_prod, i64_u, uint64_t, *)
DEF_PLAIN(i64_min, i64_u, I_MIN)
DEF_PLAIN(i64_max, i64_u, I_MAX)

typedef void (*binop_fn)(void *, const void *, size_t);

static const binop_fn REDUCE_TABLE[PCCL_NDTYPES][PCCL_NOPS] = {
    [PCCL_F32] = {f32_sum, f32_prod, f32_min, f32_max},
    [PCCL_F64] = {f64_sum, f64_prod, f64_min, f64_max},
    [PCCL_F16] = {f16_sum, f16_prod, f16_min, f16_max},
    [PCCL_BF16] = {bf16_sum, bf16_prod, bf16_min, bf16_max},
    [PCCL_I8] = {i8_sum, i8_prod, i8_min, i8_max},
    [PCCL_I16] = {i16_sum, i16_prod, i16_min, i16_max},
    [PCCL_I32] = {i32_sum, i32_prod, i32_min, i32_max},
    [PCCL_I64] = {i64_sum, i64_prod, i64_min, i64_max},
    [PCCL_U8] = {u8_sum, u8_prod, u8_min, u8_max},
};

void pccl_reduce(void *dst, const void *src, size_t n, pccl_op op, pccl_dtype dt) {
    if ((unsigned)dt >= PCCL_NDTYPES || (unsigned)op >= PCCL_NOPS) return;
    REDUCE_TABLE[dt][op](dst, src, n);
}

/* ---- avg finish ---------------------------------------------------------------- */

/* 8/16/32-bit integers: the quotient computed in double is correctly rounded and can never
 * cross an integer (|x| < 2^31, so a non-integral x/k is >= 1/k away from one, far more
 * than double's rounding error), so truncating it gives exactly C's x / k, vectorised. */
#define DEF_AVG_SMALLINT(NAME, T)                                                      \
    static void NAME(void *dv, size_t n, int64_t k) {                                  \
        T *restrict d = (T *)dv;                                                       \
        const double kd = (double)k;                                                   \
        for (size_t i = 0; i < n; i++) d[i] = (T)(int32_t)((double)d[i] / kd);         \
    }

DEF_AVG_SMALLINT(i8_avg, int8_t)
DEF_AVG_SMALLINT(u8_avg, uint8_t)
DEF_AVG_SMALLINT(i16_avg, i16_u)
DEF_AVG_SMALLINT(i32_avg, i32_u)

static void i64_avg(void *dv, size_t n, int64_t k) {
    i64_u *restrict d = (i64_u *)dv;
    for (size_t i = 0; i < n; i++) d[i] = d[i] / k;
}

static void f32_avg(void *dv, size_t n, int64_t k) {
    f32_u *restrict d = (f32_u *)dv;
    const float kf = (float)k;
    for (size_t i = 0; i < n; i++) d[i] = d[i] / kf;
}

static void f64_avg(void *dv, size_t n, int64_t k) {
    f64_u *restrict d = (f64_u *)dv;
    const double kd = (double)k;
    for (size_t i = 0; i < n; i++) d[i] = d[i] / kd;
}

static void f16_avg(void *dv, size_t n, int64_t k) {
    u16_u *restrict d = (u16_u *)dv;
    const float kf = (float)k;
    for (size_t i = 0; i < n; i++) d[i] = pccl_f32_to_f16(pccl_f16_to_f32(d[i]) / kf);
}

static void bf16_avg(void *dv, size_t n, int64_t k) {
    u16_u *restrict d = (u16_u *)dv;
    const float kf = (float)k;
    for (size_t i = 0; i < n; i++) d[i] = pccl_f32_to_bf16(pccl_bf16_to_f32(d[i]) / kf);
}

typedef void (*avg_fn)(void *, size_t, int64_t);

static const avg_fn AVG_TABLE[PCCL_NDTYPES] = {
    [PCCL_F32] = f32_avg, [PCCL_F64] = f64_avg, [PCCL_F16] = f16_avg, [PCCL_BF16] = bf16_avg,
    [PCCL_I8] = i8_avg, [PCCL_I16] = i16_avg, [PCCL_I32] = i32_avg, [PCCL_I64] = i64_avg,
    [PCCL_U8] = u8_avg,
};

void pccl_finish_avg(void *dst, size_t n, int64_t n_div, pccl_dtype dt) {
    if ((unsigned)dt >= PCCL_NDTYPES || n_div < 1) return;
    AVG_TABLE[dt](dst, n, n_div);
}
