/* Instruction-set dispatch for the kernels.
 *
 * Every kernel exists as plain C (auto-vectorised for the baseline ISA: SSE2 on x86_64,
 * NEON on aarch64). On x86_64 with GCC, a second copy of the same loops is compiled for
 * AVX2 (without FMA: -ffp-contract=off and no "fma" target), float16 uses the F16C
 * conversions at that level, and hand-written SSE2/AVX2 loops exist for the quantizer's
 * min/max and code passes and the 4-bit decode. All of them perform the same
 * IEEE operations in the same order per element, so the choice changes speed, never bits;
 * tests run every level against the numpy reference.
 */
#ifndef PCCL_DISPATCH_H
#define PCCL_DISPATCH_H

/* PCCL_NO_DISPATCH: build the plain C loops only (what non-x86 machines get) */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(PCCL_NO_DISPATCH)
#define PCCL_X86 1
#else
#define PCCL_X86 0
#endif

enum { PCCL_ISA_GENERIC = 0, PCCL_ISA_SSE2 = 1, PCCL_ISA_AVX2 = 2 };

/* the level the kernels use now */
extern int pccl_isa;

/* highest level this CPU and build support */
int pccl_isa_max(void);

/* use `level` (clamped to pccl_isa_max()); returns the level now in effect */
int pccl_isa_set(int level);

#define PCCL_CAT_(a, b) a##b
#define PCCL_CAT(a, b) PCCL_CAT_(a, b)

#endif
