/* pccl_py native kernels: flat functions over raw buffers and element counts.
 *
 * Nothing here knows about Python, sockets or torch. Buffers may be unaligned (every
 * access goes through the 1-byte-aligned element types below). Pointers passed to one
 * call must not overlap, except that reduce() accepts dst == src exactly.
 *
 * Bit reproducibility: every kernel is a fixed sequence of IEEE-754 binary32/binary64
 * operations in round-to-nearest-even, compiled without FMA contraction and without
 * fast-math, so the same input gives the same bits on every x86_64 and aarch64 machine
 * (assuming the default floating-point environment: no flush-to-zero / denormals-are-zero).
 */
#ifndef PCCL_KERNELS_H
#define PCCL_KERNELS_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    PCCL_F32 = 0, PCCL_F64, PCCL_F16, PCCL_BF16,
    PCCL_I8, PCCL_I16, PCCL_I32, PCCL_I64, PCCL_U8,
    PCCL_NDTYPES
} pccl_dtype;

typedef enum { PCCL_SUM = 0, PCCL_PROD, PCCL_MIN, PCCL_MAX, PCCL_NOPS } pccl_op;

/* itemsize in bytes of a dtype */
size_t pccl_itemsize(pccl_dtype dt);

/* dst[i] = dst[i] (op) src[i], i < n (elements). */
void pccl_reduce(void *dst, const void *src, size_t n, pccl_op op, pccl_dtype dt);

/* dst[i] = dst[i] / n_div. Floats: IEEE division in the working precision (f16/bf16 via
 * float32, rounded back to nearest-even). Integers: truncation toward zero. n_div >= 1. */
void pccl_finish_avg(void *dst, size_t n, int64_t n_div, pccl_dtype dt);

/* Min-max affine quantization of n float32 values to 8-bit codes (one per byte) or 4-bit
 * codes (two per byte, low nibble first, (n+1)/2 bytes). Writes *lo and *scale;
 * x ~= lo + code * scale. See docs/kernels.md for the exact rule. */
void pccl_quantize_u8(const void *src, size_t n, uint8_t *codes, float *lo, float *scale);
void pccl_quantize_u4(const void *src, size_t n, uint8_t *codes, float *lo, float *scale);

/* dst[i] = code[i] * scale + lo  (float32, two roundings, no FMA) */
void pccl_dequantize_u8(const uint8_t *codes, float lo, float scale, void *dst, size_t n);
void pccl_dequantize_u4(const uint8_t *codes, float lo, float scale, void *dst, size_t n);
/* dst[i] = dst[i] + (code[i] * scale + lo)  (fused, no temporary) */
void pccl_dequant_add_u8(const uint8_t *codes, float lo, float scale, void *dst, size_t n);
void pccl_dequant_add_u4(const uint8_t *codes, float lo, float scale, void *dst, size_t n);

#endif
