// Capsule routing CUDA kernels, float16 instantiation (see routing_kernels.cuh). One element
// type per file, so that the three compile in parallel.
#include "routing/routing_kernels.cuh"

SEQREC_FAST_ROUTING_CUDA_INSTANTIATE(fp16, F16)
