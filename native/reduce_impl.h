/* Reduction and avg-finish loops, instantiated once per ISA level by reduce.c with
 * SUFFIX set (no include guard on purpose). Each (dtype, op) pair is its own simple loop
 * over restrict pointers, so the compiler vectorises it. */

#define FN(name) PCCL_CAT(name, SUFFIX)

DEF_PLAIN(FN(f32_sum), f32_u, F_SUM)
DEF_PLAIN(FN(f32_prod), f32_u, F_PROD)
DEF_PLAIN(FN(f32_min), f32_u, fmin32)
DEF_PLAIN(FN(f32_max), f32_u, fmax32)
DEF_PLAIN(FN(f64_sum), f64_u, F_SUM)
DEF_PLAIN(FN(f64_prod), f64_u, F_PROD)
DEF_PLAIN(FN(f64_min), f64_u, fmin64)
DEF_PLAIN(FN(f64_max), f64_u, fmax64)

DEF_HALF(FN(f16_sum), pccl_f16_to_f32, pccl_f32_to_f16, F_SUM)
DEF_HALF(FN(f16_prod), pccl_f16_to_f32, pccl_f32_to_f16, F_PROD)
DEF_HALF(FN(f16_min), pccl_f16_to_f32, pccl_f32_to_f16, fmin32)
DEF_HALF(FN(f16_max), pccl_f16_to_f32, pccl_f32_to_f16, fmax32)
DEF_HALF(FN(bf16_sum), pccl_bf16_to_f32, pccl_f32_to_bf16, F_SUM)
DEF_HALF(FN(bf16_prod), pccl_bf16_to_f32, pccl_f32_to_bf16, F_PROD)
DEF_HALF(FN(bf16_min), pccl_bf16_to_f32, pccl_f32_to_bf16, fmin32)
DEF_HALF(FN(bf16_max), pccl_bf16_to_f32, pccl_f32_to_bf16, fmax32)

DEF_WRAP(FN(i8_sum), int8_t, uint32_t, +)
DEF_WRAP(FN(i8_prod), int8_t, uint32_t, *)
DEF_PLAIN(FN(i8_min), int8_t, I_MIN)
DEF_PLAIN(FN(i8_max), int8_t, I_MAX)
DEF_WRAP(FN(u8_sum), uint8_t, uint32_t, +)
DEF_WRAP(FN(u8_prod), uint8_t, uint32_t, *)
DEF_PLAIN(FN(u8_min), uint8_t, I_MIN)
DEF_PLAIN(FN(u8_max), uint8_t, I_MAX)
DEF_WRAP(FN(i16_sum), i16_u, uint32_t, +)
DEF_WRAP(FN(i16_prod), i16_u, uint32_t, *)
DEF_PLAIN(FN(i16_min), i16_u, I_MIN)
DEF_PLAIN(FN(i16_max), i16_u, I_MAX)
DEF_WRAP(FN(i32_sum), i32_u, uint32_t, +)
DEF_WRAP(FN(i32_prod), i32_u, uint32_t, *)
DEF_PLAIN(FN(i32_min), i32_u, I_MIN)
DEF_PLAIN(FN(i32_max), i32_u, I_MAX)
DEF_WRAP(FN(i64_sum), i64_u, uint64_t, +)
DEF_WRAP(FN(i64_prod), i64_u, uint64_t, *)
DEF_PLAIN(FN(i64_min), i64_u, I_MIN)
DEF_PLAIN(FN(i64_max), i64_u, I_MAX)

static const binop_fn FN(REDUCE_TABLE)[PCCL_NDTYPES][PCCL_NOPS] = {
    [PCCL_F32] = {FN(f32_sum), FN(f32_prod), FN(f32_min), FN(f32_max)},
    [PCCL_F64] = {FN(f64_sum), FN(f64_prod), FN(f64_min), FN(f64_max)},
    [PCCL_F16] = {FN(f16_sum), FN(f16_prod), FN(f16_min), FN(f16_max)},
    [PCCL_BF16] = {FN(bf16_sum), FN(bf16_prod), FN(bf16_min), FN(bf16_max)},
    [PCCL_I8] = {FN(i8_sum), FN(i8_prod), FN(i8_min), FN(i8_max)},
    [PCCL_I16] = {FN(i16_sum), FN(i16_prod), FN(i16_min), FN(i16_max)},
    [PCCL_I32] = {FN(i32_sum), FN(i32_prod), FN(i32_min), FN(i32_max)},
    [PCCL_I64] = {FN(i64_sum), FN(i64_prod), FN(i64_min), FN(i64_max)},
    [PCCL_U8] = {FN(u8_sum), FN(u8_prod), FN(u8_min), FN(u8_max)},
};

DEF_AVG_SMALLINT(FN(i8_avg), int8_t)
DEF_AVG_SMALLINT(FN(u8_avg), uint8_t)
DEF_AVG_SMALLINT(FN(i16_avg), i16_u)
DEF_AVG_SMALLINT(FN(i32_avg), i32_u)

static void FN(i64_avg)(void *dv, size_t n, int64_t k) {
    i64_u *restrict d = (i64_u *)dv;
    for (size_t i = 0; i < n; i++) d[i] = d[i] / k;
}

static void FN(f32_avg)(void *dv, size_t n, int64_t k) {
    f32_u *restrict d = (f32_u *)dv;
    const float kf = (float)k;
    UNROLL for (size_t i = 0; i < n; i++) d[i] = d[i] / kf;
}

static void FN(f64_avg)(void *dv, size_t n, int64_t k) {
    f64_u *restrict d = (f64_u *)dv;
    const double kd = (double)k;
    for (size_t i = 0; i < n; i++) d[i] = d[i] / kd;
}

static void FN(f16_avg)(void *dv, size_t n, int64_t k) {
    u16_u *restrict d = (u16_u *)dv;
    const float kf = (float)k;
    for (size_t i = 0; i < n; i++) d[i] = pccl_f32_to_f16(pccl_f16_to_f32(d[i]) / kf);
}

static void FN(bf16_avg)(void *dv, size_t n, int64_t k) {
    u16_u *restrict d = (u16_u *)dv;
    const float kf = (float)k;
    for (size_t i = 0; i < n; i++) d[i] = pccl_f32_to_bf16(pccl_bf16_to_f32(d[i]) / kf);
}

static const avg_fn FN(AVG_TABLE)[PCCL_NDTYPES] = {
    [PCCL_F32] = FN(f32_avg), [PCCL_F64] = FN(f64_avg), [PCCL_F16] = FN(f16_avg),
    [PCCL_BF16] = FN(bf16_avg), [PCCL_I8] = FN(i8_avg), [PCCL_I16] = FN(i16_avg),
    [PCCL_I32] = FN(i32_avg), [PCCL_I64] = FN(i64_avg), [PCCL_U8] = FN(u8_avg),
};

#undef FN
