/* Unaligned element types and exact, branch-free float16/bfloat16 <-> float32 conversions. */
#ifndef PCCL_NUMERIC_H
#define PCCL_NUMERIC_H

#include <stdint.h>
#include <string.h>

#if !defined(__GNUC__)
#error "pccl_py native kernels need GCC or Clang (unaligned element typedefs)"
#endif

/* Element types with alignment 1: buffers may start at any byte offset (a slice of a
 * bytearray, a shared-memory view). x86_64 and aarch64 load these at full speed. */
typedef float f32_u __attribute__((aligned(1)));
typedef double f64_u __attribute__((aligned(1)));
typedef uint16_t u16_u __attribute__((aligned(1)));
typedef int16_t i16_u __attribute__((aligned(1)));
typedef int32_t i32_u __attribute__((aligned(1)));
typedef uint32_t u32_u __attribute__((aligned(1)));
typedef int64_t i64_u __attribute__((aligned(1)));
typedef uint64_t u64_u __attribute__((aligned(1)));

static inline uint32_t pccl_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float pccl_f32_from(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* bfloat16 -> float32: exact. */
static inline float pccl_bf16_to_f32(uint16_t h) { return pccl_f32_from((uint32_t)h << 16); }

/* float32 -> bfloat16, round to nearest even; overflow gives +-inf; any NaN gives the
 * canonical quiet NaN 0x7FC0 (the sign and payload of a NaN depend on the CPU, so they
 * are not kept). */
static inline uint16_t pccl_f32_to_bf16(float f) {
    uint32_t u = pccl_f32_bits(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(((u & 0x7FFFFFFFu) > 0x7F800000u) ? 0x7FC0u : r);
}

/* float16 -> float32: exact (after M. Maratyszcza's FP16 library). The float operations
 * involved only see and produce normal numbers, so flush-to-zero modes cannot change it. */
static inline float pccl_f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = pccl_f32_from((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = pccl_f32_from((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t bits = two_w < (1u << 27) ? pccl_f32_bits(denormalized) : pccl_f32_bits(normalized);
    return pccl_f32_from(sign | bits);
}

/* float32 -> float16, round to nearest even (IEEE conversion); overflow gives +-inf;
 * any NaN gives the canonical quiet NaN 0x7E00. */
static inline uint16_t pccl_f32_to_f16(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = pccl_f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = pccl_f32_from((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = pccl_f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)(shl1_w > 0xFF000000u ? 0x7E00u : ((sign >> 16) | nonsign));
}

#endif
