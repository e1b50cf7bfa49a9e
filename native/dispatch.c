/* ISA level selection (see dispatch.h). */
#include "dispatch.h"

int pccl_isa = PCCL_ISA_GENERIC;

int pccl_isa_max(void) {
#if PCCL_X86
    __builtin_cpu_init();
    /* the AVX2 level also uses F16C (every AVX2 CPU has it; checked anyway) */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return PCCL_ISA_AVX2;
    return PCCL_ISA_SSE2;
#else
    return PCCL_ISA_GENERIC;
#endif
}

int pccl_isa_set(int level) {
    int max = pccl_isa_max();
    if (level < PCCL_ISA_GENERIC) level = PCCL_ISA_GENERIC;
    pccl_isa = level > max ? max : level;
    return pccl_isa;
}
