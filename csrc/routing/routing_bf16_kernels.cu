// Capsule routing CUDA kernels, bfloat16 instantiation (see routing_kernels.cuh). One element
// type per file, so that the three compile in parallel.
#include "routing/routing_kernels.cuh"

SEQREC_FAST_ROUTING_CUDA_INSTANTIATE(bf16, BF16)
